"""The wheels an image carries: fleetlearn itself, built reproducibly, and its `edge`
dependencies downloaded for the device's platform (not the operator's).

Reproducible means byte-identical: the wheel is built from a clean copy of the source tree
(no stale build/ directory, normalised file modes) with SOURCE_DATE_EPOCH fixed, which the
wheel writer uses for every zip entry's timestamp.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path

# packaging comes with `build` (server extra), which flash needs anyway to build the agent's wheel.
from packaging.requirements import Requirement

from fleetlearn.firmware_configs.errors import FlashError
from fleetlearn.firmware_configs.profiles import Profile

# 1980-01-01T00:00:00Z: the earliest time a zip entry can hold; used for the wheel and the tarball.
SOURCE_DATE_EPOCH = 315532800
ORT_REQUIREMENT = "onnxruntime-training==1.19.2"
# onnxruntime-training 1.19.2's own Requires-Dist (read from its x86_64 wheel's METADATA). On
# aarch64 its wheel comes from a local build, but these can still be carried for an offline install.
ORT_TRAINING_REQUIRES = (
    "cerberus",
    "flatbuffers",
    "h5py",
    "numpy>=1.16.6",
    "onnx",
    "packaging",
    "protobuf",
    "sympy",
    "setuptools>=61.0.0",
)
EDGE, EDGE_PORTABLE = "edge", "edge-portable"
_SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.egg-info", "build", "dist", ".*")


def project_root() -> Path | None:
    """The source tree this package runs from, when it runs from one (not from an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if pyproject.is_file() and 'name = "fleetlearn"' in pyproject.read_text(encoding="utf-8"):
        return root
    return None


def _source_copy(root: Path, dest: Path) -> None:
    """Copy what the wheel is built from: pyproject.toml, README/LICENSE, and the packages it finds."""
    meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    # The folders the packages live in: the values of [tool.setuptools.package-dir].
    tops = sorted(set(meta.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values()))
    dest.mkdir(parents=True)
    shutil.copy2(root / "pyproject.toml", dest / "pyproject.toml")
    for name in sorted(os.listdir(root)):
        if re.match(r"^(README|LICENSE|COPYING|NOTICE)", name) and (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    for top in tops:
        if (root / top).is_dir():
            shutil.copytree(root / top, dest / top, ignore=_SKIP)
    # Zip entries carry the file mode: make it independent of the operator's umask.
    for path in sorted(dest.rglob("*")):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)


def build_project_wheel(root: Path, out_dir: Path) -> Path:
    """Build fleetlearn's wheel from the source tree at `root` into `out_dir`; return its path."""
    if importlib.util.find_spec("build") is None:
        raise FlashError("building the agent's wheel needs the `build` package (pip install build), or pass --wheel FILE")
    with tempfile.TemporaryDirectory(prefix="fleetlearn-wheel-") as tmp:
        src = Path(tmp) / "src"
        _source_copy(root, src)
        env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH), PYTHONHASHSEED="0")
        # --no-isolation: use this environment's setuptools rather than downloading one, so
        # flashing works on an operator machine without network access.
        cmd = [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--skip-dependency-check",
            "--outdir",
            str(out_dir),
            str(src),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:
            raise FlashError(f"building the agent's wheel failed: {_last_error_line(proc.stdout + proc.stderr)}")
    wheels = sorted(out_dir.glob("fleetlearn-*.whl"))
    if len(wheels) != 1:
        raise FlashError(f"building the agent's wheel produced {len(wheels)} fleetlearn wheels in {out_dir}")
    return wheels[0]


def check_project_wheel(path: Path) -> Path:
    """A prebuilt wheel given with --wheel: it must be a readable fleetlearn wheel."""
    if not path.is_file() or not re.fullmatch(r"fleetlearn-[^-]+-py3-none-any\.whl", path.name):
        raise FlashError(f"--wheel {path}: expected an existing fleetlearn-VERSION-py3-none-any.whl")
    try:
        edge_requirements(path)
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise FlashError(f"--wheel {path}: not a readable wheel ({exc})") from None
    return path


def _metadata(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return zf.read(name).decode("utf-8")


def extra_requirements(wheel: Path, extra: str) -> list[Requirement]:
    """The requirements of one extra, read from the wheel's METADATA (the one source of truth).
    Their other markers (platform_machine, ...) are kept: dependency_requirements evaluates them
    for the device's platform (target_environment), not for this machine."""
    reqs = []
    for line in _metadata(wheel).splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and re.search(rf"""\bextra\s*==\s*["']{re.escape(extra)}["']""", str(req.marker)):
            reqs.append(req)
    return reqs


def edge_requirements(wheel: Path) -> list[str]:
    """The `edge` extra's requirements as written (checked for every --wheel given to flash)."""
    reqs = extra_requirements(wheel, EDGE)
    if not reqs:
        raise FlashError(f"{wheel.name}: its METADATA lists no requirements for the `edge` extra")
    return [str(r) for r in reqs]


def target_environment(profile: Profile) -> dict[str, str]:
    """PEP 508 marker variables of the device, not of this machine: flash runs on an x86_64
    laptop and writes images for aarch64 boards, and pip evaluates markers for the machine it
    runs on, even under `pip download --platform`."""
    return {
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "platform_machine": profile.arch,
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "python_version": profile.python,
        "python_full_version": f"{profile.python}.0",
        "implementation_version": f"{profile.python}.0",
    }


def is_ort(requirement: str) -> bool:
    return re.match(r"onnxruntime[-_]training\b", requirement) is not None


def is_plain_ort(requirement: str) -> bool:
    return re.match(r"onnxruntime(?![-_.\w])", requirement) is not None


def engine_extra(engine: str) -> str:
    """The extra that installs an engine: `edge-portable` (plain onnxruntime anywhere) for the
    portable engine; `edge` otherwise (onnxruntime-training on x86_64, plain onnxruntime elsewhere)."""
    return EDGE_PORTABLE if engine == "portable" else EDGE


def dependency_requirements(wheel: Path, profile: Profile, engine: str, extra: list[str]) -> list[str]:
    """The device's requirements for `engine`, with markers evaluated for the profile's platform.

    engine "portable": the wheel's `edge-portable` extra (plain onnxruntime; never onnxruntime-training).
    engine "auto": the `edge` extra as the device would resolve it (onnxruntime-training on x86_64).
    engine "ort-training": onnxruntime-training. Off x86_64 it is not on PyPI: carry its
    dependencies instead, so a wheel from the UNTESTED build_ort_aarch64.sh recipe is the only
    thing the device still needs (install.sh --ort-wheel)."""
    name = engine_extra(engine)
    listed = extra_requirements(wheel, name)
    if not listed:
        if engine == "portable":
            raise FlashError(
                f"{wheel.name} has no portable engine (its METADATA lists no `{EDGE_PORTABLE}` extra): "
                "use a newer fleetlearn wheel, or --set training.engine=ort-training on x86_64"
            )
        raise FlashError(f"{wheel.name}: its METADATA lists no requirements for the `{name}` extra")
    env = target_environment(profile)
    reqs = [r for r in listed if r.marker is None or r.marker.evaluate({**env, "extra": name})]
    out = [_without_marker(r) for r in reqs]
    if engine == "ort-training":
        out = [r for r in out if not is_plain_ort(r)]
        if not any(is_ort(r) for r in out):
            out.append(ORT_REQUIREMENT)
        if not profile.ort_from_pypi:
            out = [r for r in out if not is_ort(r)] + list(ORT_TRAINING_REQUIRES)
    elif engine == "portable" and any(is_ort(r) for r in out):  # a packaging bug, not user input
        raise FlashError(
            f"{wheel.name}: its `{EDGE_PORTABLE}` extra lists onnxruntime-training; the portable engine must not need it"
        )
    return out + extra


def installed_engine(engine: str, requirements: list[str]) -> str:
    """The engine the device will run: the configured one, or for "auto" the one its requirement
    set installs (onnxruntime-training means ort-training)."""
    if engine != "auto":
        return engine
    return "ort-training" if any(is_ort(r) for r in requirements) else "portable"


def _without_marker(req: Requirement) -> str:
    return f"{req.name}{'[' + ','.join(sorted(req.extras)) + ']' if req.extras else ''}{req.specifier}"


def download_dependencies(requirements: list[str], profile: Profile, dest: Path, wheelhouse: Path | None) -> list[Path]:
    """`pip download` binary wheels for the profile's platform and Python into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-input", "--only-binary=:all:"]
    cmd += ["--implementation", "cp", "--python-version", profile.python, "--dest", str(dest)]
    for tag in profile.platform_tags():
        cmd += ["--platform", tag]
    if wheelhouse is not None:
        cmd += ["--no-index", "--find-links", str(wheelhouse)]
    proc = subprocess.run(cmd + requirements, capture_output=True, text=True)
    if proc.returncode != 0:
        where = f"from --wheelhouse {wheelhouse}" if wheelhouse else "from the package index"
        raise FlashError(
            f"could not download dependency wheels for {profile.arch}/Python {profile.python} {where} "
            f"({_last_error_line(proc.stdout + proc.stderr)}); use --wheelhouse DIR or --no-deps-wheels"
        )
    return sorted(dest.glob("*.whl"))


def _last_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR") or "Error" in line]
    return (errors or lines or ["no output"])[-1][:300]
