"""What `fleetlearn flash` writes: configs that load, a unit systemd accepts, the right
secrets and nothing else, and the same bytes every time."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import tomllib

import pytest

from fleetlearn.edge_runtime.device.config import load_device_config
from fleetlearn.firmware_configs.profiles import known_profiles, load_profile
from tests.test_flash_support import DEVICE_A, DEVICE_B, base_args, credentials, flash_ok, systemd_analyze, tree  # noqa: F401

SECRETS = {"secrets/mqtt-password", "secrets/ca.crt", "secrets/signing.key", "secrets/aggregator-signing.pub"}


def test_builtin_profiles_cover_the_boards():
    names = set(known_profiles())
    assert {
        "raspberry-pi-4",
        "raspberry-pi-5",
        "raspberry-pi-zero-2w",
        "jetson-orin-nano",
        "jetson-nano",
        "generic-x86_64",
    } <= names
    for name in names:
        p = load_profile(name)
        assert p.python == "3.11"
        assert 1 <= p.training.threads <= p.cores
        # PyPI has onnxruntime-training 1.19.2 for x86_64 Linux only: aarch64 profiles must say so.
        assert (p.ort_training.status == "pypi") == (p.arch == "x86_64"), name
        if p.arch == "aarch64":
            # ...and so they train with the portable engine (plain onnxruntime has aarch64 wheels).
            assert p.training.engine == "portable", name
            assert "NEVER been run" in p.ort_training.detail or p.ort_training.status == "unsupported", name
            assert not p.hardware_tested, f"{name}: nobody ran it on the board"
            assert p.verified in ("untested", "emulated"), name
        if p.verified != "untested":
            assert "tests/test_" in p.evidence, f"{name}: evidence must name the test that shows it"
    assert load_profile("jetson-nano").ort_training.status == "unsupported"
    assert load_profile("raspberry-pi-4").verified == "emulated"
    assert load_profile("jetson-orin-nano").verified == "untested"  # Ubuntu 22.04 was not emulated
    assert load_profile("generic-x86_64").training.engine == "ort-training"


@pytest.mark.parametrize("profile", known_profiles())
def test_every_profile_renders_a_loadable_config(boston_bundle, tmp_path, profile):
    out = tmp_path / "img"
    flash_ok(*base_args(boston_bundle, out, profile=profile))
    cfg = load_device_config(out / "device.toml")
    p = load_profile(profile)
    assert cfg.profile == profile and cfg.device_id == DEVICE_A
    assert cfg.bundle == "/opt/fleetlearn/bundle/current"
    assert cfg.state_dir == p.state_dir
    assert cfg.training.threads == p.training.threads and cfg.training.batch_size == p.training.batch_size
    unit = (out / "fleetlearn-device.service").read_text()
    assert f"MemoryMax={p.systemd.memory_max}\n" in unit
    # The untested ORT recipe ships only where an image would need it (ort-training off x86_64).
    assert not (out / "build_ort_aarch64.sh").exists()
    assert cfg.training.engine == p.training.engine
    info = json.loads((out / "image.json").read_text())
    assert info["arch"] == p.arch and info["onnxruntime_training"]["status"] == p.ort_training.status
    assert info["engine"]["installed"] == ("ort-training" if p.arch == "x86_64" else "portable")
    assert info["verified"] == {"how": p.verified, "evidence": p.evidence}
    requirements = (out / "requirements.txt").read_text().split()
    if p.arch == "aarch64":
        assert any(r.startswith("onnxruntime>") or r.startswith("onnxruntime=") for r in requirements), requirements
        assert not any(r.startswith("onnxruntime-training") for r in requirements), requirements
    else:
        assert "onnxruntime-training==1.19.2" in requirements, requirements
    readme = (out / "README.md").read_text()
    assert f"How this profile was proven ({p.verified})" in readme


def test_unit_file(boston_bundle, tmp_path):
    out = tmp_path / "img"
    flash_ok(
        *base_args(boston_bundle, out),
        "--prefix",
        "/srv/fl",
        "--set",
        "systemd.memory_max=2G",
        "--set",
        "state_dir=/data/fl-state",
    )
    unit = (out / "fleetlearn-device.service").read_text()
    for line in (
        "ExecStart=/srv/fl/venv/bin/fleetlearn device --config /srv/fl/device.toml",
        "Restart=on-failure",
        "User=fleetlearn",
        "MemoryMax=2G",
        "CPUQuota=200%",
        "StandardOutput=journal",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/data/fl-state /srv/fl/bundle",
        "PrivateTmp=yes",
        "WantedBy=multi-user.target",
    ):
        assert line + "\n" in unit, line
    # The agent swaps bundles by renaming a sibling of the bundle directory: its parent must be writable.
    cfg = load_device_config(out / "device.toml")
    assert cfg.bundle == "/srv/fl/bundle/current" and cfg.state_dir == "/data/fl-state"
    assert "@@" not in unit and "@@" not in (out / "install.sh").read_text() and "@@" not in (out / "README.md").read_text()

    analyze = systemd_analyze()
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: cannot verify the unit file here")
    proc = subprocess.run([analyze, "verify", str(out / "fleetlearn-device.service")], capture_output=True, text=True)
    # The one complaint allowed before install.sh ran: the venv's executable does not exist yet
    # (tests/test_flash_install.py verifies the installed unit with no complaint at all).
    complaints = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert all("/srv/fl/venv/bin/fleetlearn is not executable" in line for line in complaints), complaints


def test_overrides_land_in_the_config(boston_bundle, tmp_path):
    out = tmp_path / "img"
    flash_ok(
        *base_args(boston_bundle, out),
        "--fleet",
        "greenhouse",
        "--data",
        "/home/pi/sensor.csv",
        "--set",
        "training.batch_size=8",
        "--set",
        "training.max_steps=50",
        "--set",
        "mqtt_protocol=5",
        "--set",
        "target=medv",
        "--set",
        "tls.insecure_skip_hostname=true",
    )
    cfg = load_device_config(out / "device.toml")
    assert (cfg.fleet, cfg.data, cfg.target, cfg.mqtt_protocol) == ("greenhouse", "/home/pi/sensor.csv", "medv", "5")
    assert (cfg.training.batch_size, cfg.training.max_steps) == (8, 50)
    assert cfg.tls.insecure_skip_hostname is True


def test_only_this_devices_credentials(boston_bundle, tmp_path, credentials):  # noqa: F811
    out = tmp_path / "img"
    flash_ok(
        *base_args(boston_bundle, out, device_id=DEVICE_A), "--credentials", credentials, "--broker", "mqtts://broker.lan:8883"
    )
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {f for f in files if f.startswith("secrets/")} == SECRETS
    a, b = credentials / "devices" / DEVICE_A, credentials / "devices" / DEVICE_B
    assert (out / "secrets/mqtt-password").read_bytes() == (a / "mqtt-password").read_bytes()
    assert (out / "secrets/signing.key").read_bytes() == (a / "signing.key").read_bytes()
    assert (out / "secrets/ca.crt").read_bytes() == (credentials / "ca.crt").read_bytes()
    assert (out / "secrets").stat().st_mode & 0o777 == 0o700
    for f in SECRETS:
        assert (out / f).stat().st_mode & 0o777 == 0o600, f
    # Not one byte of the other device's secrets anywhere in the image.
    foreign = [(b / "mqtt-password").read_bytes().strip(), (b / "signing.key").read_bytes().splitlines()[1]]
    for f in files:
        data = (out / f).read_bytes()
        for secret in foreign:
            assert secret not in data, f"{DEVICE_B}'s secret found in {f}"
        assert DEVICE_B.encode() not in data, f
    cfg = load_device_config(out / "device.toml")
    assert cfg.broker == "mqtts://broker.lan:8883"
    assert cfg.auth.username == DEVICE_A and cfg.auth.password_file == "/opt/fleetlearn/secrets/mqtt-password"
    assert cfg.auth.password is None
    assert cfg.tls.ca_file == "/opt/fleetlearn/secrets/ca.crt"
    assert cfg.signing.key_file == "/opt/fleetlearn/secrets/signing.key"
    assert cfg.signing.aggregator_public_key == "/opt/fleetlearn/secrets/aggregator-signing.pub"
    # Signatures need `cryptography` on the device, which the edge extra does not list.
    assert "cryptography>=42" in (out / "requirements.txt").read_text().split()


def test_tarball_holds_the_same_files_with_root_ownership(boston_bundle, tmp_path, credentials):  # noqa: F811
    d, t = tmp_path / "d" / "img", tmp_path / "t" / "img.tar.gz"
    d.parent.mkdir(), t.parent.mkdir()
    args = ["--credentials", str(credentials)]
    flash_ok(*base_args(boston_bundle, d), *args)
    flash_ok(*base_args(boston_bundle, t), *args)
    with tarfile.open(t) as tar:
        members = tar.getmembers()
        names = [m.name for m in members]
        assert names[0] == "img" and len(set(names)) == len(names)
        assert all(m.name == "img" or m.name.startswith("img/") for m in members)
        assert {(m.uid, m.gid, m.uname, m.gname, m.mtime) for m in members} == {(0, 0, "", "", 315532800)}
        files = {m.name[len("img/") :]: (m.mode, tar.extractfile(m).read()) for m in members if m.isfile()}
    assert files == {rel: v for rel, v in tree(d).items() if (d / rel).is_file()}
    assert files["secrets/mqtt-password"][0] == 0o600 and files["install.sh"][0] == 0o755


@pytest.mark.parametrize("suffix", ["", ".tar.gz"])
def test_same_device_twice_gives_the_same_image(boston_bundle, tmp_path, credentials, suffix):  # noqa: F811
    outs = []
    for run in ("one", "two"):
        (tmp_path / run).mkdir()
        out = tmp_path / run / f"fleet-{DEVICE_A}{suffix}"
        # Each run builds the agent's wheel afresh: that must be byte-identical too.
        flash_ok(*base_args(boston_bundle, out), "--credentials", credentials, "--set", "training.threads=1")
        outs.append(out)
    if suffix:
        assert outs[0].read_bytes() == outs[1].read_bytes()
    else:
        assert tree(outs[0]) == tree(outs[1])


def test_fresh_signing_key_is_the_only_difference(boston_bundle, tmp_path):
    outs = []
    for run in ("one", "two"):
        out = tmp_path / run
        proc = flash_ok(*base_args(boston_bundle, out), "--new-signing-key")
        assert "signing.pub" in proc.stdout
        outs.append(out)
    one, two = tree(outs[0]), tree(outs[1])
    assert one.keys() == two.keys()
    differ = {rel for rel in one if one[rel] != two[rel]}
    assert differ == {"secrets/signing.key", "signing.pub", "SHA256SUMS"}
    assert one["secrets/signing.key"][0] == 0o600
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

    key = load_pem_private_key(one["secrets/signing.key"][1], password=None)
    pub = load_pem_public_key(one["signing.pub"][1])
    assert key.public_key().public_bytes_raw() == pub.public_bytes_raw()
    assert load_device_config(outs[0] / "device.toml").signing.key_file == "/opt/fleetlearn/secrets/signing.key"


def test_sha256sums_cover_every_file(boston_bundle, tmp_path):
    import hashlib

    out = tmp_path / "img"
    flash_ok(*base_args(boston_bundle, out))
    sums = dict(reversed(line.split("  ", 1)) for line in (out / "SHA256SUMS").read_text().splitlines())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(sums) == files
    for rel, digest in sums.items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest


def test_aarch64_image_carries_plain_onnxruntime_for_aarch64(boston_bundle, tmp_path):
    """Downloads aarch64 wheels from the package index (about 40 MB): plain onnxruntime, numpy
    and paho-mqtt for the board, chosen by the profile's architecture on this x86_64 machine."""
    out = tmp_path / "pi"
    args = [a for a in base_args(boston_bundle, out, profile="raspberry-pi-4") if a != "--no-deps-wheels"]
    proc = flash_ok(*args)
    assert "engine: portable" in proc.stdout and "verified: emulated" in proc.stdout, proc.stdout
    assert "build_ort_aarch64.sh" not in proc.stdout
    wheels = sorted(p.name for p in (out / "wheels").iterdir())
    for name in ("numpy-", "paho_mqtt-", "onnxruntime-"):
        assert any(w.startswith(name) for w in wheels), (name, wheels)
    assert not [w for w in wheels if w.startswith(("onnxruntime_training", "torch", "onnx-", "h5py", "sympy"))], wheels
    assert all("x86_64" not in w for w in wheels)
    assert any(w.startswith("onnxruntime-") and w.endswith("_aarch64.whl") for w in wheels), wheels
    info = json.loads((out / "image.json").read_text())
    assert info["onnxruntime_training"]["in_image"] is False and info["engine"]["installed"] == "portable"
    readme = (out / "README.md").read_text()
    assert "plain onnxruntime, included in `wheels/`" in readme and "emulated only" in readme and "--ort-wheel" not in readme
    script = (out / "install.sh").read_text()
    assert "ENGINE='portable'" in script and "NEEDS_ORT_WHEEL=0" in script and "DEPS_IN_IMAGE=1" in script
    doc = tomllib.loads((out / "device.toml").read_text())
    assert doc["training"]["threads"] == 3 and doc["training"]["engine"] == "portable"


def test_ort_training_on_aarch64_is_the_untested_recipe(boston_bundle, tmp_path):
    """Asking for onnxruntime-training on a Pi: the image says it needs a locally built wheel,
    carries the (untested) recipe, and its install.sh refuses to go on without --ort-wheel."""
    out = tmp_path / "pi"
    proc = flash_ok(*base_args(boston_bundle, out, profile="raspberry-pi-4"), "--set", "training.engine=ort-training")
    assert "engine: ort-training" in proc.stdout and "build_ort_aarch64.sh (untested)" in proc.stdout
    assert (out / "build_ort_aarch64.sh").is_file()
    requirements = (out / "requirements.txt").read_text().split()
    assert not any(r.startswith("onnxruntime") for r in requirements), requirements
    assert "NEEDS_ORT_WHEEL=1" in (out / "install.sh").read_text()
    assert "UNTESTED" in (out / "README.md").read_text()


def test_markers_are_evaluated_for_the_board_not_this_machine(boston_bundle, tmp_path):
    """engine "auto" installs the `edge` extra, whose markers pick onnxruntime-training on x86_64
    and plain onnxruntime elsewhere. This machine is x86_64; the Pi's image must get the latter."""
    out = tmp_path / "pi"
    proc = flash_ok(*base_args(boston_bundle, out, profile="raspberry-pi-4"), "--set", "training.engine=auto")
    assert "engine: portable" in proc.stdout and 'device.toml says engine = "auto"' in proc.stdout, proc.stdout
    requirements = (out / "requirements.txt").read_text().split()
    assert any(r.startswith("onnxruntime==") for r in requirements), requirements
    assert not any(r.startswith("onnxruntime-training") for r in requirements), requirements
    out86 = tmp_path / "x86"
    flash_ok(*base_args(boston_bundle, out86), "--set", "training.engine=auto")
    assert "onnxruntime-training==1.19.2" in (out86 / "requirements.txt").read_text().split()


def test_x86_64_portable_engine_drops_onnxruntime_training(boston_bundle, tmp_path):
    out = tmp_path / "x86"
    proc = flash_ok(*base_args(boston_bundle, out), "--set", "training.engine=portable")
    assert "engine: portable" in proc.stdout
    requirements = (out / "requirements.txt").read_text().split()
    assert not any(r.startswith("onnxruntime-training") for r in requirements)
    assert any(r.startswith("onnxruntime") for r in requirements), requirements


def test_install_sh_refuses_another_architecture(boston_bundle, tmp_path):
    out = tmp_path / "pi"
    flash_ok(*base_args(boston_bundle, out, profile="raspberry-pi-5"))
    proc = subprocess.run(
        ["sh", str(out / "install.sh"), "--prefix", str(tmp_path / "opt"), "--no-systemd"], capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "this image is for aarch64" in proc.stderr
    assert not (tmp_path / "opt").exists()


def test_install_sh_refuses_a_damaged_image(boston_bundle, tmp_path):
    out = tmp_path / "img"
    flash_ok(*base_args(boston_bundle, out))
    manifest = out / "bundle" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes() + b" ")
    proc = subprocess.run(
        ["sh", str(out / "install.sh"), "--prefix", str(tmp_path / "opt"), "--no-systemd"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "SHA256SUMS" in proc.stderr
    assert not (tmp_path / "opt").exists()


def test_readme_is_for_the_person_holding_the_device(boston_bundle, tmp_path):
    out = tmp_path / "img"
    flash_ok(*base_args(boston_bundle, out))
    readme = (out / "README.md").read_text()
    for needle in (
        DEVICE_A,
        "sudo ./install.sh",
        "journalctl -u fleetlearn-device",
        "/opt/fleetlearn/data/train.npz",
        "no torch",
    ):
        assert needle in readme, needle
    assert io.StringIO(readme).readline().startswith("# fleetlearn device image")
