"""Provisioning without a broker: the ACL is the protocol's topic tree, and the credentials
layout is the one every reader uses. The real-mosquitto tests are in tests/test_security_broker.py."""

from __future__ import annotations

import argparse
import inspect
import shutil
import subprocess
from pathlib import Path

import pytest

from fleetlearn.edge_runtime.core.protocol import TOPIC_TREE, Topics
from fleetlearn.provisioning.acl import acl_text
from fleetlearn.provisioning.layout import CredentialsLayout
from fleetlearn.provisioning.spec import MONITOR_USER, spec_from_args

FLEET = "acl-fleet"
DEVICES = ("dev-0", "dev-1", "dev-2")
AGGREGATOR_USER = "agg"
SAMPLE_ARGS = {"device_id": DEVICES[1], "model_hash": "ab" * 32, "index": 3}


def spec(tmp_path: Path, monitor: bool = True):
    args = argparse.Namespace(
        fleet=FLEET,
        devices=",".join(DEVICES),
        aggregator_user=AGGREGATOR_USER,
        monitor=monitor,
        out=tmp_path / "out",
        broker_dir=None,
        tls=False,
        host="localhost",
        port=None,
        bind=None,
        run_as=None,
        force=False,
        signing_keys=False,
    )
    return spec_from_args(args)


def parse_acl(text: str) -> dict[str, list[tuple[str, str]]]:
    users: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        word, *rest = line.split()
        if word == "user":
            current = rest[0]
            assert current not in users, f"user {current} has two blocks"
            users[current] = []
        else:
            assert word == "topic" and current is not None and len(rest) == 2 and rest[0] in ("read", "write", "readwrite"), line
            users[current].append((rest[0], rest[1]))
    return users


def matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching, as mosquitto applies ACL lines: `+` one level, `#` the rest (or none)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


def protocol_topics(topics: Topics, device: str | None = None) -> dict[str, str]:
    """Every concrete topic the Topics class can name, found by introspection: a topic type added
    to Topics appears here without editing this test. name -> topic."""
    out = {}
    for name, member in inspect.getmembers(type(topics)):
        if name.startswith("_") or name in ("base", "fleet", "root", "device_of", "grants"):
            continue
        if isinstance(member, property):
            topic = getattr(topics, name)
        elif callable(member):
            params = list(inspect.signature(member).parameters)[1:]
            topic = getattr(topics, name)(*[(device or SAMPLE_ARGS[p]) if p == "device_id" else SAMPLE_ARGS[p] for p in params])
        else:
            continue
        if isinstance(topic, str) and "+" not in topic and "#" not in topic:  # filters are not topics
            out[name] = topic
    return out


def access(lines: list[tuple[str, str]], topic: str) -> set[str]:
    got: set[str] = set()
    for kind, pattern in lines:
        if matches(pattern, topic):
            got |= {"read", "write"} if kind == "readwrite" else {kind}
    return got


def expected(topic: str, role: str, base: str) -> set[str]:
    """What the protocol's topic tree says `role` may do on `topic` (a device: on its own topics)."""
    out: set[str] = set()
    for rule in TOPIC_TREE:
        if matches(f"{base}/{rule.path.replace('{device}', '+')}", topic):
            out |= ({"read"} if role in rule.readers else set()) | ({"write"} if role == rule.writer else set())
    return out


def test_the_acl_grants_exactly_the_protocols_topics_per_role(tmp_path):
    s = spec(tmp_path)
    users = parse_acl(acl_text(s))
    assert set(users) == {AGGREGATOR_USER, MONITOR_USER, *DEVICES}
    topics = Topics(FLEET)
    every = {**protocol_topics(topics), **{f"{k}@{d}": v for d in DEVICES for k, v in protocol_topics(topics, d).items()}}
    assert {"global_model", "round", "metrics", "bundle", "bundle_chunk", "update", "ack", "status"} <= set(
        protocol_topics(topics)
    )

    for name, topic in every.items():
        # Every topic of the protocol is in its topic tree, and someone writes it and someone reads it.
        assert any(matches(f"{topics.base}/{r.path.replace('{device}', '+')}", topic) for r in TOPIC_TREE), (
            f"Topics.{name} ({topic}) is not in TOPIC_TREE"
        )
        writers = [u for u, lines in users.items() if "write" in access(lines, topic)]
        readers = [u for u, lines in users.items() if "read" in access(lines, topic)]
        assert writers and readers, f"{topic}: no one may write ({writers}) or read ({readers}) it"
        # Each role gets what the tree says; a device only on its own per-device topics.
        assert access(users[AGGREGATOR_USER], topic) == expected(topic, "aggregator", topics.base), topic
        assert access(users[MONITOR_USER], topic) == {"read"}, topic
        for device in DEVICES:
            want = expected(topic, "device", topics.base)
            own = topic.rsplit("/", 1)[-1] == device
            per_device = any(
                r.per_device and matches(f"{topics.base}/{r.path.replace('{device}', '+')}", topic) for r in TOPIC_TREE
            )
            assert access(users[device], topic) == (want if own or not per_device else set()), (device, topic)

    # No line grants a topic the protocol does not have.
    for user, lines in users.items():
        for kind, pattern in lines:
            assert any(matches(pattern, t) for t in every.values()), f"{user}: `{kind} {pattern}` matches no protocol topic"
            assert pattern.startswith(topics.base + "/"), pattern
    # The roles, in words: the aggregator never writes an update or a status; a device never
    # writes the model, the round or another device's anything.
    assert "write" not in access(users[AGGREGATOR_USER], topics.update("dev-0")) | access(
        users[AGGREGATOR_USER], topics.status("dev-0")
    )
    for t in (
        topics.global_model,
        topics.round,
        topics.metrics,
        topics.bundle,
        topics.update("dev-1"),
        topics.status("dev-1"),
        topics.ack("dev-0"),
    ):
        assert "write" not in access(users["dev-0"], t), t
    assert access(users["dev-0"], topics.ack("dev-1")) == set()
    for t in (topics.global_model, topics.round, topics.bundle, topics.bundle_chunk("ab" * 32, 0), topics.ack("dev-0")):
        assert "read" in access(users["dev-0"], t), t
    assert access(users["dev-0"], topics.update("dev-0")) == access(users["dev-0"], topics.status("dev-0")) == {"write"}
    assert (
        access(users[AGGREGATOR_USER], topics.update("dev-2"))
        == access(users[AGGREGATOR_USER], topics.status("dev-2"))
        == {"read"}
    )
    assert access(users[AGGREGATOR_USER], topics.ack("dev-2")) == {"write"}


def test_the_acl_without_a_monitor_has_no_monitor_user(tmp_path):
    assert MONITOR_USER not in parse_acl(acl_text(spec(tmp_path, monitor=False)))


def test_the_credentials_layout_is_what_broker_config_writes_and_flash_reads(tmp_path):
    from fleetlearn.cli import main as fleetlearn_main
    from fleetlearn.provisioning import credentials

    out = tmp_path / "fleet"
    assert (
        fleetlearn_main(
            [
                "broker-config",
                "--fleet",
                "f",
                "--devices",
                "dev-0,dev-1",
                "--out",
                str(out),
                "--max-model-params",
                "100",
                "--monitor",
                "--tls",
                "--signing-keys",
            ]
        )
        == 0
    )
    layout = CredentialsLayout(out)
    named = [
        layout.mosquitto_conf,
        layout.passwd,
        layout.acl,
        layout.readme,
        layout.ca_cert,
        layout.ca_key,
        layout.server_cert,
        layout.server_key,
        layout.aggregator_password,
        layout.monitor_password,
        layout.aggregator_signing_key,
        layout.aggregator_signing_pub,
        layout.mosquitto_unit("f"),
        layout.aggregator_unit("f"),
    ]
    for d in ("dev-0", "dev-1"):
        named += [
            layout.device_password(d),
            layout.device_signing_key(d),
            layout.device_signing_pub(d),
            layout.device_key_registration(d),
        ]
    written = {p for p in out.rglob("*") if p.is_file()}
    assert written == set(named), f"written but not in the layout: {sorted(map(str, written - set(named)))}"
    assert layout.data.is_dir() and layout.device_keys_dir.is_dir()
    # flash picks this device's files by the same names...
    files = credentials.collect(out, "dev-1")
    assert files[credentials.MQTT_PASSWORD] == layout.device_password("dev-1").read_bytes()
    assert files[credentials.SIGNING_KEY] == layout.device_signing_key("dev-1").read_bytes()
    assert files[credentials.AGGREGATOR_PUB] == layout.aggregator_signing_pub.read_bytes()
    assert files[credentials.CA_CERT] == layout.ca_cert.read_bytes()
    # ...and the README points the operator at them.
    readme = layout.readme.read_text()
    for p in (layout.aggregator_password, layout.device_keys_dir):
        assert str(p.relative_to(out)) in readme or str(p) in readme, p


def test_provisioning_modules_stay_small():
    root = Path(__file__).resolve().parent.parent
    for folder in ("provisioning", "edge_runtime/core/protocol"):
        for path in (root / folder).glob("*.py"):
            lines = len(path.read_text(encoding="utf-8").splitlines())
            assert lines <= 450, f"{path.relative_to(root)} has {lines} lines (the limit is 450)"


@pytest.mark.parametrize("flag", ["--bundle", "--max-model-params"])
def test_broker_config_is_one_subcommand_module(flag):
    from fleetlearn.cli import COMMANDS

    module = __import__(COMMANDS["broker-config"][0], fromlist=["run"])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    assert flag in parser.format_help() and module.__name__ == "fleetlearn.provisioning.broker_config"


# ---------------------------------------------------------------- systemd units


def _systemd_verify(units: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True, timeout=60, cwd=units[0].parent
    )


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (no systemd on this machine)"
)
@pytest.mark.parametrize("tls", [False, True])
def test_broker_config_writes_hardened_units_that_systemd_analyze_verifies(tmp_path, tls):
    from fleetlearn.cli import main as fleetlearn_main

    out = tmp_path / "fleet"
    args = [
        "broker-config",
        "--fleet",
        "f",
        "--devices",
        "dev-0",
        "--out",
        str(out),
        "--max-model-params",
        "100",
        "--service-port",
        "9999",
    ]
    assert fleetlearn_main(args + (["--tls"] if tls else [])) == 0
    layout = CredentialsLayout(out)
    units = [layout.mosquitto_unit("f"), layout.aggregator_unit("f")]
    # The check itself is live: a unit with an unknown key and a missing binary is reported.
    broken = tmp_path / "broken.service"
    broken.write_text("[Service]\nExecStart=/nonexistent/fleetlearn\nProtectSystm=strict\n")
    bad = _systemd_verify([broken])
    assert "ProtectSystm" in bad.stderr and "/nonexistent/fleetlearn" in bad.stderr, bad.stderr
    r = _systemd_verify(units)
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
    for unit in units:
        text = unit.read_text()
        for line in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=", "PrivateTmp=yes"):
            assert f"\n{line}\n" in text, (unit.name, line)
    agg = units[1].read_text()
    assert "\nStateDirectory=fleetlearn/f\n" in agg and "--state-dir ${STATE_DIRECTORY}" in agg
    assert (
        f"LoadCredential=mqtt-password:{layout.aggregator_password}" in agg
        and "--password-file ${CREDENTIALS_DIRECTORY}/mqtt-password" in agg
    )
    assert ("mqtts" if tls else "mqtt") + "://127.0.0.1:9999 " in agg  # the service listener
    assert ("--ca-file ${CREDENTIALS_DIRECTORY}/ca.crt" in agg) == tls
    mosq = units[0].read_text()
    assert f"-c {layout.mosquitto_conf}" in mosq and f"\nReadWritePaths={layout.data}\n" in mosq
