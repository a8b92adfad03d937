"""`fleetlearn flash` on bad input: exit 2, one line on stderr naming the problem, nothing written."""

from __future__ import annotations

import shutil

import pytest

from tests.test_flash_support import base_args, credentials, flash, listing  # noqa: F401  (fixture)


def assert_refused(proc, out, parent_before: list[str], *needles: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert len(lines) == 1, f"want one stderr line, got: {proc.stderr!r}"
    assert lines[0].startswith("fleetlearn flash: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert listing(out.parent) == parent_before, "something was written"


@pytest.fixture
def outdir(tmp_path):
    d = tmp_path / "images"
    d.mkdir()
    return d


def test_unknown_profile_lists_known_ones(boston_bundle, outdir):
    out = outdir / "img"
    args = base_args(boston_bundle, out, profile="raspberry-pi-9")
    proc = flash(*args)
    assert_refused(proc, out, [], "unknown profile 'raspberry-pi-9'", "raspberry-pi-4", "generic-x86_64", "jetson-orin-nano")


def test_missing_bundle(tmp_path, outdir):
    out = outdir / "img"
    proc = flash(*base_args(tmp_path / "no-such-bundle", out))
    assert_refused(proc, out, [], "--bundle", "manifest.json")


def test_corrupt_bundle(boston_bundle, tmp_path, outdir):
    bad = tmp_path / "bad-bundle"
    shutil.copytree(boston_bundle, bad)
    data = bytearray((bad / "training_model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "training_model.onnx").write_bytes(bytes(data))
    out = outdir / "img.tar.gz"
    proc = flash(*base_args(bad, out))
    assert_refused(proc, out, [], "training_model.onnx", "sha256")


@pytest.mark.parametrize(
    "device_id", ["dev+1", "dev#1", "fleet/dev", "dev 1", "dev\t1", "dev\n1", "dev\x01", "", "-dev", "x" * 65]
)
def test_unsafe_device_id(boston_bundle, outdir, device_id):
    out = outdir / "img"
    proc = flash(*base_args(boston_bundle, out, device_id=device_id))
    assert_refused(proc, out, [], "device id", "not allowed")


@pytest.mark.parametrize("tarball", [False, True])
def test_existing_output(boston_bundle, outdir, tarball):
    out = outdir / ("img.tar.gz" if tarball else "img")
    if tarball:
        out.write_bytes(b"keep me")
    else:
        out.mkdir()
        (out / "keep").write_text("keep me")
    before = listing(outdir)
    proc = flash(*base_args(boston_bundle, out))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "already exists" in proc.stderr
    assert listing(outdir) == before
    assert (out.read_bytes() if tarball else (out / "keep").read_bytes()) == b"keep me"


def test_output_parent_missing(boston_bundle, tmp_path):
    out = tmp_path / "nope" / "img"
    proc = flash(*base_args(boston_bundle, out))
    assert proc.returncode == 2 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("training.batchsize=8", "unknown key 'training.batchsize'"),
        ("training.threads=two", "training.threads: must be an integer"),
        ("training.threads=0", "training.threads' must be >= 1"),
        ("tls.insecure_skip_hostname=maybe", "must be true or false"),
        ("systemd.memory_max=lots", "systemd.memory_max"),
        ("systemd.memory_max=64M", "below memory_budget_mb"),
        ("device_id=other", "set by --device-id"),
        ("keepalive", "expected key=value"),
        ("state_dir=var/state", "--set state_dir"),
    ],
)
def test_bad_override(boston_bundle, outdir, override, needle):
    out = outdir / "img"
    proc = flash(*base_args(boston_bundle, out), "--set", override)
    assert_refused(proc, out, [], needle)


def test_bad_broker_url(boston_bundle, outdir):
    out = outdir / "img"
    args = base_args(boston_bundle, out)
    args[args.index("--broker") + 1] = "http://broker:1883"
    assert_refused(flash(*args), out, [], "broker")


def test_credentials_missing_for_device(boston_bundle, outdir, credentials):  # noqa: F811
    out = outdir / "img"
    proc = flash(*base_args(boston_bundle, out, device_id="dev-c"), "--credentials", credentials)
    assert_refused(proc, out, [], "no credentials for device 'dev-c'")


def test_profile_file_with_unknown_key(boston_bundle, outdir, tmp_path):
    from fleetlearn.firmware_configs.profiles import PROFILES_DIR

    text = (PROFILES_DIR / "generic-x86_64.toml").read_text().replace("[systemd]\n", '[systemd]\nmemory_maxx = "1G"\n')
    path = tmp_path / "generic-x86_64.toml"
    path.write_text(text)
    out = outdir / "img"
    args = base_args(boston_bundle, out)
    args[args.index("--profile") + 1] = str(path)
    assert_refused(flash(*args), out, [], "unknown key 'systemd.memory_maxx'")


def test_profile_file_with_wrong_type(boston_bundle, outdir, tmp_path):
    from fleetlearn.firmware_configs.profiles import PROFILES_DIR

    text = (PROFILES_DIR / "generic-x86_64.toml").read_text().replace("cores = 2", 'cores = "2"')
    path = tmp_path / "generic-x86_64.toml"
    path.write_text(text)
    out = outdir / "img"
    args = base_args(boston_bundle, out)
    args[args.index("--profile") + 1] = str(path)
    assert_refused(flash(*args), out, [], "key 'cores' must be an integer")


def test_unsafe_prefix(boston_bundle, outdir):
    out = outdir / "img"
    assert_refused(flash(*base_args(boston_bundle, out), "--prefix", "/opt/fleet learn"), out, [], "--prefix")
    assert_refused(flash(*base_args(boston_bundle, out), "--prefix", "relative/dir"), out, [], "--prefix")


@pytest.mark.parametrize(
    "old, new, needle",
    [
        ('verified = "emulated"', 'verified = "simulated"', "key 'verified' must be one of untested, emulated, hardware"),
        ('verified = "emulated"', 'verified = "hardware"', '"hardware" and hardware_tested = true go together'),
        ('engine = "portable"', 'engine = "gpu"', "key 'training.engine' must be one of auto, ort-training, portable"),
        ('evidence = "', 'evidence = "" # ', "key 'evidence' must say what ran where"),
    ],
)
def test_profile_claims_are_checked(boston_bundle, outdir, tmp_path, old, new, needle):
    """A profile cannot claim more than its evidence: `verified` is one of three words, "hardware"
    needs hardware_tested, and any claim needs an evidence string."""
    from fleetlearn.firmware_configs.profiles import PROFILES_DIR

    text = (PROFILES_DIR / "raspberry-pi-4.toml").read_text()
    assert old in text
    path = tmp_path / "raspberry-pi-4.toml"
    path.write_text(text.replace(old, new, 1))
    out = outdir / "img"
    args = base_args(boston_bundle, out)
    args[args.index("--profile") + 1] = str(path)
    assert_refused(flash(*args), out, [], needle)
