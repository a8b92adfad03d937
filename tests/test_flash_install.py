"""End to end: flash generic-x86_64, run the image's install.sh into a temporary prefix (a fresh
venv without torch), then run the installed agent for one real round against mosquitto and the
aggregator. Nothing is mocked; the only shortcut is a session wheelhouse, so install.sh runs
offline from the image's own wheels exactly as on a device without network."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, stop_process
from tests.test_flash_support import clean_env, flash_ok, systemd_analyze, x86_wheelhouse  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]
FLEET = "flashtest"
DEVICE = "pi-kitchen-01"


def test_flash_install_and_train_one_round(tmp_path, mosquitto, boston_bundle, boston_shards, x86_wheelhouse):  # noqa: F811
    shards, test_npz = boston_shards
    image = tmp_path / "image"
    prefix = tmp_path / "opt"
    flash_ok(
        "--profile",
        "generic-x86_64",
        "--bundle",
        boston_bundle,
        f"--device-id={DEVICE}",
        "--broker",
        mosquitto.url,
        "--fleet",
        FLEET,
        "--wheelhouse",
        x86_wheelhouse,
        # Inside the flashed prefix, so install.sh's prefix rewrite moves it under tmp_path
        # (the profile's /var/lib/fleetlearn/state would escape the test's directory).
        "--set",
        "state_dir=/opt/fleetlearn/state",
        "--set",
        "training.threads=1",
        "--out",
        image,
    )
    wheels = sorted(p.name for p in (image / "wheels").iterdir())
    assert any(w.startswith("onnxruntime_training-1.19.2-") for w in wheels), wheels
    assert not any(w.startswith("torch") for w in wheels)

    # install.sh: `sh` like a device's dash; python3 must be 3.11 (the wheels are cp311).
    python = shutil.which("python3.11") or shutil.which("python3")
    install = subprocess.run(
        ["sh", str(image / "install.sh"), "--prefix", str(prefix), "--no-systemd", "--python", python],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "skipped the systemd unit (--no-systemd)" in install.stdout
    assert "installed the agent with the ort-training engine (onnxruntime 1.19.2)" in install.stdout

    venv_py = prefix / "venv" / "bin" / "python"
    no_torch = subprocess.run([str(venv_py), "-c", "import torch"], capture_output=True, text=True, cwd=tmp_path, env=clean_env())
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    where = subprocess.run(
        [str(venv_py), "-c", "import fleetlearn.edge_runtime as e; print(e.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert where.stdout.startswith(str(prefix / "venv")), where.stdout  # the installed copy, not this checkout

    # Paths were rewritten from /opt/fleetlearn to the test prefix, and the config loads on the device side.
    toml = (prefix / "device.toml").read_text()
    assert "/opt/fleetlearn" not in toml
    check = subprocess.run(
        [
            str(venv_py),
            "-c",
            "import sys; from fleetlearn.edge_runtime.device.config import load_device_config as l; c = l(sys.argv[1]); print(c.bundle, c.state_dir, c.data)",
            str(prefix / "device.toml"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert check.stdout.split() == [str(prefix / "bundle/current"), str(prefix / "state"), str(prefix / "data/train.npz")], (
        check.stderr
    )
    unit = prefix / "fleetlearn-device.service"
    assert f"ExecStart={prefix}/venv/bin/fleetlearn device --config {prefix}/device.toml" in unit.read_text()
    analyze = systemd_analyze()
    if analyze is not None:  # without it, test_flash_render.py's skip says why
        verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
        assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), verify.stdout + verify.stderr

    # One real round: the aggregator (this checkout) and the installed agent (the venv).
    shutil.copyfile(shards[0], prefix / "data" / "train.npz")
    state = tmp_path / "agg-state"
    agg_log, dev_log = open(tmp_path / "aggregator.log", "w+"), open(tmp_path / "device.log", "w+")
    aggregator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetlearn.cli",
            "aggregator",
            "--bundle",
            str(boston_bundle),
            "--broker",
            mosquitto.url,
            "--fleet",
            FLEET,
            "--rounds",
            "1",
            "--min-devices",
            "1",
            "--deadline",
            "60",
            "--state-dir",
            str(state),
            "--test-data",
            str(test_npz),
        ],
        stdout=agg_log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    device = subprocess.Popen(
        [str(prefix / "venv" / "bin" / "fleetlearn"), "device", "--config", str(prefix / "device.toml"), "--max-rounds", "1"],
        stdout=dev_log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=clean_env(),
    )
    try:
        agg_rc = aggregator.wait(timeout=150)
        dev_rc = device.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        agg_rc, dev_rc = stop_process(aggregator), stop_process(device)
        agg_log.seek(0), dev_log.seek(0)
        logs = f"--- aggregator\n{agg_log.read()[-4000:]}\n--- device\n{dev_log.read()[-4000:]}"
    assert agg_rc == 0, logs
    assert dev_rc == 0, logs
    records = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 1 and DEVICE in records[0]["devices"], (records, logs)
    assert (prefix / "state").is_dir() and any((prefix / "state").iterdir())
