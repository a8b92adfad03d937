"""Device profiles: what a kind of board can do and how the agent is confined on it.

One TOML file per profile in firmware_configs/profiles/ (docs/flashing.md describes every key).
A profile is validated as strictly as a device config: unknown keys, wrong types and values
that cannot work (more threads than cores, a MemoryMax below the memory budget) are errors
naming the key, so a broken profile fails at flash time on the operator's machine rather than
on a device in a field.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from fleetlearn.edge_runtime.core.errors import ConfigError
from fleetlearn.edge_runtime.core.files import read_toml
from fleetlearn.edge_runtime.core.names import check_name
from fleetlearn.edge_runtime.device.config import ENGINE_CHOICES
from fleetlearn.firmware_configs.errors import FlashError, ProfileError
from fleetlearn.firmware_configs.schema import from_table

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"
ARCHES = ("x86_64", "aarch64")
# The device's training engine ([training] engine in device.toml; the device config owns the list):
# "portable" runs the bundle's step graph on plain onnxruntime (wheels for x86_64 and aarch64 on
# PyPI); "ort-training" uses onnxruntime-training 1.19.2's training API (x86_64 wheels only);
# "auto" uses onnxruntime-training where it is installed and the portable engine otherwise.
ENGINES = ENGINE_CHOICES
# onnxruntime-training 1.19.2 on the board, for the ort-training engine only:
# pypi: `pip install onnxruntime-training==1.19.2` works on the device's platform.
# build-from-source: no wheel on PyPI; build_ort_aarch64.sh is an UNTESTED recipe for one.
# unsupported: not expected to work without changing the OS first (see the profile's detail).
ORT_STATUSES = ("pypi", "build-from-source", "unsupported")
# How far a profile was proven. untested: reasoned from the board's specs only; emulated: its
# image installed and trained in an emulated root of the board's OS and architecture (qemu-user
# in CI: right instruction set and userland, not the board's speed, memory or kernel); hardware:
# on such a machine for real (then hardware_tested = true as well).
VERIFICATIONS = ("untested", "emulated", "hardware")
# The oldest manylinux glibc for each architecture (manylinux2014 = glibc 2.17 on both).
_MIN_GLIBC_MINOR = {"x86_64": 5, "aarch64": 17}
_SIZE_RE = re.compile(r"^(\d+)([KMGT]?)$")
_SAFE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]*$")


@dataclass(frozen=True)
class TrainingDefaults:
    threads: int  # ORT intra-op threads: leave a core for the OS, MQTT and sshd where there are several
    batch_size: int
    local_epochs: int
    max_steps: int | None = None  # caps a round's local steps on slow boards
    engine: str = "auto"  # one of ENGINES; written into device.toml's [training] table


@dataclass(frozen=True)
class SystemdLimits:
    memory_max: str  # MemoryMax=: the kernel OOM-kills the agent above this, never the rest of the board
    memory_high: str | None = None  # MemoryHigh=: reclaim pressure starts here, before MemoryMax kills
    memory_swap_max: str | None = None  # MemorySwapMax=: "0" keeps SD cards from being worn out by swap
    cpu_quota: str | None = None  # CPUQuota=, e.g. "300%" = three cores' worth
    tasks_max: int = 64  # TasksMax=: ORT's thread pool + paho's thread + a margin
    nice: int = 10  # Nice=: training yields to whatever else the board does
    private_devices: bool = True  # PrivateDevices=: false only where a GPU EP needs /dev nodes (Jetson CUDA)


@dataclass(frozen=True)
class OrtTraining:
    """onnxruntime-training on this board: only what the ort-training engine needs."""

    status: str  # one of ORT_STATUSES
    detail: str  # the honest one-paragraph story, shown in the image README


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    arch: str  # CPU architecture as `uname -m` prints it
    cores: int
    ram_mb: int  # the smallest RAM size of the board this profile targets
    memory_budget_mb: int  # what the agent may use (model + data + ORT arena); MemoryMax must allow it
    state_dir: str  # where the agent keeps its crash-safe state (absolute, outside the install prefix)
    os: str  # the OS image this profile is written for
    glibc: str  # the oldest glibc the image's wheels may need ("2.36" -> manylinux_2_36 and older)
    training: TrainingDefaults
    systemd: SystemdLimits
    ort_training: OrtTraining
    python: str = "3.11"  # the image's wheels are built for this CPython
    hardware_tested: bool = False  # true only once someone ran the agent on this board
    verified: str = "untested"  # one of VERIFICATIONS: how far this profile was proven
    evidence: str = ""  # what ran, where, and which test shows it (required unless untested)
    gpu: str = ""  # whether and how a GPU can help on this board, and what of that was tested
    notes: str = ""

    @property
    def ort_from_pypi(self) -> bool:
        return self.ort_training.status == "pypi"

    def platform_tags(self) -> list[str]:
        """pip `--platform` tags for this board, newest first: pip does not widen manylinux_2_NN
        to older tags by itself, so every compatible one is listed (plus the legacy alias)."""
        minor = int(self.glibc.split(".")[1])
        tags = [f"manylinux_2_{m}_{self.arch}" for m in range(minor, _MIN_GLIBC_MINOR[self.arch] - 1, -1)]
        tags.append(f"manylinux2014_{self.arch}")
        if self.arch == "x86_64":
            tags += ["manylinux2010_x86_64", "manylinux1_x86_64"]
        return tags


def size_bytes(value: str) -> int | None:
    """A systemd size ("512M", "2G", "1048576") in bytes; None for "infinity"."""
    if value == "infinity":
        return None
    m = _SIZE_RE.fullmatch(value)
    if not m:
        raise ValueError(value)
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


def check_profile(p: Profile, where: str = "profile") -> Profile:
    """Semantic checks beyond types. Raises ProfileError naming the key."""

    def bad(key: str, why: str) -> ProfileError:
        return ProfileError(f"{where}: key {key!r} {why}")

    try:
        check_name(p.name, "profile name")
    except ConfigError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    if p.arch not in ARCHES:
        raise bad("arch", f"must be one of {', '.join(ARCHES)}, got {p.arch!r}")
    if p.cores < 1:
        raise bad("cores", "must be >= 1")
    if not 1 <= p.training.threads <= p.cores:
        raise bad("training.threads", f"must be between 1 and cores ({p.cores}), got {p.training.threads}")
    for key in ("batch_size", "local_epochs"):
        if getattr(p.training, key) < 1:
            raise bad(f"training.{key}", "must be >= 1")
    if p.training.max_steps is not None and p.training.max_steps < 1:
        raise bad("training.max_steps", "must be >= 1")
    if not 64 <= p.memory_budget_mb <= p.ram_mb:
        raise bad("memory_budget_mb", f"must be between 64 and ram_mb ({p.ram_mb}), got {p.memory_budget_mb}")
    if not _SAFE_PATH_RE.fullmatch(p.state_dir) or "/../" in p.state_dir + "/":
        raise bad("state_dir", f"must be an absolute path of letters, digits, '.', '_', '-', '/', got {p.state_dir!r}")
    if not re.fullmatch(r"2\.\d+", p.glibc) or int(p.glibc.split(".")[1]) < _MIN_GLIBC_MINOR.get(p.arch, 17):
        raise bad("glibc", f'must look like "2.28" and be at least 2.{_MIN_GLIBC_MINOR.get(p.arch, 17)} on {p.arch}')
    if not re.fullmatch(r"3\.\d+", p.python):
        raise bad("python", f'must look like "3.11", got {p.python!r}')
    if p.training.engine not in ENGINES:
        raise bad("training.engine", f"must be one of {', '.join(ENGINES)}, got {p.training.engine!r}")
    if p.ort_training.status not in ORT_STATUSES:
        raise bad("ort_training.status", f"must be one of {', '.join(ORT_STATUSES)}, got {p.ort_training.status!r}")
    if p.ort_training.status == "pypi" and p.arch != "x86_64":
        # A fact about PyPI, not a preference: onnxruntime-training 1.19.2 has Linux wheels for x86_64 only.
        raise bad("ort_training.status", 'cannot be "pypi" off x86_64: onnxruntime-training 1.19.2 has no such wheel on PyPI')
    if p.verified not in VERIFICATIONS:
        raise bad("verified", f"must be one of {', '.join(VERIFICATIONS)}, got {p.verified!r}")
    if p.verified != "untested" and not p.evidence.strip():
        raise bad("evidence", f"must say what ran where (which test) when verified = {p.verified!r}")
    if (p.verified == "hardware") != p.hardware_tested:
        raise bad(
            "verified",
            f'is {p.verified!r} but hardware_tested is {str(p.hardware_tested).lower()}: "hardware" and hardware_tested = true go together',
        )
    check_limits(p.systemd, p.cores, p.memory_budget_mb, where)
    return p


def check_limits(s: SystemdLimits, cores: int, memory_budget_mb: int, where: str) -> None:
    def bad(key: str, why: str) -> ProfileError:
        return ProfileError(f"{where}: key 'systemd.{key}' {why}")

    sizes: dict[str, int | None] = {}
    for key in ("memory_max", "memory_high", "memory_swap_max"):
        value = getattr(s, key)
        if value is None:
            continue
        try:
            sizes[key] = size_bytes(value)
        except ValueError:
            raise bad(key, f'must be a systemd size like "512M", "2G" or "infinity", got {value!r}') from None
    mem_max = sizes["memory_max"]
    if mem_max is not None and mem_max < memory_budget_mb * 1024 * 1024:
        raise bad("memory_max", f"({s.memory_max}) is below memory_budget_mb ({memory_budget_mb}M): the agent would be killed")
    high = sizes.get("memory_high")
    if high is not None and mem_max is not None and high > mem_max:
        raise bad("memory_high", f"({s.memory_high}) must not exceed memory_max ({s.memory_max})")
    if s.cpu_quota is not None:
        m = re.fullmatch(r"(\d+)%", s.cpu_quota)
        if not m or not 1 <= int(m.group(1)) <= cores * 100:
            raise bad("cpu_quota", f"must be a percentage from 1% to {cores * 100}% (cores x 100), got {s.cpu_quota!r}")
    if s.tasks_max < 8:
        raise bad("tasks_max", "must be >= 8 (ORT and paho start threads)")
    if not -20 <= s.nice <= 19:
        raise bad("nice", "must be between -20 and 19")


def known_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.toml"))


def parse_profile(doc: dict, where: str) -> Profile:
    try:
        profile = from_table(Profile, doc)
    except FlashError as exc:
        raise ProfileError(f"{where}: {exc}") from None
    return check_profile(profile, where)


def load_profile_file(path: Path) -> Profile:
    doc = read_toml(path, "profile", ProfileError)
    profile = parse_profile(doc, str(path))
    if profile.name != path.stem:
        raise ProfileError(f"{path}: key 'name' is {profile.name!r} but the file is {path.name}; they must match")
    return profile


def load_profile(name_or_path: str, directory: Path = PROFILES_DIR) -> Profile:
    """A built-in profile by name, or a profile file given by path (ending in .toml)."""
    if name_or_path.endswith(".toml"):
        return load_profile_file(Path(name_or_path))
    known = known_profiles(directory)
    if name_or_path not in known:
        raise ProfileError(f"unknown profile {name_or_path!r}; known profiles: {', '.join(known)}")
    return load_profile_file(directory / f"{name_or_path}.toml")


def replace_systemd(profile: Profile, **changes) -> Profile:
    """The profile with some systemd limits replaced (per-device overrides), re-checked."""
    updated = dataclasses.replace(profile, systemd=dataclasses.replace(profile.systemd, **changes))
    return check_profile(updated, f"profile {profile.name} with overrides")
