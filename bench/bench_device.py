"""Device benchmarks (numbers, not pass/fail): peak RSS of a device process through a full
round, and local-training throughput of ORT against the same loop in PyTorch eager.

    .venv/bin/python bench/bench_device.py [--steps 2000] [--reps 5]

Every loop: the Boston MLP (13-32-24-16-1), batch 8, AdamW, one thread, the same batches. The
three loops (the bare ORT training loop, fleetlearn's `Trainer.train`, PyTorch eager) run in
`--reps` interleaved repetitions, so load from other processes hits each alike; rows give
medians. Goals from the issue: RSS < 80 MB; ORT >= 10x PyTorch eager samples/s.

Rows (bench/rows.py): the device's samples/s against PyTorch eager and against the bare ORT
loop (what fleetlearn's training path costs over onnxruntime-training's own loop), the bare
loop against PyTorch eager, and the device's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from rows import Row, emit, load_average  # noqa: E402

# VmHWM, not getrusage(): on Linux ru_maxrss survives execve, so a child started by a process
# that has torch loaded would report the parent's peak, not its own.
RSS_PROBE = """
import sys
from fleetlearn.cli import main
rc = main(["device", "--config", sys.argv[1], "--max-rounds", "1", "--log-level", "warning"])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
print("MAXRSS_KB", hwm, "TORCH", "torch" in sys.modules, flush=True)
sys.exit(rc)
"""


def export_bundle(out: Path) -> Path:
    from fleetlearn.export import build_bundle, resolve_model

    with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
        x = d["x_train"]
    model, _ = resolve_model("boston-mlp", seed=0)
    build_bundle(
        model,
        out,
        model_name="boston-mlp",
        input_shape=(13,),
        loss="mse",
        optimizer="adamw",
        lr=1e-3,
        preprocessing={"mean": x.mean(0).tolist(), "std": x.std(0).tolist()},
        seed=0,
    )
    return out


def bench_rss(bundle: Path, work: Path) -> float:
    """Peak RSS (MB) of a real device process that joins a round on mosquitto and delivers its update."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, Topics, Update
    from fleetlearn.edge_runtime.engines.trainer import Trainer
    from tests.conftest import Broker
    from tests.peers import Peer

    with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
        np.savez(work / "shard.npz", x=d["x_train"][:202], y=d["y_train"][:202])
    broker = Broker("mosquitto", work).start()
    t = Topics("bench")
    cfg = work / "device.toml"
    cfg.write_text(
        f'device_id = "dev-0"\nfleet = "bench"\nbroker = "{broker.url}"\nbundle = "{bundle}"\n'
        f'data = "{work / "shard.npz"}"\nstate_dir = "{work / "state"}"\n[training]\nbatch_size = 8\n'
    )
    manifest = load_bundle(bundle)
    peer = Peer(broker.url, [t.all_updates])
    run_id = secrets.token_hex(16)
    w = Trainer(bundle, manifest).get_weights()
    peer.publish(t.global_model, GlobalModel(run_id, 1, manifest.model_hash, w, total_rounds=1).encode(), retain=True)
    proc = subprocess.Popen([sys.executable, "-c", RSS_PROBE, str(cfg)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, payload = peer.wait_for(lambda topic, p: topic == t.update("dev-0"), timeout=60)
        nonce = Update.decode(payload, manifest.num_params).nonce
        peer.publish(t.ack("dev-0"), Ack(run_id, 1, "dev-0", nonce, True).encode())
        out, _ = proc.communicate(timeout=60)
    finally:
        peer.close()
        broker.stop()
    kb = int(out.split("MAXRSS_KB")[1].split()[0])
    return kb / 1024


def batches(steps: int, batch: int = 8):
    with np.load(ROOT / "data" / "boston_housing_split.npz") as d:
        x, y = d["x_train"], d["y_train"]
    x = ((x - x.mean(0)) / x.std(0)).astype(np.float32)
    y = y.reshape(-1, 1).astype(np.float32)
    rng = np.random.default_rng(0)
    idx = [rng.integers(0, len(x), batch) for _ in range(steps)]
    return [(x[i], y[i]) for i in idx]


def bench_ort(bundle: Path, data) -> Callable[[], float]:
    """The bare onnxruntime-training loop (module, optimizer step, reset): one call = one
    repetition over `data`, returning samples/s."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.engines.trainer import Trainer

    trainer = Trainer(bundle, load_bundle(bundle), threads=1)
    module, opt = trainer._module, trainer._optimizer  # the bare loop: what the runtime adds is measured by RSS above
    trainer._begin_train(trainer.default_lr, 0.0)  # module.train(), and FedProx's inputs (mu = 0) when the bundle has them
    prox = trainer._prox_feeds
    for xb, yb in data[:50]:
        module(xb, yb, *prox)
        opt.step()
        module.lazy_reset_grad()

    def rep() -> float:
        start = time.perf_counter()
        for xb, yb in data:
            module(xb, yb, *prox)
            opt.step()
            module.lazy_reset_grad()
        return len(data) * 8 / (time.perf_counter() - start)

    return rep


def bench_trainer(bundle: Path, data) -> Callable[[], float]:
    """Through fleetlearn's Trainer.train (what a device really runs per round)."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.data import Dataset
    from fleetlearn.edge_runtime.engines.trainer import Trainer

    trainer = Trainer(bundle, load_bundle(bundle), threads=1)
    ds = Dataset(np.concatenate([b[0] for b in data]), np.concatenate([b[1] for b in data]))

    def rep() -> float:
        result = trainer.train(ds, batch_size=8, epochs=1)
        return result.samples / result.seconds

    return rep


def bench_torch(data) -> Callable[[], float]:
    import torch

    from fleetlearn.export import resolve_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, _ = resolve_model("boston-mlp")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.MSELoss()
    tdata = [(torch.from_numpy(xb), torch.from_numpy(yb)) for xb, yb in data]
    for xb, yb in tdata[:50]:
        opt.zero_grad()
        loss_fn(model(xb), yb).backward()
        opt.step()

    def rep() -> float:
        start = time.perf_counter()
        for xb, yb in tdata:
            opt.zero_grad()
            loss_fn(model(xb), yb).backward()
            opt.step()
        return len(tdata) * 8 / (time.perf_counter() - start)

    return rep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each loop (rows give medians)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = export_bundle(work / "bundle")
        data = batches(args.steps)
        loops = {"ort": bench_ort(bundle, data), "trainer": bench_trainer(bundle, data), "torch": bench_torch(data)}
        sps: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(args.reps):
            for name, rep in loops.items():
                sps[name].append(rep())
        loops_load = load_average()
        rss = bench_rss(bundle, work)
    med = {k: statistics.median(v) for k, v in sps.items()}
    result = {
        "load_average": loops_load,
        "device_peak_rss_mb": round(rss, 1),
        "ort_loop_samples_per_s": round(med["ort"]),
        "fleetlearn_trainer_samples_per_s": round(med["trainer"]),
        "torch_eager_samples_per_s": round(med["torch"]),
        "samples_per_s_each_rep": {k: [round(x) for x in v] for k, v in sps.items()},
        "ort_vs_torch": round(med["ort"] / med["torch"], 1),
        "trainer_vs_torch": round(med["trainer"] / med["torch"], 1),
        "us_per_step_ort": round(8e6 / med["ort"], 1),
        "us_per_step_torch": round(8e6 / med["torch"], 1),
    }
    print(json.dumps(result, indent=1))
    loop = f"Boston MLP, batch 8, AdamW, 1 thread, median of {args.reps} interleaved reps of {args.steps} steps"
    torch_what = "PyTorch eager, same model, batches, optimizer"
    trainer_what = f"device training samples/s through fleetlearn's Trainer.train ({loop})"
    emit(
        Row(
            bench="bench_device",
            what=trainer_what,
            value=round(med["trainer"]),
            unit="samples/s",
            baseline_what=torch_what,
            baseline=round(med["torch"]),
            goal=">= 10x",
            met=med["trainer"] / med["torch"] >= 10,
            load=loops_load,
        )
    )
    emit(
        Row(
            bench="bench_device",
            what=trainer_what,
            value=round(med["trainer"]),
            unit="samples/s",
            baseline_what="bare onnxruntime-training loop (module, optimizer step, reset), same batches",
            baseline=round(med["ort"]),
            load=loops_load,
        )
    )
    emit(
        Row(
            bench="bench_device",
            what=f"bare onnxruntime-training loop samples/s ({loop})",
            value=round(med["ort"]),
            unit="samples/s",
            baseline_what=torch_what,
            baseline=round(med["torch"]),
            goal=">= 10x",
            met=med["ort"] / med["torch"] >= 10,
            load=loops_load,
        )
    )
    emit(
        Row(
            bench="bench_device",
            what="peak RSS (VmHWM) of a device process through a full Boston round on mosquitto (ort-training engine)",
            value=round(rss, 1),
            unit="MB",
            goal="< 80 MB",
            met=rss < 80,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
