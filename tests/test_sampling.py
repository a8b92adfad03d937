"""Client sampling with over-selection: the invitation on the wire (hostile input), the cohort
draw, who counts as connected, the bad combinations, and a real aggregator with three real device
processes on mosquitto where the uninvited device stays idle and DP accounts the real rate."""

from __future__ import annotations

import hashlib
import json
import secrets
import time

import numpy as np
import pytest

from fleetlearn.aggregator.config import AggregatorConfig, RoundPolicy
from fleetlearn.aggregator.dp_fedavg import dp_epsilon_rates
from fleetlearn.aggregator.model_store import decode_server_state
from fleetlearn.aggregator.presence import Presence
from fleetlearn.aggregator.registry import StrategyChoice
from fleetlearn.aggregator.sampling import SamplingOptions, draw_cohort, round_salt
from fleetlearn.aggregator.validation import Rejection, validate_update
from fleetlearn.edge_runtime.core.errors import ProtocolError, UsageError
from fleetlearn.edge_runtime.core.protocol import GlobalModel, Invitation, RoundMetrics, Status, Topics, Update, invitation_rank
from tests.conftest import stop_process
from tests.peers import Recorder
from tests.procs import AggregatorProcess
from tests.test_device import FLEET, start_device, write_config

RUN, MODEL = "a" * 32, "b" * 64


# ------------------------------------------------------------------ the wire


def test_invitation_is_the_rank_rule_and_round_trips_in_the_global_frame():
    salt = "0123456789abcdef" * 2
    inv = Invitation(salt, 1 << 63)

    for d in ("dev-0", "dev-1", "pi-07"):
        rank = int.from_bytes(hashlib.sha256(bytes.fromhex(salt) + d.encode()).digest()[:8], "big")  # the documented rule
        assert invitation_rank(salt, d) == rank and inv.invites(d) == (rank < 1 << 63)
    assert not Invitation(salt, 0).invites("dev-0") and Invitation(salt, 1 << 64).invites("dev-0")
    g = GlobalModel(RUN, 3, MODEL, np.zeros(4, np.float32), invite=inv)
    assert GlobalModel.decode(g.encode()).invite == inv
    assert GlobalModel.decode(GlobalModel(RUN, 3, MODEL, np.zeros(4, np.float32)).encode()).invite is None
    # Constant size: the frame for a 1,000-device cohort is as big as for a 3-device one.
    many = draw_cohort([f"dev-{i}" for i in range(1000)], 1, "s", SamplingOptions(sample_size=700), 1)
    few = draw_cohort(["dev-0", "dev-1", "dev-2"], 1, "s", SamplingOptions(sample_size=2), 1)
    assert (
        len(many.invited) == 910
        and abs(
            len(GlobalModel(RUN, 1, MODEL, np.zeros(4, np.float32), invite=many.invitation).encode())
            - len(GlobalModel(RUN, 1, MODEL, np.zeros(4, np.float32), invite=few.invitation).encode())
        )
        <= 20
    )


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        "x",
        {"salt": "zz" * 16, "below": 1},
        {"salt": "ab" * 16},
        {"salt": "ab" * 16, "below": -1},
        {"salt": "ab" * 16, "below": (1 << 64) + 1},
        {"salt": "ab" * 16, "below": 1.5},
        {"salt": "ab" * 16, "below": True},
        {"salt": "ab" * 16, "below": 1, "extra": 1},
        {"salt": "AB" * 16, "below": 1},
    ],
)
def test_a_hostile_invitation_is_a_protocol_error(bad):
    from fleetlearn.edge_runtime.core.protocol import Kind, encode_frame, tensor_to_body

    meta = {
        "run_id": RUN,
        "round": 1,
        "model_hash": MODEL,
        "train": True,
        "total_rounds": 1,
        "deadline": 0.0,
        "config": {},
        "n": 2,
        "invite": bad,
    }
    with pytest.raises(ProtocolError, match="invit|salt|below"):
        GlobalModel.decode(encode_frame(Kind.GLOBAL, meta, tensor_to_body(np.zeros(2, np.float32))))


# ------------------------------------------------------------------ the draw


def test_cohort_is_ceil_over_selection_times_target_seeded_by_seed_and_round():
    devices = [f"d{i:02d}" for i in range(20)]
    c = draw_cohort(devices, 4, "seed", SamplingOptions(sample_size=10), 1)
    assert (c.target, len(c.invited), c.connected) == (
        10,
        13,
        20,
    )  # ceil(1.3 * 10) = 13, not 14 from 1.3 * 10 = 13.000000000000002
    assert c.sampling_rate == 13 / 20
    # Exactly the invited devices pass the wire's rule among those connected, and they are the 13 lowest ranks.
    assert sorted(d for d in devices if c.invitation.invites(d)) == list(c.invited)
    ranks = sorted(devices, key=lambda d: invitation_rank(round_salt("seed", 4), d))
    assert set(ranks[:13]) == set(c.invited)
    assert draw_cohort(list(reversed(devices)), 4, "seed", SamplingOptions(sample_size=10), 1) == c  # deterministic
    assert draw_cohort(devices, 5, "seed", SamplingOptions(sample_size=10), 1).invited != c.invited
    assert draw_cohort(devices, 4, "other", SamplingOptions(sample_size=10), 1).invited != c.invited
    # Fewer connected than ceil(X * K): everyone connected is invited.
    assert draw_cohort(devices[:11], 1, "s", SamplingOptions(sample_size=10), 1).invited == tuple(devices[:11])
    # A fraction: target max(min, ceil(F n)), invited ceil(1.3 target).
    f = draw_cohort(devices, 1, "s", SamplingOptions(sample_fraction=0.25, over_selection=2.0), 2)
    assert (f.target, len(f.invited)) == (5, 10)
    assert draw_cohort(devices, 1, "s", SamplingOptions(sample_fraction=0.01), 3).target == 3
    # Over-selection 1: exactly the target. Invitations are uniform: each device's share over many rounds.
    counts = {d: 0 for d in devices}
    for r in range(1, 2001):
        for d in draw_cohort(devices, r, "u", SamplingOptions(sample_size=5, over_selection=1.0), 1).invited:
            counts[d] += 1
    assert all(abs(n / 2000 - 0.25) < 0.05 for n in counts.values())


def test_presence_counts_every_state_but_offline_and_ineligible_and_refuses_forgeries():
    t = Topics("f")
    p = Presence(t, max_devices=3)
    for d, st in (("a", "idle"), ("b", "training"), ("c", "offline")):
        p.on_status(t.status(d), Status(d, st).encode())
    assert p.connected() == ["a", "b"]
    p.on_status(t.status("c"), Status("c", "ineligible", detail="cpu 90.0 C > 80.0 C").encode())  # answers, but may not train
    assert p.connected() == ["a", "b"]
    p.on_status(t.status("c"), Status("c", "error", detail="diverged").encode())  # still answers
    assert p.connected() == ["a", "b", "c"]
    p.on_status(t.status("d"), Status("d", "idle").encode())  # over the bound: ignored
    assert "d" not in p.connected()
    for topic, payload in (
        (t.status("a"), Status("b", "offline").encode()),
        (t.status("a"), b"{"),
        (t.status("a"), b'{"v":1,"device_id":"a","state":"asleep"}'),
        ("fleetlearn/f/status/../x", Status("a", "offline").encode()),
    ):
        with pytest.raises(ProtocolError):
            p.on_status(topic, payload)
    assert p.connected() == ["a", "b", "c"]
    p.on_status(t.status("a"), b"")  # a cleared retained status forgets the device
    assert p.connected() == ["b", "c"]


def test_an_update_from_a_device_that_was_not_invited_is_rejected():
    class V:
        run_id, model_hash, open_round = RUN, MODEL, 2

        def check_version(self, run_id, model_hash, rnd):
            return None if rnd == 2 else "round closed"

    t = Topics("f")
    inv = Invitation("ab" * 16, 1 << 63)
    out, into = (
        (d for d in (f"dev-{i}" for i in range(50)) if not inv.invites(d)),
        (d for d in (f"dev-{i}" for i in range(50)) if inv.invites(d)),
    )
    a, b = next(out), next(into)

    def upd(dev):
        return Update(RUN, 2, dev, MODEL, 5, 1.0, 0.1, secrets.token_hex(16), np.zeros(3, np.float32)).encode()

    with pytest.raises(Rejection, match=f"{a} was not invited to round 2"):
        validate_update(t.update(a), upd(a), topics=t, num_params=3, version=V(), accepted={}, invited=inv.invites)
    assert (
        validate_update(
            t.update(b), upd(b), topics=t, num_params=3, version=V(), accepted={}, invited=inv.invites
        ).update.device_id
        == b
    )


# ------------------------------------------------------------------ bad combinations


def _cfg(tmp_path, sampling: SamplingOptions, target_devices=None, min_devices=2, **strategy) -> AggregatorConfig:
    return AggregatorConfig(
        broker="mqtt://127.0.0.1:1883",
        state_dir=tmp_path,
        bundle=tmp_path,
        rounds=RoundPolicy(3, min_devices, target_devices),
        strategy=StrategyChoice(strategy.pop("name", "fedavg"), strategy),
        sampling=sampling,
    )


@pytest.mark.parametrize(
    "kw, extra, message",
    [
        (dict(sample_size=3, sample_fraction=0.5), {}, "give one of --sample-size K or --sample-fraction F, not both"),
        (dict(sample_size=1), {}, "--sample-size 1 is below --min-devices 2"),
        (dict(sample_size=3), dict(target_devices=3), "--target-devices does not apply with --sample-size/--sample-fraction"),
        (dict(over_selection=1.5), {}, "--over-selection applies with --sample-size or --sample-fraction only"),
        (dict(sample_seed=4), {}, "--sample-seed applies with --sample-size or --sample-fraction only"),
        (dict(sample_fraction=0.5), dict(clip_norm=1.0, noise_multiplier=1.0), "use --sample-size K, not --sample-fraction"),
    ],
)
def test_sampling_combinations_that_cannot_work_are_one_line_errors(tmp_path, kw, extra, message):
    target = extra.pop("target_devices", None)
    with pytest.raises(UsageError) as exc:
        _cfg(tmp_path, SamplingOptions(**kw), target, **extra).validate()
    assert message in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(sample_fraction=0.0), "--sample-fraction must be in (0, 1], got 0.0"),
        (dict(sample_fraction=1.5), "--sample-fraction must be in (0, 1], got 1.5"),
        (dict(sample_size=0), "--sample-size must be in [1, 1000000], got 0"),
        (dict(sample_size=3, over_selection=0.9), "--over-selection must be in [1, 10], got 0.9"),
    ],
)
def test_out_of_range_sampling_values(kw, message):
    with pytest.raises(
        UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]") + "$"
    ):
        SamplingOptions(**kw)


def test_sampling_sets_the_round_target_and_dps_denominator(tmp_path):
    c = _cfg(tmp_path, SamplingOptions(sample_size=4), name="fedadam", clip_norm=1.0, noise_multiplier=1.0)
    c.validate()
    assert c.round_target == 4 and c.strategy.build(c.round_target).expected_participants == 4


def test_cli_renders_the_sampling_flags_and_exits_2_on_a_bad_one(tmp_path):
    import subprocess
    import sys

    from tests.conftest import ROOT

    base = [
        "aggregator",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--rounds",
        "1",
        "--min-devices",
        "2",
        "--state-dir",
        str(tmp_path / "s"),
        "--bundle",
        "b",
    ]
    for extra, want in (
        (["--sample-size", "3", "--sample-fraction", "0.5"], "give one of --sample-size K or --sample-fraction F"),
        (["--sample-fraction", "2"], "--sample-fraction must be in (0, 1], got 2.0"),
        (["--strategy", "fedavg", "--beta1", "0.9"], "--beta1 does not apply to --strategy fedavg; its options: --clip-norm"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "fleetlearn.cli", *base, *extra], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert (
            r.returncode == 2
            and r.stderr.strip().splitlines()[-1].startswith("fleetlearn aggregator: error: ")
            and want in r.stderr
        ), r.stderr
    h = subprocess.run(
        [sys.executable, "-m", "fleetlearn.cli", "aggregator", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert (
        "--sample-size" in h
        and "--over-selection" in h
        and "--beta2" in h
        and "fedavgm: 1.0" in h
        and "fedadam/fedyogi/fedadagrad: 0.01" in h
    )


# ------------------------------------------------------------------ end to end


def _logs(tmp_path, name):
    return (tmp_path / f"{name}.log").read_text(errors="replace")


def test_sampled_rounds_with_real_devices_uninvited_stay_idle_dp_uses_the_real_rate(
    mosquitto, tmp_path, boston_bundle, boston_shards
):
    """3 devices, --sample-size 1 with over-selection 2: each round invites 2 of the 3 connected,
    closes at the first accepted update, the other invited one is told the round closed, and the
    third neither trains nor uploads. dp-fedadam accounts q = 2/3 per round."""
    shards, test_npz = boston_shards
    t = Topics(FLEET)
    status = Recorder(mosquitto.url, [t.all_status], "status")
    devices, names = [], [f"dev-{i}" for i in range(3)]
    try:
        for name, shard in zip(names, shards):
            cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shard, device_id=name)
            devices.append(start_device(cfg, tmp_path / f"{name}.log"))
        status.wait(lambda tp, p: len({tp_ for tp_, _, _ in status.snapshot()}) >= 3, timeout=60)  # all three are online
        state = tmp_path / "agg"
        sigma = 1.0
        agg = AggregatorProcess(
            tmp_path,
            mosquitto.url,
            FLEET,
            state,
            "--rounds",
            "3",
            "--min-devices",
            "1",
            "--deadline",
            "60",
            "--sample-size",
            "1",
            "--over-selection",
            "2",
            "--sample-seed",
            "7",
            "--test-data",
            str(test_npz),
            "--strategy",
            "fedadam",
            "--server-lr",
            "0.01",
            "--clip-norm",
            "5",
            "--dp-noise-multiplier",
            str(sigma),
            bundle=boston_bundle,
        )
        assert agg.wait(180) == 0, agg.text()[-3000:]
        metrics = Recorder(mosquitto.url, [t.metrics], "metrics")
        published = metrics.wait(lambda tp, p: RoundMetrics.decode(p), timeout=30)
        metrics.close()
        time.sleep(1.0)  # let the late ones log their refusals
    finally:
        for proc in devices:
            stop_process(proc)
        status.close()
    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    rates = []
    for r in rounds:
        assert r["strategy"] == "dp-fedadam" and r["connected"] == 3 and len(r["invited"]) == 2 and r["accepted"] == 1
        assert set(r["devices"]) <= set(r["invited"]) and r["closed_by"] == "target"
        rates.append(2 / 3)
        assert r["dp_sampling_rate"] == pytest.approx(2 / 3) and r["dp_expected_participants"] == 1
        assert r["epsilon"] == pytest.approx(dp_epsilon_rates(sigma, rates, 1e-5), rel=1e-9)
        assert r["update_norm"] > 0 and r["update_norm_max"] >= r["update_norm"]
        (outsider,) = set(names) - set(r["invited"])
        text = _logs(tmp_path, outsider)
        assert f"event=not_invited device={outsider} round={r['round']}" in text
        assert f"event=update_sent device={outsider} round={r['round']} " not in text
        (late,) = set(r["invited"]) - set(r["devices"])
        late_text = _logs(tmp_path, late)
        assert any(f"event={e} device={late} round={r['round']}" in late_text for e in ("update_refused", "update_dropped")), (
            late_text[-2000:]
        )
    assert (
        published.round == 3
        and published.invited == tuple(rounds[-1]["invited"])
        and published.update_norm == pytest.approx(rounds[-1]["update_norm"])
    )
    assert "event=round_cohort round=1 invited=2 connected=3 target=1" in agg.text()
    saved = decode_server_state((state / "global" / "server_0003.bin").read_bytes())[2]
    assert sorted(saved) == ["dp_sampling_rates", "m", "v"] and saved["dp_sampling_rates"].tolist() == pytest.approx(rates)


def test_a_restarted_aggregator_keeps_the_rounds_invitations(mosquitto, tmp_path, boston_bundle):
    """Scripted devices on the wire: round 1 invites 3 of 4; one invited device's update is acked,
    the aggregator is SIGKILLed, the fleet changes (an invited device goes offline, a new one comes),
    and the restarted aggregator re-announces the SAME invitation, refuses the outsider and closes
    the round with the cohort it drew before the kill."""
    from tests.test_faults import wait_text

    fleet = "sampled"
    t = Topics(fleet)
    names = ["d-0", "d-1", "d-2", "d-3"]
    peers = {d: Recorder(mosquitto.url, [t.ack(d)], d) for d in [*names, "d-new"]}
    obs = Recorder(mosquitto.url, [t.global_model], "obs")
    for d in names:
        peers[d].client.publish(t.status(d), Status(d, "idle").encode(), qos=1, retain=True).wait_for_publish(5)

    def send(d: str, g: GlobalModel, nonce: str):
        u = Update(g.run_id, g.round, d, g.model_hash, 10, 1.0, 0.01, nonce, np.full(g.weights.size, 0.01, np.float32))
        before = len(peers[d].snapshot())
        peers[d].publish(t.update(d), u.encode())
        peers[d].wait(lambda tp, p: len(peers[d].snapshot()) > before, timeout=60)
        from fleetlearn.edge_runtime.core.protocol import Ack

        return Ack.decode(peers[d].snapshot()[-1][1])

    args = ("--rounds", "1", "--min-devices", "2", "--deadline", "60", "--sample-size", "2", "--over-selection", "1.5")
    state = tmp_path / "state"
    agg = AggregatorProcess(tmp_path, mosquitto.url, fleet, state, *args, bundle=boston_bundle, name="agg-1")
    try:
        g1 = obs.wait(lambda tp, p: p and (g := GlobalModel.decode(p)).round == 1 and g, timeout=60)
        invited = sorted(d for d in names if g1.invite.invites(d))
        assert len(invited) == 3
        first = invited[0]
        nonce = secrets.token_hex(16)
        assert send(first, g1, nonce).accepted
        agg.kill9()
        gone = invited[1]
        peers[gone].client.publish(t.status(gone), Status(gone, "offline").encode(), qos=1, retain=True).wait_for_publish(5)
        peers["d-new"].client.publish(t.status("d-new"), Status("d-new", "idle").encode(), qos=1, retain=True).wait_for_publish(5)
        n_before = len(obs.snapshot())
        agg = AggregatorProcess(tmp_path, mosquitto.url, fleet, state, *args, bundle=boston_bundle, name="agg-2")
        wait_text(agg.text, "event=round_resumed round=1", 60, "aggregator log")
        g1b = obs.wait(lambda tp, p: len(obs.snapshot()) > n_before and p and GlobalModel.decode(p), timeout=60)
        assert g1b.invite == g1.invite and g1b.run_id == g1.run_id
        (outsider,) = set(names) - set(invited)
        refused = send(outsider, g1b, secrets.token_hex(16))
        assert not refused.accepted and refused.reason == f"{outsider} was not invited to round 1"
        assert send(first, g1b, nonce).accepted  # the re-send of the acked update: counted once
        assert send(invited[2], g1b, secrets.token_hex(16)).accepted
        assert agg.wait(60) == 0, agg.text()[-3000:]
    finally:
        agg.stop()
        for p in [obs, *peers.values()]:
            p.close()
    (rec,) = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
    assert rec["invited"] == invited and rec["connected"] == 4 and sorted(rec["devices"]) == sorted([first, invited[2]])
    assert "round_cohort round=1" in agg.text() and "waiting_for_devices" not in agg.text()
