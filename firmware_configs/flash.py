"""Write a self-contained image for one device: the agent's wheels, the model bundle, the
rendered device config, that device's credentials, a systemd unit and install.sh.

Copy the image to the device and run `sudo ./install.sh` there (docs/flashing.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Nothing heavy at import time: `fleetlearn flash --help` must stay instant.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile", required=True, help="device profile name (e.g. raspberry-pi-4, generic-x86_64) or a profile .toml file"
    )
    parser.add_argument("--bundle", required=True, type=Path, help="export bundle directory (from `fleetlearn export`)")
    parser.add_argument("--device-id", required=True, help="this device's id: letters, digits, '.', '_', '-'")
    parser.add_argument("--broker", required=True, help="broker URL as the device sees it, e.g. mqtts://broker.lan:8883")
    parser.add_argument("--fleet", default="default", help="fleet name (default: default)")
    parser.add_argument("--data", help="training data path on the device (default PREFIX/data/train.npz)")
    parser.add_argument(
        "--credentials",
        type=Path,
        help="credentials directory from `fleetlearn broker-config`; only this device's files are copied",
    )
    parser.add_argument(
        "--new-signing-key",
        action="store_true",
        help="make a fresh Ed25519 signing key for this device (public half written as signing.pub in the image)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a device config key (training.batch_size=16) or a systemd limit (systemd.memory_max=512M); repeatable",
    )
    parser.add_argument("--prefix", default="/opt/fleetlearn", help="install prefix on the device (default /opt/fleetlearn)")
    parser.add_argument("--out", required=True, type=Path, help="image to write: a directory, or a .tar.gz file; must not exist")
    parser.add_argument(
        "--no-deps-wheels",
        action="store_true",
        help="do not carry dependency wheels (install.sh then installs them from the package index)",
    )
    parser.add_argument("--wheelhouse", type=Path, help="take dependency wheels from this directory only (no network)")
    parser.add_argument(
        "--wheel", type=Path, help="use this prebuilt fleetlearn wheel instead of building one from the source tree"
    )


def run(args: argparse.Namespace) -> int:
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.errors import BundleError
    from fleetlearn.edge_runtime.core.names import check_name
    from fleetlearn.firmware_configs import image, overrides, profiles, render, wheels
    from fleetlearn.firmware_configs.errors import FlashError
    from fleetlearn.firmware_configs.spec import ImageSpec, check_device_path
    from fleetlearn.provisioning import credentials

    # Every check that can fail on user input happens here, before anything is written.
    device_id = check_name(args.device_id, "device id")
    fleet = check_name(args.fleet, "fleet")
    profile = profiles.load_profile(args.profile)
    out = image.check_output_path(args.out)
    try:
        manifest = load_bundle(args.bundle)
    except BundleError as exc:
        raise FlashError(f"--bundle: {exc}") from None
    prefix = check_device_path(args.prefix, "--prefix")
    data = check_device_path(args.data or f"{prefix}/data/train.npz", "--data")
    if args.no_deps_wheels and args.wheelhouse:
        raise FlashError("--no-deps-wheels and --wheelhouse contradict each other: choose one")
    if args.wheelhouse is not None and not args.wheelhouse.is_dir():
        raise FlashError(f"--wheelhouse {args.wheelhouse}: not a directory")
    project_wheel = wheels.check_project_wheel(args.wheel) if args.wheel else None
    changes = overrides.parse_overrides(args.overrides)
    if changes.systemd:
        profile = profiles.replace_systemd(profile, **changes.systemd)
    secrets = credentials.device_secrets(args.credentials, device_id, args.new_signing_key)
    spec = ImageSpec(
        profile=profile,
        device_id=device_id,
        fleet=fleet,
        broker=args.broker,
        prefix=prefix,
        data=data,
        bundle_dir=args.bundle,
        manifest=manifest,
        secrets=secrets,
        config_overrides=changes.config,
    )
    render.checked_config(spec)  # the device's own validator, before any file exists

    if profile.ort_training.status == "unsupported":
        print(
            f"fleetlearn flash: warning: profile {profile.name} is unsupported as shipped: {profile.ort_training.detail}",
            file=sys.stderr,
        )
    result = image.build_image(
        spec, out, image.WheelOptions(project_wheel, deps=not args.no_deps_wheels, wheelhouse=args.wheelhouse)
    )

    print(f"wrote {result.path} for device {device_id} (profile {profile.name}, {profile.arch}, {len(result.files)} files)")
    runtime = "plain onnxruntime" if result.engine == "portable" else "onnxruntime-training 1.19.2"
    print(f'engine: {result.engine} ({runtime}; device.toml says engine = "{spec.engine}")')
    print(
        f"verified: {profile.verified}; hardware_tested: {str(profile.hardware_tested).lower()}"
        + (f" ({profile.evidence})" if profile.evidence else "")
    )
    if result.engine == "ort-training" and not result.ort_in_image and not profile.ort_from_pypi:
        print(
            f"note: onnxruntime-training is not on PyPI for {profile.arch}: build it with build_ort_aarch64.sh (untested) and run install.sh --ort-wheel FILE, or flash with --set training.engine=portable"
        )
    if result.signing_public_key is not None:
        print("new signing key: register the public key signing.pub from the image with the aggregator")
    return 0
