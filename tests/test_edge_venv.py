"""The device runs without torch: the `edge` extra alone, in a fresh venv, through a full round.

The venv is built from this checkout with `pip install '.[edge]'` (numpy, onnxruntime-training,
paho-mqtt and nothing else); torch is not installed there, and after the round neither `torch`
nor `onnx` may be in the device's `sys.modules`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv

import pytest

from tests.conftest import ROOT, stop_process
from tests.test_device import write_config

pytestmark = pytest.mark.slow

PROBE = """
import sys
from fleetlearn.cli import main
rc = main(["device", "--config", sys.argv[1], "--max-rounds", "1"])
print("MODULES " + " ".join(sorted(m for m in ("torch", "onnx", "fleetlearn.aggregator", "fleetlearn.export", "fleetlearn.firmware_configs") if m in sys.modules)), flush=True)
sys.exit(rc)
"""


@pytest.fixture(scope="module")
def edge_venv(tmp_path_factory):
    where = tmp_path_factory.mktemp("edge-venv") / "venv"
    venv.EnvBuilder(with_pip=True).create(where)
    py = where / "bin" / "python"
    r = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[edge]"], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return py


def test_edge_extra_has_no_torch(edge_venv):
    # onnxruntime-training 1.19.2 itself requires the onnx package (and sympy, h5py...), so onnx
    # is installed here; what matters is that the device never imports it (checked below).
    r = subprocess.run([str(edge_venv), "-c", "import torch"], capture_output=True, text=True)
    assert r.returncode != 0 and "No module named 'torch'" in r.stderr


def test_full_round_in_a_torch_free_venv(edge_venv, mosquitto, tmp_path, boston_bundle, boston_shards):
    shards, test_npz = boston_shards
    cfg = write_config(tmp_path, mosquitto.url, boston_bundle, shards[0])
    state = tmp_path / "agg"
    agg = subprocess.Popen(
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
            "devtest",
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
        cwd=ROOT,
        stderr=open(tmp_path / "agg.log", "wb"),
    )
    try:
        dev = subprocess.run([str(edge_venv), "-c", PROBE, str(cfg)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert dev.returncode == 0, dev.stderr[-3000:]
        assert "MODULES \n" in dev.stdout or dev.stdout.strip().endswith("MODULES"), dev.stdout
        assert agg.wait(60) == 0, (tmp_path / "agg.log").read_text()[-3000:]
        rounds = [json.loads(line) for line in (state / "rounds.jsonl").read_text().splitlines()]
        assert rounds[0]["devices"] == ["dev-0"]
    finally:
        stop_process(agg)
