"""The Raspberry Pi path, proven on this x86_64 machine: `fleetlearn flash --profile
raspberry-pi-4` writes an image with aarch64 wheels from PyPI; its install.sh installs it offline
in an arm64 Debian 12 root (tests/arm64_root.py: qemu-user via binfmt_misc, chroot, no
systemd); the installed agent, emulated, joins real rounds against mosquitto on the host's
loopback beside an x86_64 device process, with a real aggregator.

Emulation is slow (numerical code ~360x, Python ~10x), so the emulated work is small: the Boston
MLP, a shard of ~100 rows, three rounds. The test needs root (mounts, chroot, binfmt_misc) and
Debian's qemu-user-static, binfmt-support, mmdebstrap and zstd (`make test` installs them); where
that is impossible it skips and says why. The arm64 root and the aarch64 wheels are cached under
/var/cache/fleetlearn, so only the first run downloads (minutes); later runs are offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests import arm64_root
from tests.conftest import stop_process
from tests.peers import Peer
from tests.procs import AggregatorProcess
from tests.test_device import FLEET, start_device, write_config
from tests.test_flash_support import flash_ok

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(2400)]
PROFILE = "raspberry-pi-4"
PI_DEVICE, X86_DEVICE = "pi4-emulated", "x86-native"
ROUNDS = 3
DEBIAN12_AARCH64 = ("raspberry-pi-4", "raspberry-pi-5", "raspberry-pi-zero-2w", "generic-aarch64")


@pytest.fixture(scope="session")
def arm64(tmp_path_factory):
    """A fresh arm64 Debian 12 root for this session (built once into the cache, then unpacked)."""
    try:
        arm64_root.ensure_binfmt()
    except arm64_root.Unavailable as exc:
        pytest.skip(f"cannot emulate arm64 here: {exc}")
    t0 = time.monotonic()
    tarball, built = arm64_root.ensure_tarball(log=lambda msg: print(msg, flush=True))
    t1 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="fleetlearn-arm64-", dir="/var/tmp"))
    try:
        with arm64_root.Arm64Root(work, tarball) as root:
            root.setup_s = {
                "cache": "cold" if built else "warm",
                "tarball_s": round(t1 - t0, 1),
                "unpack_mount_s": round(time.monotonic() - t1, 1),
            }
            yield root
    finally:
        arm64_root.remove_unmounted(work)  # refuses to delete through a mount left behind


@pytest.fixture(scope="session")
def project_wheel(tmp_path_factory) -> Path:
    from fleetlearn.firmware_configs import wheels

    return wheels.build_project_wheel(wheels.project_root(), tmp_path_factory.mktemp("project-wheel"))


@pytest.fixture(scope="session")
def aarch64_wheelhouse(project_wheel) -> Path:
    """The raspberry-pi-4 image's dependency wheels, resolved by flash's own code for aarch64 and
    downloaded once into /var/cache/fleetlearn/wheels/ (keyed by the requirement set)."""
    return arm64_root.cached_wheelhouse(project_wheel, PROFILE)


def _statuses(peer: Peer) -> dict[str, list[dict]]:
    """Every status message the peer saw, by device id."""
    out: dict[str, list[dict]] = {}
    while not peer.messages.empty():
        topic, payload, _ = peer.messages.get_nowait()
        if "/status/" in topic:
            out.setdefault(topic.rsplit("/", 1)[1], []).append(json.loads(payload))
    return out


def test_pi4_image_installs_and_trains_in_emulated_arm64_beside_x86(
    arm64, project_wheel, aarch64_wheelhouse, mosquitto, boston_bundle, boston_shards, tmp_path
):
    shards, test_npz = boston_shards
    image = arm64.path / "tmp" / "pi4-image"
    proc = flash_ok(
        "--profile",
        PROFILE,
        "--bundle",
        boston_bundle,
        f"--device-id={PI_DEVICE}",
        "--broker",
        mosquitto.url,  # the host's loopback: the chroot shares its network namespace
        "--fleet",
        FLEET,
        "--wheel",
        project_wheel,
        "--wheelhouse",
        aarch64_wheelhouse,
        "--set",
        "training.threads=1",
        "--out",
        image,
    )
    assert "engine: portable" in proc.stdout and "verified: emulated" in proc.stdout, proc.stdout
    wheel_names = sorted(p.name for p in (image / "wheels").iterdir())
    assert any(w.startswith("onnxruntime-") and w.endswith("_aarch64.whl") for w in wheel_names), wheel_names
    assert not any(w.startswith(("onnxruntime_training", "torch")) or "x86_64" in w for w in wheel_names), wheel_names
    info = json.loads((image / "image.json").read_text())
    assert info["engine"] == {"configured": "portable", "installed": "portable"} and info["verified"]["how"] == "emulated"

    # install.sh inside the root, as root, offline, on a machine without systemd.
    t0 = time.monotonic()
    install = arm64.run("sh", "/tmp/pi4-image/install.sh", timeout=1200)
    install_s = time.monotonic() - t0
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "skipped the systemd unit (no systemctl on this machine)" in install.stdout, install.stdout
    assert "installed the agent with the portable engine (onnxruntime " in install.stdout, install.stdout
    assert "trimmed from the venv: pip, setuptools, numpy's tests, onnxruntime's C library" in install.stdout, install.stdout
    prefix = arm64.path / "opt" / "fleetlearn"
    machine = arm64.run(
        "/opt/fleetlearn/venv/bin/python",
        "-c",
        "import platform, onnxruntime; print(platform.machine(), onnxruntime.__version__)",
    )
    assert machine.returncode == 0 and machine.stdout.split()[0] == "aarch64", machine.stdout + machine.stderr
    no_training = arm64.run("/opt/fleetlearn/venv/bin/python", "-c", "import torch")
    assert no_training.returncode != 0 and "No module named 'torch'" in no_training.stderr
    installed_mb = sum(p.stat().st_size for p in prefix.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6
    print(
        f"arm64 root set-up {arm64.setup_s}; install.sh under emulation {install_s:.0f} s; installed prefix {installed_mb:.0f} MB",
        flush=True,
    )

    # A small shard for the emulated device, a normal one for the x86_64 device.
    with np.load(shards[0]) as d:
        np.savez(prefix / "data" / "train.npz", x=d["x"][:100], y=d["y"][:100])
    state = tmp_path / "agg"
    peer = Peer(mosquitto.url, [f"fleetlearn/{FLEET}/status/+"])
    agg = AggregatorProcess(
        tmp_path,
        mosquitto.url,
        FLEET,
        state,
        "--rounds",
        str(ROUNDS),
        "--min-devices",
        "2",
        "--deadline",
        "600",
        "--test-data",
        str(test_npz),
        bundle=boston_bundle,
    )
    pi_log = open(tmp_path / "pi.log", "wb")
    pi = arm64.popen(
        "/opt/fleetlearn/venv/bin/fleetlearn",
        "device",
        "--config",
        "/opt/fleetlearn/device.toml",
        "--max-rounds",
        str(ROUNDS),
        stdout=pi_log,
        stderr=subprocess.STDOUT,
    )
    x86_cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[1], device_id=X86_DEVICE)
    x86 = start_device(x86_cfg, tmp_path / "x86.log", "--max-rounds", str(ROUNDS))

    def logs() -> str:
        return (
            "\n".join(f"--- {n}\n{(tmp_path / n).read_text(errors='replace')[-3000:]}" for n in ("pi.log", "x86.log"))
            + f"\n--- aggregator\n{agg.text()[-3000:]}"
        )

    # The device process on this machine is qemu running an aarch64 Python (binfmt_misc's interpreter).
    time.sleep(1.0)
    exe = os.readlink(f"/proc/{pi.pid}/exe") if pi.poll() is None else "(exited)"
    try:
        assert "aarch64" in exe, f"the emulated device runs as {exe}, not under qemu-aarch64\n{logs()}"
        assert agg.wait(1500) == 0, logs()
        assert pi.wait(120) == 0, logs()
        assert x86.wait(60) == 0, logs()
    finally:
        for p in (pi, x86):
            stop_process(p)
        agg.stop()
        pi_log.close()
        peer.client.loop_stop()
        peer.client.disconnect()

    rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines() if line.strip()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1)), logs()
    assert all(r["devices"] == sorted([PI_DEVICE, X86_DEVICE]) and r["rejected"] == 0 for r in rounds), (rounds, logs())
    assert rounds[-1]["test_mse"] < rounds[0]["test_mse"], rounds
    # Each device says which engine trains there and on what CPU (Status.engine / Status.arch,
    # retained on status/<device>): the Pi image's portable engine on aarch64 under emulation,
    # beside this checkout's venv, where "auto" picks onnxruntime-training on x86_64.
    statuses = _statuses(peer)
    assert any(s.get("engine") == "portable" and s.get("arch") == "aarch64" for s in statuses.get(PI_DEVICE, [])), (
        statuses,
        logs(),
    )
    assert any(s.get("engine") == "ort-training" and s.get("arch") == "x86_64" for s in statuses.get(X86_DEVICE, [])), (
        statuses,
        logs(),
    )
    assert "engine=portable" in (tmp_path / "pi.log").read_text(), logs()


def test_debian12_aarch64_profiles_carry_the_same_wheels(project_wheel, aarch64_wheelhouse, boston_bundle, tmp_path):
    """What makes the other Debian 12 aarch64 profiles' `verified = "emulated"` honest: their
    images carry exactly the wheels the emulated raspberry-pi-4 image installed and trained with."""
    sets = {}
    for name in DEBIAN12_AARCH64:
        out = tmp_path / name
        flash_ok(
            "--profile",
            name,
            "--bundle",
            boston_bundle,
            "--device-id=d1",
            "--broker",
            "mqtt://127.0.0.1:1883",
            "--wheel",
            project_wheel,
            "--wheelhouse",
            aarch64_wheelhouse,
            "--out",
            out,
        )
        sets[name] = sorted(p.name for p in (out / "wheels").iterdir())
        assert (out / "requirements.txt").read_text() == (tmp_path / DEBIAN12_AARCH64[0] / "requirements.txt").read_text()
    assert all(s == sets[PROFILE] for s in sets.values()), sets
