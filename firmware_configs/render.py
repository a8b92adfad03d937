"""Rendering the text files of an image: device.toml, the systemd unit, install.sh and README.md.

Templates live in firmware_configs/templates/ with `@@name@@` placeholders (not `$name`: the
shell script and the unit are full of `$`). Every placeholder must be filled and every value
used, so a renamed placeholder fails loudly instead of shipping `@@prefix@@` to a device.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.errors import ConfigError
from fleetlearn.edge_runtime.device.config import DeviceConfig, TrainingConfig, parse_device_config
from fleetlearn.firmware_configs.errors import FlashError
from fleetlearn.firmware_configs.spec import ImageSpec, check_device_path
from fleetlearn.provisioning.credentials import AGGREGATOR_PUB, CA_CERT, MQTT_PASSWORD, SIGNING_KEY

TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
_PLACEHOLDER_RE = re.compile(r"@@([a-z_]+)@@")


def fill(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES_DIR / template).read_text(encoding="utf-8")
    wanted = set(_PLACEHOLDER_RE.findall(text))
    missing, unused = wanted - values.keys(), values.keys() - wanted
    if missing or unused:  # a bug in this package, not user input
        raise RuntimeError(f"template {template}: missing values {sorted(missing)}, unused values {sorted(unused)}")
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(1)], text)


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def device_config_doc(spec: ImageSpec) -> dict[str, Any]:
    """The device.toml document: profile defaults, then credentials, then `--set` overrides."""
    p = spec.profile
    training: dict[str, Any] = {
        "threads": p.training.threads,
        "batch_size": p.training.batch_size,
        "local_epochs": p.training.local_epochs,
        "seed": _default(TrainingConfig, "seed"),
        "engine": p.training.engine,
    }
    if p.training.max_steps is not None:
        training["max_steps"] = p.training.max_steps
    doc: dict[str, Any] = {
        "profile": p.name,
        "device_id": spec.device_id,
        "fleet": spec.fleet,
        "broker": spec.broker,
        "mqtt_protocol": _default(DeviceConfig, "mqtt_protocol"),
        "keepalive": _default(DeviceConfig, "keepalive"),
        "bundle": spec.bundle_path,
        "data": spec.data,
        "state_dir": p.state_dir,
        "training": training,
    }
    s = spec.secrets
    if s.has(MQTT_PASSWORD):
        doc["auth"] = {"username": spec.device_id, "password_file": spec.secret_path(MQTT_PASSWORD)}
    if s.has(CA_CERT):
        doc["tls"] = {"ca_file": spec.secret_path(CA_CERT)}
    signing = {}
    if s.has(SIGNING_KEY):
        signing["key_file"] = spec.secret_path(SIGNING_KEY)
    if s.has(AGGREGATOR_PUB):
        signing["aggregator_public_key"] = spec.secret_path(AGGREGATOR_PUB)
    if signing:
        doc["signing"] = signing
    return _merge(doc, spec.config_overrides)


def checked_config(spec: ImageSpec) -> tuple[dict[str, Any], DeviceConfig]:
    """The document and the DeviceConfig the device will parse from it (same validator as the device)."""
    doc = device_config_doc(spec)
    # Paths go unquoted into the unit's ReadWritePaths= and must not depend on a working directory.
    for table, key in ((None, "state_dir"), ("tls", "cert_file"), ("tls", "key_file")):
        value = (doc.get(table) or {}).get(key) if table else doc.get(key)
        if isinstance(value, str):
            check_device_path(value, f"--set {table + '.' if table else ''}{key}")
    try:
        return doc, parse_device_config(doc)
    except ConfigError as exc:
        raise FlashError(f"device config for {spec.device_id}: {exc}") from None


def device_toml(spec: ImageSpec) -> str:
    try:
        import tomli_w  # operator side only (server extra)
    except ImportError:
        raise FlashError("writing device.toml needs the `tomli-w` package: pip install 'fleetlearn[server]'") from None

    doc, _ = checked_config(spec)
    header = (
        f"# fleetlearn device config for {spec.device_id!r}, rendered by `fleetlearn flash` from profile "
        f"{spec.profile.name!r}.\n# Schema: edge_runtime/config.py (unknown keys are errors). "
        "install.sh rewrites the paths when given another --prefix.\n\n"
    )
    return header + tomli_w.dumps(doc)


def systemd_unit(spec: ImageSpec) -> str:
    _, cfg = checked_config(spec)
    s = spec.profile.systemd
    limits = [f"MemoryMax={s.memory_max}"]
    if s.memory_high is not None:
        limits.append(f"MemoryHigh={s.memory_high}")
    if s.memory_swap_max is not None:
        limits.append(f"MemorySwapMax={s.memory_swap_max}")
    if s.cpu_quota is not None:
        limits.append(f"CPUQuota={s.cpu_quota}")
    limits += [f"TasksMax={s.tasks_max}", f"Nice={s.nice}"]
    return fill(
        "fleetlearn-device.service",
        {
            "device_id": spec.device_id,
            "fleet": spec.fleet,
            "profile": spec.profile.name,
            "prefix": spec.prefix,
            "threads": str(cfg.training.threads),
            "limits": "\n".join(limits),
            "read_write_paths": f"{cfg.state_dir} {spec.bundle_parent}",
            "private_devices": "yes" if s.private_devices else "no",
        },
    )


def install_script(spec: ImageSpec, *, fleetlearn_wheel: str, engine: str, needs_ort_wheel: bool, deps_in_image: bool) -> str:
    return fill(
        "install.sh",
        {
            "device_id": spec.device_id,
            "profile": spec.profile.name,
            "arch": spec.profile.arch,
            "python": spec.profile.python,
            "prefix": spec.prefix,
            "engine": engine,
            "needs_ort_wheel": "1" if needs_ort_wheel else "0",
            "deps_in_image": "1" if deps_in_image else "0",
            "fleetlearn_wheel": fleetlearn_wheel,
        },
    )


ENGINE_SUMMARY = {
    "portable": "portable: the bundle's training-step graph on plain onnxruntime (no onnxruntime-training, no torch)",
    "ort-training": "ort-training: onnxruntime-training 1.19.2's on-device training API",
}
VERIFIED_SUMMARY = {
    "untested": "**no**: reasoned from the board's specs; nobody has run this profile",
    "emulated": "**emulated only**, not on the board",
    "hardware": "yes",
}


def readme(
    spec: ImageSpec, *, fleetlearn_wheel: str, engine: str, needs_ort_wheel: bool, deps_in_image: bool, extra_files: list[str]
) -> str:
    p = spec.profile
    _, cfg = checked_config(spec)
    if engine == "portable":
        runtime = (
            "plain onnxruntime, included in `wheels/`"
            if deps_in_image
            else "plain onnxruntime, installed from PyPI by install.sh"
        )
    elif needs_ort_wheel:
        runtime = f"onnxruntime-training 1.19.2, **not on PyPI for {p.arch}**: build it with `build_ort_aarch64.sh` (UNTESTED), then `./install.sh --ort-wheel FILE`"
    elif deps_in_image:
        runtime = "onnxruntime-training 1.19.2, included in `wheels/`"
    else:
        runtime = (
            "onnxruntime-training 1.19.2, installed from PyPI by install.sh (this image was flashed without dependency wheels)"
        )
    if deps_in_image and needs_ort_wheel:
        wheels_note = (
            ", and every dependency except onnxruntime-training, so the install needs no network once you have that wheel."
        )
    elif deps_in_image:
        wheels_note = (
            ", and every dependency for Python "
            + p.python
            + " on "
            + p.arch
            + " (`requirements.txt`): the install needs no network."
        )
    else:
        wheels_note = (
            ". Its dependencies (`requirements.txt`) are not included: install.sh downloads them from the package index."
        )
    secrets = sorted(spec.secrets.files)
    secrets_note = (
        "this device's own credentials only (" + ", ".join(f"`{n}`" for n in secrets) + "), mode 0600. Keep them secret."
        if secrets
        else "none (flashed without --credentials: the broker must allow anonymous devices)."
    )
    extra = "".join(f"- `{name}`: {why}\n" for name, why in _extra_file_notes(spec, extra_files))
    tested = VERIFIED_SUMMARY[p.verified]  # check_profile ties "hardware" to hardware_tested
    detail = f"**How this profile was proven ({p.verified})**: {p.evidence or 'not at all yet: the numbers come from the board specs.'}"
    if engine == "ort-training" or p.ort_training.status != "pypi":
        detail += f"\n\n**onnxruntime-training on this board ({p.ort_training.status})**: {p.ort_training.detail}"
    if p.gpu:
        detail += f"\n\nGPU: {p.gpu}"
    if p.notes:
        detail += f"\n\nNote: {p.notes}"
    return fill(
        "README.md",
        {
            "device_id": spec.device_id,
            "fleet": spec.fleet,
            "broker": spec.broker,
            "profile": p.name,
            "profile_description": p.description,
            "arch": p.arch,
            "os": p.os,
            "python": p.python,
            "prefix": spec.prefix,
            "engine_summary": ENGINE_SUMMARY[engine]
            + (f' (device.toml says `engine = "{spec.engine}"`)' if spec.engine != engine else ""),
            "runtime_summary": runtime,
            "hardware_tested": tested,
            "ort_detail": detail,
            "fleetlearn_wheel": fleetlearn_wheel,
            "wheels_note": wheels_note,
            "model_name": spec.manifest.model_name,
            "model_hash": spec.manifest.model_hash[:12],
            "secrets_note": secrets_note,
            "extra_files": extra,
            "data": cfg.data,
            "install_args": " --ort-wheel onnxruntime_training-1.19.2+cpu-cp311-cp311-linux_aarch64.whl"
            if needs_ort_wheel
            else "",
            "state_dir": cfg.state_dir,
        },
    )


def _extra_file_notes(spec: ImageSpec, names: list[str]) -> list[tuple[str, str]]:
    notes = {
        "build_ort_aarch64.sh": "an UNTESTED recipe for the onnxruntime-training 1.19.2 wheel the ort-training engine needs here (read its header first).",
        "requirements.txt": "exactly what install.sh installs beside the agent, chosen at flash time for this board's architecture and engine.",
        "signing.pub": "this device's new public signing key: the operator registers it with the aggregator.",
        "image.json": "what this image was made from (profile, versions, wheels), for the operator.",
    }
    return [(n, notes[n]) for n in names if n in notes]
