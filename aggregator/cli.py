"""`fleetlearn aggregator`: its flags, the AggregatorConfig they describe, and the --model
export on start (the CLI exports; the engine is given a bundle dir). Runs rounds until --rounds
have closed.

Exit codes: 0 every round closed (final model in STATE_DIR/model.onnx); 2 bad input, the
broker unreachable at start, or the fleet led by another aggregator (at start, or taken over
while running: docs/operations-service.md); 3 a round failed (too few devices after every extension);
130/143 stopped by SIGINT/SIGTERM (restart with the same --state-dir to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.errors import UsageError
from fleetlearn.edge_runtime.core.protocol import DEFAULT_CHUNK_SIZE


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 13 or 1,28,28") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape of positive integers")
    return dims


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model (one of)")
    src.add_argument("--bundle", type=Path, help="an exported bundle directory")
    src.add_argument("--model", help="export NAME_OR_IMPORT_PATH on start into STATE_DIR/bundle instead")
    src.add_argument("--input-shape", type=_shape, help="with --model: per-sample input shape, e.g. 13 or 1,28,28")
    src.add_argument("--loss", help="with --model: mse, cross_entropy or bce_with_logits")
    src.add_argument("--optimizer", help="with --model: the on-device optimizer (e.g. adamw)")

    net = parser.add_argument_group("broker")
    net.add_argument("--broker", required=True, help="mqtt://host:1883 or mqtts://host:8883")
    net.add_argument("--fleet", default="default", help="fleet name in the topics (default: default)")
    net.add_argument("--client-id", help="MQTT client id (default fleetlearn-aggregator-<fleet>)")
    net.add_argument("--username")
    net.add_argument("--password-file", type=Path, help="file holding the MQTT password")
    net.add_argument("--ca-file", type=Path, help="CA certificate for mqtts://")
    net.add_argument("--cert-file", type=Path, help="client certificate (mutual TLS)")
    net.add_argument("--key-file", type=Path, help="client key (mutual TLS)")
    net.add_argument("--mqtt-protocol", choices=["3.1.1", "5"], default="3.1.1")
    net.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the broker at start (default 30)")
    net.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"bundle chunk size in bytes (default {DEFAULT_CHUNK_SIZE})"
    )

    wire = parser.add_argument_group("wire (docs/protocol.md: encodings, message parts)")
    wire.add_argument(
        "--compression",
        default="none",
        metavar="none|fp16|int8[:BLOCK]|topk:F",
        help="how devices encode their deltas: fp16, int8 with one scale per BLOCK values (default 512), or the top fraction F of values with error feedback (default none: float32)",
    )
    wire.add_argument(
        "--max-message-size",
        type=int,
        metavar="BYTES",
        help="the broker's message limit: larger global models, updates and bundle chunks travel in parts under it (e.g. 131072 for AWS IoT Core)",
    )

    rounds = parser.add_argument_group("rounds")
    rounds.add_argument("--rounds", type=int, required=True, help="number of rounds")
    rounds.add_argument("--min-devices", type=int, required=True, help="accepted updates a round needs to close at its deadline")
    rounds.add_argument("--target-devices", type=int, help="close as soon as this many are accepted (default: --min-devices)")
    rounds.add_argument("--deadline", type=float, default=60.0, help="seconds a round stays open (default 60)")
    rounds.add_argument("--max-extensions", type=int, default=3, help="deadline extensions before a round fails (default 3)")
    rounds.add_argument("--state-dir", type=Path, required=True, help="checkpoints, round log, final model; reuse it to resume")
    rounds.add_argument("--test-data", type=Path, help="NPZ (x, y) or CSV to evaluate each new global model on")
    rounds.add_argument(
        "--round-interval",
        type=float,
        default=0.0,
        help="open rounds at most this often, in seconds, so a person can watch (default 0)",
    )
    from fleetlearn.aggregator.options import add_arguments_for
    from fleetlearn.aggregator.registry import all_option_classes, option_owners, strategy_names

    rounds.add_argument(
        "--strategy", default="fedavg", help=f"one of {', '.join(strategy_names())} (default fedavg; docs/aggregator.md)"
    )
    robust = parser.add_argument_group("strategy options: each applies to the strategies that declare it (docs/aggregator.md)")
    add_arguments_for(robust, all_option_classes(), option_owners())
    from fleetlearn.aggregator.sampling import SamplingOptions

    SamplingOptions.add_arguments(parser.add_argument_group("client sampling with over-selection (docs/aggregator.md)"), set())

    train = parser.add_argument_group("round config sent to devices (default: each device's own)")
    train.add_argument("--local-epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="learning rate (default: the bundle's)")
    train.add_argument(
        "--lr-schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="cosine: decay the rate from --lr toward --lr-min-factor x --lr over the rounds",
    )
    train.add_argument(
        "--lr-warmup", type=int, default=0, help="rounds of linear learning-rate warm-up before the schedule (default 0)"
    )
    train.add_argument(
        "--lr-min-factor", type=float, default=0.1, help="final rate as a fraction of --lr for --lr-schedule cosine (default 0.1)"
    )
    train.add_argument("--max-steps", type=int)
    train.add_argument(
        "--proximal-mu",
        type=float,
        metavar="MU",
        help="FedProx: devices minimise loss + MU/2 ||w - w_global||^2 (any strategy; --strategy fedprox needs MU > 0; the bundle must carry the term)",
    )

    sig = parser.add_argument_group("update signing (docs/security-signing.md)")
    sig.add_argument(
        "--device-keys",
        type=Path,
        metavar="DIR",
        help="import DIR/<device_id>.pub (Ed25519) into STATE_DIR/device-keys, where keys are loaded from at start",
    )
    sig.add_argument(
        "--signing-key",
        type=Path,
        metavar="FILE",
        help="the aggregator's Ed25519 key that signs global models (default STATE_DIR/aggregator-signing.key, made when keys are in use)",
    )
    req = sig.add_mutually_exclusive_group()
    req.add_argument(
        "--require-signatures",
        dest="require_signatures",
        action="store_const",
        const=True,
        default=None,
        help="reject unsigned updates (the default when device keys are registered)",
    )
    req.add_argument(
        "--allow-unsigned",
        dest="require_signatures",
        action="store_const",
        const=False,
        help="accept unsigned updates even though device keys are registered (signed ones are still verified)",
    )

    from fleetlearn.aggregator.service_args import add_service_arguments

    add_service_arguments(parser)  # --takeover, --lease-ttl, --metrics-port/-host/-per-device
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text (key=value) or json (one object per line, for journald and log shippers)",
    )


def config_from_args(args: argparse.Namespace, bundle: Path | None = None):
    """The AggregatorConfig the flags describe; `bundle` overrides --bundle (the --model export's dir)."""
    from fleetlearn.aggregator.config import AggregatorConfig, RoundPolicy, SigningConfig, link_options
    from fleetlearn.aggregator.registry import StrategyChoice, all_option_classes
    from fleetlearn.aggregator.schedule import TrainingPlan
    from fleetlearn.aggregator.service_args import lease_policy
    from fleetlearn.aggregator.wire import WirePolicy

    password = None
    if args.password_file is not None:
        try:
            password = Path(args.password_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise UsageError(f"--password-file {args.password_file}: {exc.strerror or exc}") from None
    link = link_options(
        args.broker,
        args.fleet,
        client_id=args.client_id,
        username=args.username,
        password=password,
        ca_file=str(args.ca_file) if args.ca_file else None,
        cert_file=str(args.cert_file) if args.cert_file else None,
        key_file=str(args.key_file) if args.key_file else None,
        protocol=args.mqtt_protocol,
    )
    from fleetlearn.aggregator.sampling import SamplingOptions

    given = {name: getattr(args, name) for cls in all_option_classes() for name in cls.flags() if hasattr(args, name)}
    sampling = SamplingOptions.from_values({name: getattr(args, name) for name in SamplingOptions.flags() if hasattr(args, name)})
    return AggregatorConfig(
        broker=link,
        state_dir=args.state_dir,
        bundle=bundle if bundle is not None else args.bundle,
        rounds=RoundPolicy(
            rounds=args.rounds,
            min_devices=args.min_devices,
            target_devices=args.target_devices,
            deadline=args.deadline,
            max_extensions=args.max_extensions,
            round_interval=args.round_interval,
        ),
        training=TrainingPlan(
            local_epochs=args.local_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            max_steps=args.max_steps,
            lr_schedule=args.lr_schedule,
            lr_min_factor=args.lr_min_factor,
            lr_warmup=args.lr_warmup,
            proximal_mu=args.proximal_mu,
        ),
        strategy=StrategyChoice(args.strategy, given),
        sampling=sampling,
        signing=SigningConfig(
            signing_key=args.signing_key, device_keys=args.device_keys, require_signatures=args.require_signatures
        ),
        fleet=args.fleet,
        test_data=args.test_data,
        chunk_size=args.chunk_size,
        wire=WirePolicy(compression=args.compression, max_message_size=args.max_message_size),
        connect_timeout=args.connect_timeout,
        lease=lease_policy(args),
    )


def check_model_source(args: argparse.Namespace) -> None:
    if (args.bundle is None) == (args.model is None):
        raise UsageError("give exactly one of --bundle DIR or --model NAME")
    if args.bundle is not None and (args.input_shape or args.loss or args.optimizer):
        raise UsageError("--input-shape, --loss and --optimizer are export options: use them with --model, not --bundle")


def export_on_start(args: argparse.Namespace, out: Path) -> Path:
    """--model: export into STATE_DIR/bundle once; a restart reuses the bundle it wrote."""
    from fleetlearn.aggregator.events import Events
    from fleetlearn.edge_runtime.core.bundle import load_manifest
    from fleetlearn.edge_runtime.core.errors import BundleError

    events = Events()
    try:
        load_manifest(out)
        events.log("bundle_reused", None, path=str(out))
        return out
    except BundleError:
        pass
    try:
        from fleetlearn.export import build_bundle, resolve_model
    except ImportError as exc:
        raise UsageError(f"--model needs the export extra (torch, onnx): {exc}") from None
    model, defaults = resolve_model(args.model, seed=0)  # reproducible initial weights
    input_shape = args.input_shape or getattr(defaults, "input_shape", None)
    if input_shape is None:
        raise UsageError(f"model {args.model!r} has no default input shape; give --input-shape")
    loss = args.loss or getattr(defaults, "loss", None)
    if loss is None:
        raise UsageError(f"model {args.model!r} has no default loss; give --loss (mse, cross_entropy or bce_with_logits)")
    kwargs: dict[str, Any] = {
        "model_name": getattr(defaults, "name", None) or args.model,
        "input_shape": tuple(input_shape),
        "loss": loss,
    }
    if args.optimizer:
        kwargs["optimizer"] = args.optimizer
    events.log("bundle_export", None, model=args.model, path=str(out))
    Path(args.state_dir).mkdir(parents=True, exist_ok=True)
    build_bundle(model, out, **kwargs)
    return out


def run(args: argparse.Namespace) -> int:
    from fleetlearn.aggregator.engine import EXIT_FLEET_LOST, EXIT_ROUND_FAILED, EXIT_SIGINT, EXIT_SIGTERM, Aggregator
    from fleetlearn.aggregator.logs import setup_logging
    from fleetlearn.aggregator.service_args import start_metrics
    from fleetlearn.edge_runtime.core.state_lock import lock_state_dir

    setup_logging(args.log_level, args.log_format)
    check_model_source(args)
    exported = Path(args.state_dir) / "bundle" if args.model is not None else None
    config = config_from_args(args, bundle=exported)
    config.validate()
    # One process per state dir, held until this process exits (before anything reads or writes it).
    state_lock = lock_state_dir(config.state_dir, "aggregator")  # noqa: F841 (kept alive on purpose)
    if exported is not None:
        export_on_start(args, exported)
    agg = Aggregator(config)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: agg.stop(EXIT_SIGTERM))
        signal.signal(signal.SIGINT, lambda *_: agg.stop(EXIT_SIGINT))
    metrics = start_metrics(args, agg)  # None without --metrics-port
    try:
        code = agg.run()
    finally:
        if metrics is not None:
            metrics.close()
    if code in (EXIT_ROUND_FAILED, EXIT_FLEET_LOST) and agg.exit_reason:
        print(f"fleetlearn aggregator: error: {agg.exit_reason}", file=sys.stderr)
    return code
