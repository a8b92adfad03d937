"""Assembling a device image: a directory (or a .tar.gz of one) that installs one device.

Layout:
    install.sh  README.md  device.toml  fleetlearn-device.service  image.json  SHA256SUMS
    requirements.txt  what install.sh installs beside the fleetlearn wheel, resolved at flash
                      time for the device's architecture and engine (not by pip's markers there)
    wheels/     fleetlearn wheel + dependency wheels for the device's platform
    bundle/     the export bundle (verified before and after the copy)
    secrets/    this device's credentials only (0600, directory 0700)
    build_ort_aarch64.sh  (engine ort-training where onnxruntime-training is not on PyPI; UNTESTED recipe)
    signing.pub           (when a fresh signing key was made: for the operator to register)

Everything is built in a temporary directory beside the target and renamed into place at the
end, so a failure or Ctrl-C leaves nothing behind. The same inputs give byte-identical files
(and a byte-identical tarball): fixed mtimes, sorted entries, uid/gid 0, no timestamps inside.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleetlearn.edge_runtime.core.bundle import MANIFEST, load_bundle
from fleetlearn.edge_runtime.core.errors import BundleError
from fleetlearn.firmware_configs import render, wheels
from fleetlearn.firmware_configs.errors import FlashError
from fleetlearn.firmware_configs.spec import SERVICE_NAME, ImageSpec
from fleetlearn.provisioning.credentials import AGGREGATOR_PUB, SIGNING_KEY

IMAGE_FORMAT = "fleetlearn-device-image"
IMAGE_FORMAT_VERSION = 1
ORT_RECIPE = Path(__file__).resolve().parent / "build_ort_aarch64.sh"


@dataclass(frozen=True)
class WheelOptions:
    project_wheel: Path | None = None  # a prebuilt fleetlearn wheel (--wheel); else built from the source tree
    deps: bool = True  # False: --no-deps-wheels (install.sh installs dependencies from the index)
    wheelhouse: Path | None = None  # resolve dependency wheels from here only (no network)


@dataclass(frozen=True)
class ImageResult:
    path: Path
    files: list[str]  # relative paths in the image, sorted
    ort_in_image: bool
    engine: str  # the engine the image's wheels install: "portable" or "ort-training"
    signing_public_key: bytes | None


def is_tarball(out: Path) -> bool:
    return out.name.endswith(".tar.gz") or out.name.endswith(".tgz")


def check_output_path(out: Path) -> Path:
    """Refuse an existing target or a missing parent before anything is written."""
    if out.exists() or out.is_symlink():
        raise FlashError(f"--out {out}: already exists; remove it or choose another path")
    if not out.parent.is_dir():
        raise FlashError(f"--out {out}: directory {out.parent} does not exist")
    if is_tarball(out) and len(out.name) <= len(".tar.gz"):
        raise FlashError(f"--out {out}: needs a name before .tar.gz")
    return out


def _copy_bundle(src: Path, dest: Path) -> None:
    """Copy exactly the files the manifest lists (no stray files), then verify the copy."""
    manifest = load_bundle(src)
    dest.mkdir()
    for name in sorted(manifest.files) + [MANIFEST]:
        shutil.copyfile(src / name, dest / name)
    try:
        load_bundle(dest)
    except BundleError as exc:  # the source changed under us, or a disk error
        raise FlashError(f"the copied bundle does not verify: {exc}") from None


def _write(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    os.chmod(path, mode)


def _is_secret(rel: str) -> bool:
    return rel.split("/")[0] == "secrets"


def _normalise(root: Path) -> list[str]:
    """Fixed modes and mtimes for every entry; returns the sorted relative file list."""
    files = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            os.chmod(path, 0o700 if _is_secret(rel) else 0o755)
        else:
            executable = path.suffix == ".sh"
            os.chmod(path, 0o600 if _is_secret(rel) else (0o755 if executable else 0o644))
            files.append(rel)
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        os.utime(path, (wheels.SOURCE_DATE_EPOCH, wheels.SOURCE_DATE_EPOCH), follow_symlinks=False)
    return files


def _sha256sums(root: Path, files: list[str]) -> str:
    lines = []
    for rel in files:
        digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        lines.append(f"{digest}  {rel}\n")
    return "".join(lines)


def _write_tarball(root: Path, out: Path, top: str) -> None:
    """A deterministic .tar.gz of `root` under directory `top`: sorted, mtime fixed, owner root."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in [root] + sorted(root.rglob("*")):
                    rel = path.relative_to(root).as_posix()
                    info = tar.gettarinfo(str(path), arcname=top if rel == "." else f"{top}/{rel}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.mtime = wheels.SOURCE_DATE_EPOCH
                    info.pax_headers = {}
                    if info.isfile():
                        with open(path, "rb") as f:
                            tar.addfile(info, f)
                    else:
                        tar.addfile(info)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def build_image(spec: ImageSpec, out: Path, options: WheelOptions) -> ImageResult:
    """Write the image for `spec` at `out` (a directory, or a .tar.gz). Raises FlashError."""
    check_output_path(out)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        root = staging / "image"
        root.mkdir()
        wheels_dir = root / "wheels"
        wheels_dir.mkdir()

        # 1. The agent's wheel, then its dependencies for the device's platform.
        if options.project_wheel is not None:
            project_wheel = Path(shutil.copyfile(options.project_wheel, wheels_dir / options.project_wheel.name))
        else:
            src_root = wheels.project_root()
            if src_root is None:
                raise FlashError("fleetlearn is not running from a source tree, so it cannot build its wheel: pass --wheel FILE")
            project_wheel = wheels.build_project_wheel(src_root, wheels_dir)
        signing = spec.secrets.has(SIGNING_KEY) or spec.secrets.has(AGGREGATOR_PUB)
        # Signature checks need `cryptography` on the device; the edge extras do not list it.
        extra = ["cryptography>=42"] if signing else []
        # Chosen for the device's architecture and engine here, on the operator's machine:
        # install.sh installs exactly this list, so nothing depends on pip's markers on the device.
        requirements = wheels.dependency_requirements(project_wheel, spec.profile, spec.engine, extra)
        engine = wheels.installed_engine(spec.engine, requirements)
        downloaded: list[str] = []
        if options.deps:
            with tempfile.TemporaryDirectory(dir=staging) as dl:
                for whl in wheels.download_dependencies(requirements, spec.profile, Path(dl), options.wheelhouse):
                    shutil.copyfile(whl, wheels_dir / whl.name)
                    downloaded.append(whl.name)
        ort_in_image = any(wheels.is_ort(name) for name in downloaded)
        needs_ort_wheel = engine == "ort-training" and not spec.profile.ort_from_pypi

        # 2. Bundle, secrets, rendered files.
        _copy_bundle(spec.bundle_dir, root / "bundle")
        for name, data in sorted(spec.secrets.files.items()):
            _write(root / "secrets" / name, data, 0o600)
        extra_files = ["image.json", "requirements.txt"]
        _write(root / "requirements.txt", "".join(f"{r}\n" for r in requirements))
        if needs_ort_wheel:
            shutil.copyfile(ORT_RECIPE, root / ORT_RECIPE.name)
            extra_files.append(ORT_RECIPE.name)
        if spec.secrets.signing_public_key is not None:
            _write(root / "signing.pub", spec.secrets.signing_public_key)
            extra_files.append("signing.pub")
        _write(root / "device.toml", render.device_toml(spec))
        _write(root / SERVICE_NAME, render.systemd_unit(spec))
        _write(
            root / "install.sh",
            render.install_script(
                spec,
                fleetlearn_wheel=project_wheel.name,
                engine=engine,
                needs_ort_wheel=needs_ort_wheel,
                deps_in_image=options.deps,
            ),
            0o755,
        )
        _write(
            root / "README.md",
            render.readme(
                spec,
                fleetlearn_wheel=project_wheel.name,
                engine=engine,
                needs_ort_wheel=needs_ort_wheel,
                deps_in_image=options.deps,
                extra_files=extra_files,
            ),
        )
        _write(
            root / "image.json",
            json.dumps(
                _image_info(spec, project_wheel.name, requirements, downloaded, engine, ort_in_image, options),
                indent=1,
                sort_keys=True,
            )
            + "\n",
        )

        # 3. Checksums over everything else, then fixed metadata, then into place.
        files = _normalise(root)
        _write(root / "SHA256SUMS", _sha256sums(root, files))
        files = _normalise(root)
        if is_tarball(out):
            top = out.name[: -len(".tar.gz")] if out.name.endswith(".tar.gz") else out.name[: -len(".tgz")]
            _write_tarball(root, out, top)
        else:
            if out.exists():  # appeared while we were building
                raise FlashError(f"--out {out}: already exists; remove it or choose another path")
            os.rename(root, out)
        return ImageResult(out, files, ort_in_image, engine, spec.secrets.signing_public_key)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _image_info(
    spec: ImageSpec,
    project_wheel: str,
    requirements: list[str],
    downloaded: list[str],
    engine: str,
    ort_in_image: bool,
    options: WheelOptions,
) -> dict:
    """What the image was made from. No timestamps and nothing secret: the file must be reproducible."""
    p = spec.profile
    if engine == "portable":
        ort_note = "not used: the portable engine runs on plain onnxruntime"
    elif ort_in_image:
        ort_note = ""
    elif p.ort_from_pypi:
        ort_note = "not in the image: install.sh installs it from PyPI"
    else:
        ort_note = (
            "not in the image and not on PyPI for this board: build it with build_ort_aarch64.sh (UNTESTED) and pass --ort-wheel"
        )
    return {
        "format": IMAGE_FORMAT,
        "format_version": IMAGE_FORMAT_VERSION,
        "device_id": spec.device_id,
        "fleet": spec.fleet,
        "broker": spec.broker,
        "profile": p.name,
        "arch": p.arch,
        "python": p.python,
        "glibc": p.glibc,
        "prefix": spec.prefix,
        "engine": {"configured": spec.engine, "installed": engine},
        "fleetlearn_wheel": project_wheel,
        "requirements": requirements,
        "dependency_wheels": sorted(downloaded),
        "dependency_wheels_included": options.deps,
        "onnxruntime_training": {"status": p.ort_training.status, "in_image": ort_in_image, "note": ort_note},
        "bundle": {"model_name": spec.manifest.model_name, "model_hash": spec.manifest.model_hash},
        "secrets": sorted(spec.secrets.files),
        "hardware_tested": p.hardware_tested,
        "verified": {"how": p.verified, "evidence": p.evidence},
    }
