"""`fleetlearn demo --dp`: the Boston demo with DP-FedAvg (central DP), and what it costs.

With --dp the demo first runs itself once WITHOUT DP (same arguments, same seed, same shards;
its output goes to a log file), then the DP run (--clip-norm C --dp-noise-multiplier sigma,
aggregator/dp_fedavg.py), and the summary puts the two federated test MSEs side by side with
the epsilon spent.

The clip norm, unless given, is chosen on the training data only: it is the median of the
honest update norms of that non-DP run. To have the aggregator record the norms, the non-DP
run aggregates with clipped-fedavg at C = 1e30: nothing is clipped (clipped = 0 in every
record), so it computes exactly FedAvg, and each round record carries update_norm_median.
The median over the run, not the first round's norms: early updates are many times larger
than late ones, and a C sized for them makes the noise sigma*C/m swamp the late rounds (with
2 devices it drove the model to NaN). This calibration is not itself private (it reveals one
number about the training data); a deployment would calibrate on public/proxy data or
estimate the quantile privately (Andrew et al., 2021). The test split chooses nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleetlearn.edge_runtime.core.protocol import RoundMetrics

DEFAULT_NOISE_MULTIPLIER = 0.5
DP_DELTA = 1e-5
NO_CLIP = 1e30  # "clip" at a norm no update reaches: FedAvg, with the norms recorded


def add_dp_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("differential privacy (docs/security-robust-dp.md)")
    g.add_argument(
        "--dp", action="store_true", help="aggregate with DP-FedAvg (central DP); runs the demo without DP first to show the cost"
    )
    g.add_argument(
        "--dp-noise-multiplier",
        type=float,
        default=DEFAULT_NOISE_MULTIPLIER,
        help=f"with --dp: noise std / clip norm (default {DEFAULT_NOISE_MULTIPLIER})",
    )
    g.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="with --dp: L2 clip norm C (default: median update norm of the non-DP run, training data only)",
    )


def run_without_dp(
    args: argparse.Namespace, say: Callable[[str], None], run_demo: Callable[[argparse.Namespace], int]
) -> dict[str, Any]:
    """The same demo (`run_demo`, the demo's own run: passed in so this module does not import
    the demo back), same arguments, without DP; its final test MSE and its rounds' median
    update norms."""
    state = Path(tempfile.mkdtemp(prefix="fleetlearn-demo-nodp-"))
    child = argparse.Namespace(
        **{
            **vars(args),
            "dp": False,
            "_record_norms": True,
            "state_dir": str(state / "state"),
            "report": str(state / "report"),
            "no_baseline": True,
            "quiet": True,
            "fleet": f"{args.fleet}-nodp",
        }
    )
    say(f"running the same demo without DP first (log: {state / 'demo.log'}) ...")
    with open(state / "demo.log", "w") as out, contextlib.redirect_stdout(out):
        run_demo(child)
    from fleetlearn.aggregator.round_log import ROUND_LOG, read_round_log

    rounds = read_round_log(state / "state" / ROUND_LOG).rounds
    assert all(not r.clipped for r in rounds)
    norms = sorted(r.update_norm_median for r in rounds if r.update_norm_median is not None)
    return {"test_mse": float(rounds[-1].test_mse or 0.0), "median_update_norm": norms[len(norms) // 2]}


def dp_aggregator_args(
    args: argparse.Namespace, say: Callable[[str], None], run_demo: Callable[[argparse.Namespace], int]
) -> list[str]:
    """The aggregator's extra flags: [] for the plain demo; for --dp, the DP-FedAvg flags (after
    the non-DP run that calibrates C when --clip-norm is not given)."""
    if getattr(args, "_record_norms", False):
        return ["--clip-norm", repr(NO_CLIP)]
    if not getattr(args, "dp", False):
        return []
    from fleetlearn.edge_runtime.core.errors import UsageError

    if not args.dp_noise_multiplier > 0:
        raise UsageError(f"--dp-noise-multiplier must be > 0, got {args.dp_noise_multiplier}")
    if args.clip_norm is not None and not args.clip_norm > 0:
        raise UsageError(f"--clip-norm must be > 0, got {args.clip_norm}")
    args._non_dp = run_without_dp(args, say, run_demo)
    if args.clip_norm is None:
        args.clip_norm = args._non_dp["median_update_norm"]
        say(f"DP-FedAvg: clip norm C = {args.clip_norm:.4g} (median update norm of the non-DP run, training data only)")
    say(
        f"DP-FedAvg: noise N(0, ({args.dp_noise_multiplier:g} C)^2) on the sum of {args.devices} clipped updates, divided by {args.devices}"
    )
    return [
        "--clip-norm",
        repr(float(args.clip_norm)),
        "--dp-noise-multiplier",
        repr(float(args.dp_noise_multiplier)),
        "--dp-delta",
        repr(DP_DELTA),
    ]


def dp_summary(
    args: argparse.Namespace, rounds: Sequence[RoundMetrics], work: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    if not getattr(args, "dp", False):
        return {}  # the non-DP calibration run
    final = rounds[-1]
    non_dp = args._non_dp["test_mse"]
    return {
        "dp_epsilon": final.epsilon,
        "dp_delta": final.delta,
        "dp_noise_multiplier": args.dp_noise_multiplier,
        "dp_clip_norm": args.clip_norm,
        "non_dp_test_mse": non_dp,
        "dp_vs_non_dp": (final.test_mse or 0.0) / non_dp,
    }


def dp_rows(s: dict[str, Any]) -> list[tuple[str, str]]:
    if "dp_epsilon" not in s:
        return []
    return [
        ("federated without DP (same settings)", f"{s['non_dp_test_mse']:.3f}"),
        ("DP / non-DP test MSE", f"{s['dp_vs_non_dp']:.3f}"),
        (
            "privacy spent (RDP, dp-accounting)",
            f"epsilon = {s['dp_epsilon']:.3g} at delta = {s['dp_delta']:g} (sigma {s['dp_noise_multiplier']:g}, C {s['dp_clip_norm']:.4g}, q = 1)",
        ),
        (
            "what that epsilon means",
            "> 10: no meaningful guarantee; needs a larger --dp-noise-multiplier (affordable with many more devices) or fewer rounds"
            if s["dp_epsilon"] > 10
            else "user-level: one device's whole data, over every released round",
        ),
    ]
