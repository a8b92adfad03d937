"""The Raspberry Pi image under emulation, for the record (numbers, not pass/fail; needs root,
like tests/test_arm64_emulated.py, and the same caches under /var/cache/fleetlearn):

* arm64 root set-up: whether the cached tarball existed (cold build otherwise), and the time to
  unpack and mount it;
* `install.sh` of the raspberry-pi-4 image inside the emulated root (offline, no systemd), and the
  installed prefix's size on disk (`du -sk`), beside the generic-x86_64 image (ort-training)
  and generic-x86_64 with the portable engine, both installed natively in the same run;
* the portable engine's step time (Boston MLP, batch 8, AdamW, one thread, the same batches) in
  the emulated root and natively in a plain-onnxruntime venv, in the same run.

    sudo .venv/bin/python bench/bench_emulated.py [--steps 200] [--reps 3]

Goal (issue 11): installed size <= 120 MB for the portable engine. Emulation runs numerical code
hundreds of times slower than native: its step time says nothing about a real Pi's speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_device import batches, export_bundle  # noqa: E402
from bench_engines import PORTABLE_LOOP, make_venv  # noqa: E402
from rows import Row, emit  # noqa: E402

from tests import arm64_root  # noqa: E402


def flash(*args: str | Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "fleetlearn.cli",
        "flash",
        "--broker",
        "mqtt://127.0.0.1:1883",
        "--device-id=bench-0",
        *map(str, args),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"flash failed: {proc.stderr[-2000:]}")


def du_mb(path: Path) -> float:
    """Disk usage of `path` as `du -sk` reports it, in MB (1e6 bytes)."""
    out = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return round(int(out.split()[0]) * 1024 / 1e6, 1)


def native_install(image: Path, prefix: Path) -> float:
    python = (
        "python3.11" if subprocess.run(["sh", "-c", "command -v python3.11"], capture_output=True).returncode == 0 else "python3"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    proc = subprocess.run(["sh", str(image / "install.sh"), "--prefix", str(prefix), "--no-systemd", "--python", python],
                          capture_output=True, text=True, env=env, cwd=image.parent)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"install.sh of {image.name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return du_mb(prefix)


def loop_us(python: list[str], bundle: str, npz: str, steps: int, reps: int, cwd: str = "/") -> list[float]:
    out = subprocess.run(
        [*python, "-c", PORTABLE_LOOP, bundle, str(steps), str(reps), npz], capture_output=True, text=True, cwd=cwd
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("US")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="steps per repetition (emulated steps are slow)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--venvs", default="/tmp/fleetlearn-bench-venvs")
    args = p.parse_args()
    try:
        arm64_root.ensure_binfmt()
    except arm64_root.Unavailable as exc:
        print(f"bench_emulated: skipped: {exc}")
        return 0
    from fleetlearn.firmware_configs import wheels

    result: dict = {"load_average_start": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.monotonic()
    tarball, built = arm64_root.ensure_tarball()
    result["arm64_root"] = {
        "cache": "cold (built now)" if built else "warm",
        "tarball_s": round(time.monotonic() - t0, 1),
        "tarball_mb": round(tarball.stat().st_size / 1e6, 1),
    }
    with tempfile.TemporaryDirectory(prefix="fleetlearn-bench-emu-") as tmp:
        work = Path(tmp)
        bundle = export_bundle(work / "bundle")
        wheel = wheels.build_project_wheel(wheels.project_root(), work / "wheel")
        data = batches(args.steps + 50)
        npz = work / "batches.npz"
        np.savez(npz, x=np.stack([b[0] for b in data]), y=np.stack([b[1] for b in data]))

        # Native references in the same run: the x86_64 images, and the portable loop on plain onnxruntime.
        sizes = {}
        for name, extra in (
            ("generic-x86_64 (ort-training)", []),
            ("generic-x86_64 (portable)", ["--set", "training.engine=portable"]),
        ):
            image = work / f"img-{len(sizes)}"
            flash(
                "--profile",
                "generic-x86_64",
                "--bundle",
                bundle,
                "--wheel",
                wheel,
                "--out",
                image,
                "--set",
                "state_dir=/opt/fleetlearn/state",
                *extra,
            )
            sizes[name] = native_install(image, work / f"opt-{len(sizes)}")
        plain_py = make_venv(Path(args.venvs) / "edge-portable", "edge-portable")
        native = loop_us([str(plain_py)], str(bundle), str(npz), args.steps, args.reps, cwd=str(work))

        emu_work = Path(tempfile.mkdtemp(prefix="fleetlearn-arm64-", dir="/var/tmp"))
        try:
            t1 = time.monotonic()
            with arm64_root.Arm64Root(emu_work, tarball) as root:
                result["arm64_root"]["unpack_mount_s"] = round(time.monotonic() - t1, 1)
                image = root.path / "tmp" / "pi4"
                flash("--profile", "raspberry-pi-4", "--bundle", bundle, "--wheel", wheel, "--out", image,
                      "--wheelhouse", arm64_root.cached_wheelhouse(wheel, "raspberry-pi-4"))  # fmt: skip
                t2 = time.monotonic()
                proc = root.run("sh", "/tmp/pi4/install.sh", timeout=1800)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
                result["pi4_install_sh_emulated_s"] = round(time.monotonic() - t2, 1)
                sizes["raspberry-pi-4 (portable, aarch64, emulated root)"] = du_mb(root.path / "opt" / "fleetlearn")
                (root.path / "tmp" / "batches.npz").write_bytes(npz.read_bytes())
                t3 = time.monotonic()
                probe = root.run("/opt/fleetlearn/venv/bin/python", "-c", "import onnxruntime, numpy")
                result["import_onnxruntime_numpy_emulated_s"] = (
                    round(time.monotonic() - t3, 1) if probe.returncode == 0 else probe.stderr[-300:]
                )
                emulated = loop_us(
                    root.command("/opt/fleetlearn/venv/bin/python"),
                    "/opt/fleetlearn/bundle/current",
                    "/tmp/batches.npz",
                    args.steps,
                    args.reps,
                )
        finally:
            arm64_root.remove_unmounted(emu_work)
    result["installed_prefix_du_mb"] = sizes
    result["portable_us_per_step"] = {
        "native x86_64 (plain onnxruntime)": round(statistics.median(native), 1),
        "emulated aarch64 (qemu-user)": round(statistics.median(emulated), 1),
    }
    result["emulated_vs_native"] = round(statistics.median(emulated) / statistics.median(native), 1)
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result, indent=1))
    pi4 = sizes["raspberry-pi-4 (portable, aarch64, emulated root)"]
    emit(
        Row(
            bench="bench_emulated",
            what="installed prefix on disk (du -sk of /opt/fleetlearn after install.sh: venv, bundle, config), "
            "raspberry-pi-4 image, portable engine, aarch64 under qemu-user",
            value=pi4,
            unit="MB",
            baseline_what="generic-x86_64 image with the portable engine, installed natively in this run",
            baseline=sizes["generic-x86_64 (portable)"],
            goal="<= 120 MB",
            met=pi4 <= 120,
        )
    )
    emit(
        Row(
            bench="bench_emulated",
            what=f"portable step time under qemu-user aarch64 emulation (Boston MLP, batch 8, AdamW, 1 thread, "
            f"median of {args.reps} x {args.steps} steps; says nothing about a real Pi's speed)",
            value=round(statistics.median(emulated), 1),
            unit="us/step",
            baseline_what="the same loop natively, plain onnxruntime venv",
            baseline=round(statistics.median(native), 1),
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
