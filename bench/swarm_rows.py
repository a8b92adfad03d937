"""bench_swarm.py's rows (bench/rows.py): fan-out, rounds, and the memory per extra device for
each engine the run measured (ort-training: a session set per device; portable: one shared
session pair)."""

from __future__ import annotations

import sys
from pathlib import Path

from rows import Row, emit


def engine_note(bundle: Path, asked: str) -> str:
    """The engine the swarm's devices opened (the swarm's own choice for `auto`), and what it
    means for memory."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.engines.shared import swarm_engine

    engine = swarm_engine(load_bundle(bundle), asked)
    sets = ", its own ORT session set per device" if engine == "ort-training" else ", one shared session pair"
    return f"{engine} engine{' (auto)' if asked == 'auto' else ''}{sets}"


def memory_engines(bundle: Path, asked: str) -> list[str]:
    """The engine the rounds did not use, when this venv and the bundle can run it."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.errors import UsageError
    from fleetlearn.edge_runtime.engines.shared import swarm_engine

    m = load_bundle(bundle)
    used = swarm_engine(m, asked)
    out = []
    for other in ("portable", "ort-training"):
        if other == used:
            continue
        try:
            swarm_engine(m, other)
        except UsageError as e:  # BundleError is a UsageError: the bundle or venv cannot run it
            print(f"memory with {other}: skipped ({e})", file=sys.stderr)
            continue
        out.append(other)
    return out


def memory_entry(bundle: Path, engine: str, small: dict, big: dict) -> dict:
    per = (big["swarm_peak_rss_mb"] - small["swarm_peak_rss_mb"]) / (big["devices"] - small["devices"])
    return {
        "engine": engine_note(bundle, engine),
        "per_extra_device_mb": round(per, 3),
        "swarm_peak_rss_mb": [small["swarm_peak_rss_mb"], big["swarm_peak_rss_mb"]],
        "devices": [small["devices"], big["devices"]],
        "rounds": big["rounds"],
        "accepted_min": [small["accepted_min"], big["accepted_min"]],
        "load": big["load_at_end"],
    }


def emit_rows(out: dict) -> None:
    if "fanout" in out:
        emit_fanout_rows(out["fanout"])
    if "rounds" in out:
        emit_round_rows(out)


def emit_fanout_rows(f: dict) -> None:
    n = f["devices"]
    what = (
        f"fan-out: a {f['frame_bytes']:,}-byte GLOBAL frame published retained at QoS 1 until the last of {n:,} swarm "
        f"devices ({f['engine']}) has it (its agent is handed the message), median of {f['reps']} rotated reps"
    )
    for kind, key in (("clean", "ratio_swarm_over_raw_clean"), ("persistent", "ratio_swarm_over_raw_persistent")):
        emit(
            Row(
                bench="bench_swarm",
                what=what,
                value=f["median_s"]["swarm"],
                unit="s",
                baseline_what=f"{n:,} raw paho clients ({kind} sessions, QoS 1) on the same EpollLoop design, same frame "
                "and broker, until the last on_message",
                baseline=f["median_s"][kind],
                goal="<= 1.2x",
                met=f[key] <= 1.2,
                load=f["load"],
                extra={"paired_median_ratio": f["paired_median_ratio"][kind], "cpu_s_median": f["cpu_s_median"]},
            )
        )
    emit(
        Row(
            bench="bench_swarm",
            what=f"fan-out until the last of {n:,} swarm devices holds the decoded, validated GLOBAL model (the "
            f"receipts above, then the swarm's shared decode: {f['global_decodes'][0]} decodes for "
            f"{f['global_decodes'][1]:,} receipts), median of {f['reps']}",
            value=f["swarm_validated_median_s"],
            unit="s",
            baseline_what=f"{n:,} raw paho clients (persistent sessions) until the last on_message (no decode)",
            baseline=f["median_s"]["persistent"],
            load=f["load"],
        )
    )


def emit_round_rows(out: dict) -> None:
    small, big = out["rounds"]
    emit(
        Row(
            bench="bench_swarm",
            what=f"devices accepted in the worst of {big['rounds']} rounds, {big['devices']:,}-device swarm, mosquitto",
            value=big["accepted_min"],
            unit="devices",
            baseline_what="target devices (minimum 0.99x)",
            baseline=big["devices"],
            goal=">= 0.99x",
            met=big["accepted_min"] >= 0.99 * big["devices"],
            load=big["load_at_end"],
        )
    )
    emit(
        Row(
            bench="bench_swarm",
            what=f"round wall time, {big['devices']:,}-device swarm (median of rounds 2..; round 1 includes the "
            "swarm's start), Boston MLP, max_steps 2",
            value=big["round_wall_s_median_after_1"],
            unit="s",
            baseline_what=f"the same with {small['devices']:,} devices",
            baseline=small["round_wall_s_median_after_1"],
            load=big["load_at_end"],
            extra={"load_1min_min_max": big["load_1min_min_max"], "round1_wall_s": big["round1_wall_s"]},
        )
    )
    emit(
        Row(
            bench="bench_swarm",
            what=f"aggregator CPU seconds per round (utime + stime / rounds), {big['devices']:,} devices",
            value=big["aggregator_cpu_s_per_round"],
            unit="s",
            baseline_what=f"the same with {small['devices']:,} devices",
            baseline=small["aggregator_cpu_s_per_round"],
            load=big["load_at_end"],
        )
    )
    emit(
        Row(
            bench="bench_swarm",
            what=f"aggregator peak RSS (VmHWM), {big['devices']:,} devices",
            value=big["aggregator_peak_rss_mb"],
            unit="MB",
            baseline_what=f"the same with {small['devices']:,} devices",
            baseline=small["aggregator_peak_rss_mb"],
            load=big["load_at_end"],
        )
    )
    for mem in out["memory"]:
        small_n, big_n = mem["devices"]
        emit(
            Row(
                bench="bench_swarm",
                what=f"swarm memory per extra device: (peak RSS with {big_n:,} - with {small_n:,}) / "
                f"{big_n - small_n:,}, {mem['engine']}",
                value=mem["per_extra_device_mb"],
                unit="MB",
                goal="< 1 MB",
                met=mem["per_extra_device_mb"] < 1,
                load=mem["load"],
                extra={"swarm_peak_rss_mb": mem["swarm_peak_rss_mb"], "accepted_min": mem["accepted_min"]},
            )
        )
