"""FedAvgM (server momentum): the update rule against hand-computed steps, its cross-round state
through the model store's real commit; and a real aggregator SIGKILLed mid-run that ends with
the bit-identical weights of an uninterrupted run given the same arrivals, for fedavgm and fedadam."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.aggregator.fedavg import FedAvg
from fleetlearn.aggregator.fedavgm import FedAvgM, FedAvgMOptions, momentum_step
from fleetlearn.aggregator.model_store import ModelStore, StateError, decode_server_state
from fleetlearn.aggregator.registry import make_strategy
from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, Topics, Update
from tests.peers import Recorder
from tests.procs import AggregatorProcess
from tests.test_faults import wait_text


def _u(delta, samples, device="d", rnd=1) -> Update:
    return Update(
        run_id="a" * 32,
        round=rnd,
        device_id=device,
        model_hash="b" * 64,
        samples=samples,
        train_loss=1.0,
        train_s=0.1,
        nonce=secrets.token_hex(16),
        delta=np.asarray(delta, np.float32),
    )


def _round(s, rnd, w, updates):
    s.begin_round(rnd, w)
    for u in updates:
        s.accumulate(u)
    return s.step(w, s.aggregate())


# eta = 0.5, beta = 0.9, w0 = (1, -2). Worked by hand:
#   r1: a (0.5, 1) n=1, b (-0.25, 0) n=3 -> Delta = (0.5 - 0.75, 1) / 4 = (-0.0625, 0.25)
#       v1 = Delta = (-0.0625, 0.25);               w1 = w0 + 0.5 v1 = (0.96875, -1.875)
#   r2: (0.125, -0.5) n=2 -> Delta = (0.125, -0.5)
#       v2 = 0.9 v1 + Delta = (0.06875, -0.275);    w2 = w1 + 0.5 v2 = (1.003125, -2.0125)
#   r3: (0, 0) n=5 -> Delta = 0 (momentum alone moves the model)
#       v3 = 0.9 v2 = (0.061875, -0.2475);          w3 = w2 + 0.5 v3 = (1.0340625, -2.13625)
HAND = [
    ([([0.5, 1.0], 1), ([-0.25, 0.0], 3)], (-0.0625, 0.25), (0.96875, -1.875)),
    ([([0.125, -0.5], 2)], (0.06875, -0.275), (1.003125, -2.0125)),
    ([([0.0, 0.0], 5)], (0.061875, -0.2475), (1.0340625, -2.13625)),
]


def test_fedavgm_pinned_against_hand_computed_steps():
    s = make_strategy("fedavgm", server_lr=0.5, server_momentum=0.9)
    assert type(s) is FedAvgM and s.state_dict() == {}  # v_0 = 0, nothing to persist yet
    w = np.array([1.0, -2.0], np.float32)
    for rnd, (updates, v_want, w_want) in enumerate(HAND, start=1):
        w = _round(s, rnd, w, [_u(d, n, f"d{i}", rnd) for i, (d, n) in enumerate(updates)])
        assert w.dtype == np.float32
        np.testing.assert_allclose(w, np.array(w_want, np.float32), rtol=0, atol=1e-7)
        np.testing.assert_allclose(s.state_dict()["velocity"], v_want, rtol=1e-12, atol=1e-15)
        assert s.state_dict()["velocity"].dtype == np.float64


def test_beta_zero_eta_one_is_fedavg_bit_for_bit():
    rng = np.random.default_rng(7)
    w = rng.normal(size=200).astype(np.float32)
    m, f = FedAvgM(FedAvgMOptions(server_lr=1.0, server_momentum=0.0)), FedAvg()
    for rnd in (1, 2, 3):
        ups = [_u(rng.normal(0, 0.1, 200), int(rng.integers(1, 50)), f"d{i}", rnd) for i in range(4)]
        wm, wf = _round(m, rnd, w, ups), _round(f, rnd, w, ups)
        assert wm.tobytes() == wf.tobytes()
        w = wf


def test_momentum_step_is_the_docstring_formula():
    w, v, d = np.array([1.0], np.float32), np.array([2.0]), np.array([0.5])
    new_w, new_v = momentum_step(w, v, d, server_lr=0.1, momentum=0.5)
    assert new_v[0] == 0.5 * 2.0 + 0.5 and new_w[0] == np.float32(1.0 + 0.1 * 1.5)
    assert v[0] == 2.0 and w[0] == 1.0  # inputs untouched


def test_server_state_commits_with_the_weights_and_survives_a_restart(tmp_path):
    """Rounds 1-2 committed through the real ModelStore, reopened (a restart), round 3 resumed
    with a fresh strategy: the bytes of an uninterrupted run."""
    P, hash_ = 50, "ab" * 32
    rng = np.random.default_rng(3)
    w0 = rng.normal(size=P).astype(np.float32)
    rounds = [[_u(rng.normal(0, 0.2, P), int(rng.integers(1, 30)), f"d{i}", r) for i in range(3)] for r in (1, 2, 3)]

    whole = FedAvgM(FedAvgMOptions(server_lr=0.7, server_momentum=0.9))
    w = w0
    for r, ups in enumerate(rounds, start=1):
        w = _round(whole, r, w, ups)

    store = ModelStore.open(tmp_path / "s", hash_, P, lambda: w0)
    a = FedAvgM(FedAvgMOptions(server_lr=0.7, server_momentum=0.9))
    a.load_state_dict(store.server_state)
    for r in (1, 2):
        new_w = _round(a, r, store.weights, rounds[r - 1])
        store.commit(r, new_w, {"round": r}, {}, a.state_dict())
    assert (tmp_path / "s" / "global" / "server_0002.bin").exists()
    # A crash after round 3's weights and server state were written, before state.json named them:
    b0 = FedAvgM(FedAvgMOptions(server_lr=0.7, server_momentum=0.9))
    b0.load_state_dict(store.server_state)
    orphan = _round(b0, 3, store.weights, rounds[2][:1])
    store._write_weights(3, orphan)
    store._write_server_state(3, b0.state_dict())

    again = ModelStore.open(tmp_path / "s", hash_, P, lambda: w0)
    assert again.round == 2 and again.server_state["velocity"].tobytes() == a.state_dict()["velocity"].tobytes()
    b = FedAvgM(FedAvgMOptions(server_lr=0.7, server_momentum=0.9))
    b.load_state_dict(again.server_state)
    got = _round(b, 3, again.weights, rounds[2])
    assert got.tobytes() == w.tobytes()

    # Another strategy on this state dir is refused, and a tampered server file is caught.
    with pytest.raises(ValueError, match="velocity"):
        FedAvg().load_state_dict(again.server_state)
    path = tmp_path / "s" / "global" / "server_0002.bin"
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(StateError, match="sha256"):
        ModelStore.open(tmp_path / "s", hash_, P, lambda: w0)


# ------------------------------------------------------------------ a real aggregator, SIGKILLed

FLEET = "fedavgm"
T = Topics(FLEET)
ROUNDS = 4
SAMPLES = {"dev-a": 7, "dev-b": 19}


def _delta(device: str, rnd: int, size: int) -> np.ndarray:
    """What each scripted device sends in each round: fixed, whatever the global model."""
    return np.random.default_rng([rnd, 1 if device == "dev-a" else 2]).normal(0, 0.05, size).astype(np.float32)


class _Fleet:
    """Two scripted devices and an observer on the broker; each update waits for its ack, so
    both runs see the same arrivals in the same order."""

    def __init__(self, url: str):
        self.obs = Recorder(url, [T.global_model], "obs")
        self.dev = {d: Recorder(url, [T.ack(d)], d) for d in SAMPLES}
        self.sent: dict[tuple[str, int], Update] = {}

    def global_model(self, rnd: int) -> GlobalModel:
        return self.obs.wait(lambda t, p: p and (g := GlobalModel.decode(p)).round == rnd and g, timeout=60)

    def send(self, device: str, g: GlobalModel) -> Ack:
        """Publish the device's update for g's round (the same bytes when re-sent) and wait for a new ack."""
        u = self.sent.get((device, g.round))
        if u is None or u.run_id != g.run_id:
            u = Update(
                run_id=g.run_id,
                round=g.round,
                device_id=device,
                model_hash=g.model_hash,
                samples=SAMPLES[device],
                train_loss=1.0,
                train_s=0.01,
                nonce=secrets.token_hex(16),
                delta=_delta(device, g.round, g.weights.size),
            )
            self.sent[(device, g.round)] = u
        rec = self.dev[device]

        def acks() -> list[Ack]:
            return [a for _, p, _ in rec.snapshot() if (a := Ack.decode(p)).nonce == u.nonce]

        before = len(acks())
        rec.publish(T.update(device), u.encode())
        rec.wait(lambda t, p: len(acks()) > before, timeout=60)
        ack = acks()[-1]
        assert ack.accepted, ack.reason
        return ack

    def close(self) -> None:
        for r in (self.obs, *self.dev.values()):
            r.close()


# strategy -> its flags, and numpy's step (w, state, Delta) -> (w', state) to check the result independently.
SERVER_OPTS = {
    "fedavgm": (
        ["--server-lr", "0.8", "--server-momentum", "0.9"],
        lambda w, st, d: (w + 0.8 * (v := 0.9 * st.get("velocity", 0.0) + d), {"velocity": v}),
    ),
    "fedadam": (
        ["--server-lr", "0.01", "--beta1", "0.9", "--beta2", "0.99", "--tau", "0.001"],
        lambda w, st, d: (
            w + 0.01 * (m := 0.9 * st.get("m", 0.0) + 0.1 * d) / (np.sqrt(v := 0.99 * st.get("v", 1e-6) + 0.01 * d * d) + 1e-3),
            {"m": m, "v": v},
        ),
    ),
}


def _args(strategy: str) -> list[str]:
    return [
        "--rounds",
        str(ROUNDS),
        "--min-devices",
        "2",
        "--target-devices",
        "2",
        "--deadline",
        "60",
        "--strategy",
        strategy,
        *SERVER_OPTS[strategy][0],
    ]


def _weights(state: Path, rnd: int) -> np.ndarray:
    return np.fromfile(state / "global" / f"round_{rnd:04d}.f32", dtype="<f4")


@pytest.mark.parametrize("strategy", sorted(SERVER_OPTS))
def test_sigkill_mid_run_restart_ends_bit_identical_to_an_uninterrupted_run(strategy, mosquitto, boston_bundle, tmp_path):
    n = load_bundle(boston_bundle).num_params
    runs = {}
    for name in ("whole", "killed"):
        state = tmp_path / name
        fleet = _Fleet(mosquitto.url)
        agg = AggregatorProcess(tmp_path, mosquitto.url, FLEET, state, *_args(strategy), bundle=boston_bundle, name=f"{name}-1")
        try:
            for rnd in range(1, ROUNDS + 1):
                g = fleet.global_model(rnd)
                fleet.send("dev-a", g)
                if name == "killed" and rnd == 3:
                    # Rounds 1-2 committed (with their momentum), dev-a's round-3 update acked: kill -9.
                    agg.kill9()
                    assert (state / "partial_round.bin").exists() and (state / "global" / "server_0002.bin").exists()
                    agg = AggregatorProcess(
                        tmp_path, mosquitto.url, FLEET, state, *_args(strategy), bundle=boston_bundle, name=f"{name}-2"
                    )
                    wait_text(agg.text, "event=round_open round=3", 60, "aggregator log")
                    ack = fleet.send("dev-a", g)  # the device re-sends when the round is re-announced: counted once
                    assert "counted once" in ack.reason
                fleet.send("dev-b", g)
            assert agg.wait(60) == 0, agg.text()[-3000:]
            final = fleet.global_model(ROUNDS + 1)
            assert not final.train
        finally:
            agg.stop()
            fleet.close()
        runs[name] = (state, final, agg.text())

    (sw, fw, _), (sk, fk, text) = runs["whole"], runs["killed"]
    assert "event=round_resumed round=3" in text and "resumed_after=2" in text
    assert _weights(sk, ROUNDS).tobytes() == _weights(sw, ROUNDS).tobytes() == fw.weights.tobytes() == fk.weights.tobytes()
    # ... and it is the server optimizer, not FedAvg: numpy's rule over the same arrivals.
    w, st = _weights(sw, 0).astype(np.float64), {}
    for rnd in range(1, ROUNDS + 1):
        delta = sum(SAMPLES[d] * _delta(d, rnd, n).astype(np.float64) for d in SAMPLES) / sum(SAMPLES.values())
        w, st = SERVER_OPTS[strategy][1](w.astype(np.float32).astype(np.float64), st, delta)
    np.testing.assert_allclose(_weights(sw, ROUNDS), w.astype(np.float32), rtol=1e-5, atol=1e-6)
    # Telemetry: the sample-weighted mean and the max of the raw delta norms, also for round 3,
    # whose first update was counted before the kill (the norms persist with the open round).
    for rec in (json.loads(line) for line in (sk / "rounds.jsonl").read_text().splitlines()):
        norms = {d: float(np.linalg.norm(_delta(d, rec["round"], n).astype(np.float64))) for d in SAMPLES}
        assert rec["update_norm"] == pytest.approx(sum(SAMPLES[d] * norms[d] for d in SAMPLES) / sum(SAMPLES.values()), rel=1e-12)
        assert rec["update_norm_max"] == pytest.approx(max(norms.values()), rel=1e-12)
    saved = decode_server_state((sk / "global" / f"server_{ROUNDS:04d}.bin").read_bytes())[2]
    assert sorted(saved) == sorted(st) and all(np.allclose(saved[k], st[k], rtol=1e-4, atol=1e-9) for k in st)
    plain = _weights(sw, 0).astype(np.float64) + sum(
        sum(SAMPLES[d] * _delta(d, r, n).astype(np.float64) for d in SAMPLES) / 26 for r in range(1, ROUNDS + 1)
    )
    assert np.abs(_weights(sw, ROUNDS) - plain).max() > 1e-3
