"""Training engines side by side (numbers, not pass/fail): the portable engine (plain onnxruntime
on the bundle's step graph), the onnxruntime-training engine and PyTorch eager, in one run.

    .venv/bin/python bench/bench_engines.py [--steps 2000] [--venvs DIR]

* step time: the Boston MLP (13-32-24-16-1), batch 8, AdamW, one thread, the same batches, each
  engine through its own `_train_step` (what `Engine.train` calls per batch); repetitions are
  interleaved so that load from other processes hits every engine alike. Reported: the fastest
  repetition of each (the least disturbed one; on a shared 2-core VM this is the reproducible
  number), the median, and the median of the per-repetition ratios.
  The portable engine is timed twice: in this venv (onnxruntime-training 1.19.2's
  InferenceSession) and in a venv with plain onnxruntime (the wheel devices install).
* peak RSS (VmHWM) of a real device process through a full round on mosquitto, per engine; the
  portable one runs in the plain-onnxruntime venv.
* installed size: site-packages of a fresh venv with `fleetlearn[edge]` (x86_64:
  onnxruntime-training) and with `fleetlearn[edge-portable]`.

Goals (issue 11): portable >= 10x PyTorch eager, <= 1.3x onnxruntime-training; portable device
peak RSS < 70 MB. The venvs are kept in --venvs (default /tmp/fleetlearn-bench-venvs) for reruns.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_device import RSS_PROBE, batches, export_bundle  # noqa: E402
from rows import Row, emit, load_average  # noqa: E402

# Run in the plain-onnxruntime venv: the portable engine's loop, printed as us/step per repetition.
PORTABLE_LOOP = """
import sys, time, numpy as np
from fleetlearn.edge_runtime.core.bundle import load_bundle
from fleetlearn.edge_runtime.engines.select import open_engine
bundle, steps, reps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
e = open_engine(bundle, load_bundle(bundle), "portable", threads=1)
d = np.load(sys.argv[4]); xs, ys = d["x"], d["y"]
e._begin_train(1e-3, 0.0)
for i in range(50): e._train_step(xs[i], ys[i])
for r in range(reps):
    t = time.perf_counter()
    for i in range(steps): e._train_step(xs[i], ys[i])
    print("US", (time.perf_counter() - t) / steps * 1e6, flush=True)
"""


def make_venv(where: Path, extra: str) -> Path:
    py = where / "bin" / "python"
    if py.exists() and (where / ".installed").exists():  # reuse it, with this checkout's fleetlearn
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "--force-reinstall", str(ROOT)],
            check=True,
        )
        return py
    venv.EnvBuilder(with_pip=True, clear=True).create(where)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[{extra}]"], check=True)
    (where / ".installed").touch()
    return py


INSTALLER_TOOLS = ("pip", "setuptools", "_distutils_hack", "pkg_resources", "distutils-precedence.pth")


def site_packages_mb(where: Path) -> float:
    """Installed size of the venv's packages, without pip/setuptools (a device image needs neither)."""
    sp = next((where / "lib").glob("python3*/site-packages"))
    total = 0
    for dirpath, dirs, files in os.walk(sp):
        if Path(dirpath) == sp:
            dirs[:] = [d for d in dirs if not d.startswith(INSTALLER_TOOLS)]
            files = [f for f in files if not f.startswith(INSTALLER_TOOLS)]
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.path.getsize(p)
    return total / 1e6


def time_engines(bundle: Path, data, reps: int, portable_py: Path, work: Path) -> dict[str, list[float]]:
    """us/step of each engine in each of `reps` interleaved repetitions."""
    import torch

    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.engines.select import open_engine
    from fleetlearn.export import resolve_model

    manifest = load_bundle(bundle)
    engines = {name: open_engine(bundle, manifest, name, threads=1) for name in ("ort-training", "portable")}
    for e in engines.values():
        e._begin_train(1e-3, 0.0)
        for xb, yb in data[:50]:
            e._train_step(xb, yb)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = resolve_model("boston-mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    tdata = [(torch.from_numpy(xb), torch.from_numpy(yb)) for xb, yb in data]

    def torch_step(xb, yb):
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()

    npz = work / "batches.npz"
    np.savez(npz, x=np.stack([b[0] for b in data]), y=np.stack([b[1] for b in data]))
    times: dict[str, list[float]] = {"ort-training": [], "portable": [], "torch": [], "portable-plain-ort": []}
    torch_steps = max(len(data) // 5, 50)  # torch is ~10x slower: fewer steps, same batches
    for _ in range(reps):
        for name, e in engines.items():
            start = time.perf_counter()
            for xb, yb in data:
                e._train_step(xb, yb)
            times[name].append((time.perf_counter() - start) / len(data) * 1e6)
        start = time.perf_counter()
        for xb, yb in tdata[:torch_steps]:
            torch_step(xb, yb)
        times["torch"].append((time.perf_counter() - start) / torch_steps * 1e6)
        out = subprocess.run([str(portable_py), "-c", PORTABLE_LOOP, str(bundle), str(len(data)), "1", str(npz)],
                             capture_output=True, text=True, check=True, cwd=work)  # fmt: skip
        times["portable-plain-ort"].append(float(out.stdout.split("US")[1]))
    return times


def device_rss(bundle: Path, work: Path, python: Path, engine: str) -> float:
    """Peak RSS (MB) of a real device process (`engine`) that joins a round on mosquitto."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, Topics, Update
    from tests.conftest import Broker
    from tests.peers import Peer

    with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
        np.savez(work / "shard.npz", x=d["x_train"][:202], y=d["y_train"][:202])
    broker = Broker("mosquitto", work).start()
    t = Topics("bench")
    cfg = work / f"device-{engine}.toml"
    cfg.write_text(f'device_id = "dev-0"\nfleet = "bench"\nbroker = "{broker.url}"\nbundle = "{bundle}"\n'
                   f'data = "{work / "shard.npz"}"\nstate_dir = "{work / ("state-" + engine)}"\n'
                   f'[training]\nbatch_size = 8\nengine = "{engine}"\n')  # fmt: skip
    manifest = load_bundle(bundle)
    peer = Peer(broker.url, [t.all_updates])
    run_id = secrets.token_hex(16)
    w = np.fromfile(bundle / "initial_state.f32", dtype="<f4")[: manifest.num_params]
    peer.publish(t.global_model, GlobalModel(run_id, 1, manifest.model_hash, w, total_rounds=1).encode(), retain=True)
    proc = subprocess.Popen([str(python), "-c", RSS_PROBE, str(cfg)], stdout=subprocess.PIPE, text=True, cwd=work)
    try:
        _, payload = peer.wait_for(lambda topic, p: topic == t.update("dev-0"), timeout=120)
        nonce = Update.decode(payload, manifest.num_params).nonce
        peer.publish(t.ack("dev-0"), Ack(run_id, 1, "dev-0", nonce, True).encode())
        out, _ = proc.communicate(timeout=60)
    finally:
        peer.close()
        broker.stop()
    return int(out.split("MAXRSS_KB")[1].split()[0]) / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="steps per repetition (default 500)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--venvs", default="/tmp/fleetlearn-bench-venvs")
    args = p.parse_args()
    venvs = Path(args.venvs)
    portable_py = make_venv(venvs / "edge-portable", "edge-portable")
    edge_py = make_venv(venvs / "edge", "edge")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = export_bundle(work / "bundle")
        data = batches(args.steps)
        us = time_engines(bundle, data, args.reps, portable_py, work)
        steps_load = load_average()
        rss = {
            "ort-training (edge venv)": device_rss(bundle, work, edge_py, "ort-training"),
            "portable (edge-portable venv)": device_rss(bundle, work, portable_py, "portable"),
        }
    best = {k: min(v) for k, v in us.items()}

    def paired(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(us[a], us[b])), 2)

    result = {
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "us_per_step_fastest_rep": {k: round(v, 1) for k, v in best.items()},
        "us_per_step_median": {k: round(statistics.median(v), 1) for k, v in us.items()},
        "portable_vs_ort_training": {
            "fastest": round(best["portable"] / best["ort-training"], 2),
            "median_paired": paired("portable", "ort-training"),
        },
        "portable_plain_ort_vs_ort_training": {
            "fastest": round(best["portable-plain-ort"] / best["ort-training"], 2),
            "median_paired": paired("portable-plain-ort", "ort-training"),
        },
        "torch_vs_portable": {
            "fastest": round(best["torch"] / best["portable"], 1),
            "median_paired": paired("torch", "portable"),
        },
        "torch_vs_portable_plain_ort": {
            "fastest": round(best["torch"] / best["portable-plain-ort"], 1),
            "median_paired": paired("torch", "portable-plain-ort"),
        },
        "device_peak_rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "installed_site_packages_mb": {
            "edge (onnxruntime-training)": round(site_packages_mb(venvs / "edge"), 1),
            "edge-portable (onnxruntime)": round(site_packages_mb(venvs / "edge-portable"), 1),
        },
    }
    print(json.dumps(result, indent=1))
    med = {k: statistics.median(v) for k, v in us.items()}
    step = f"Boston MLP, batch 8, AdamW, 1 thread, median of {args.reps} interleaved reps of {args.steps} steps"
    names = {
        "ort-training": "onnxruntime-training engine",
        "portable": "portable engine on onnxruntime-training 1.19.2's InferenceSession (dev venv)",
        "portable-plain-ort": "portable engine on plain onnxruntime (edge-portable venv, what devices install)",
        "torch": "PyTorch eager",
    }
    for value, base, goal, ok in (
        ("portable", "ort-training", "<= 1.3x", lambda r: r <= 1.3),
        ("portable-plain-ort", "ort-training", "<= 1.3x", lambda r: r <= 1.3),
        ("torch", "portable", ">= 10x", lambda r: r >= 10),
        ("torch", "portable-plain-ort", ">= 10x", lambda r: r >= 10),
    ):
        emit(
            Row(
                bench="bench_engines",
                what=f"step time, {names[value]} ({step})",
                value=round(med[value], 1),
                unit="us/step",
                baseline_what=names[base],
                baseline=round(med[base], 1),
                goal=goal,
                met=ok(med[value] / med[base]),
                load=steps_load,
                extra={"fastest_rep_ratio": round(best[value] / best[base], 3), "median_paired_ratio": paired(value, base)},
            )
        )
    emit(
        Row(
            bench="bench_engines",
            what="peak RSS (VmHWM) of a device process through a full Boston round on mosquitto, portable engine "
            "(edge-portable venv)",
            value=round(rss["portable (edge-portable venv)"], 1),
            unit="MB",
            baseline_what="the same with the ort-training engine (edge venv)",
            baseline=round(rss["ort-training (edge venv)"], 1),
            goal="< 70 MB",
            met=rss["portable (edge-portable venv)"] < 70,
        )
    )
    emit(
        Row(
            bench="bench_engines",
            what="installed size, site-packages of a fresh fleetlearn[edge-portable] venv without pip/setuptools",
            value=result["installed_site_packages_mb"]["edge-portable (onnxruntime)"],
            unit="MB",
            baseline_what="fleetlearn[edge] (onnxruntime-training)",
            baseline=result["installed_site_packages_mb"]["edge (onnxruntime-training)"],
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
