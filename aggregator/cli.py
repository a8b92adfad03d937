"""Run the federated aggregator: FedAvg rounds over MQTT until --rounds have closed.

Exit codes: 0 every round closed (final model in STATE_DIR/model.onnx); 2 bad input or the
broker unreachable at start; 3 a round failed (too few devices after every extension);
130/143 stopped by SIGINT/SIGTERM (restart with the same --state-dir to resume).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


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
    net.add_argument("--chunk-size", type=int, default=256 * 1024, help="bundle chunk size in bytes (default 262144)")

    rounds = parser.add_argument_group("rounds")
    rounds.add_argument("--rounds", type=int, required=True, help="number of rounds")
    rounds.add_argument("--min-devices", type=int, required=True, help="accepted updates a round needs to close at its deadline")
    rounds.add_argument("--target-devices", type=int, help="close as soon as this many are accepted (default: --min-devices)")
    rounds.add_argument("--deadline", type=float, default=60.0, help="seconds a round stays open (default 60)")
    rounds.add_argument("--max-extensions", type=int, default=3, help="deadline extensions before a round fails (default 3)")
    rounds.add_argument("--state-dir", type=Path, required=True, help="checkpoints, round log, final model; reuse it to resume")
    rounds.add_argument("--test-data", type=Path, help="NPZ (x, y) or CSV to evaluate each new global model on")
    rounds.add_argument("--round-interval", type=float, default=0.0, help="open rounds at most this often, in seconds, so a person can watch (default 0)")
    rounds.add_argument("--strategy", default="fedavg", help="fedavg (default), median or trimmed-mean (docs/security-robust-dp.md)")

    robust = parser.add_argument_group("robust aggregation and differential privacy (docs/security-robust-dp.md)")
    robust.add_argument("--clip-norm", type=float, metavar="C", help="clip every update to L2 norm C before aggregating (any strategy)")
    robust.add_argument("--trim-fraction", type=float, default=0.1, metavar="BETA", help="trimmed-mean: drop floor(BETA*k) largest and smallest values per coordinate (default 0.1)")
    robust.add_argument("--dp-noise-multiplier", type=float, metavar="SIGMA", help="DP-FedAvg: add N(0, (SIGMA*C)^2) to the sum of clipped updates (needs --clip-norm)")
    robust.add_argument("--dp-delta", type=float, default=1e-5, help="delta at which epsilon is reported (default 1e-5)")
    robust.add_argument("--dp-population", type=int, metavar="N", help="fleet size for the sampling rate q = target/N in the accountant (default: target devices, q = 1)")

    train = parser.add_argument_group("round config sent to devices (default: each device's own)")
    train.add_argument("--local-epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float, help="learning rate (default: the bundle's)")
    train.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant", help="cosine: decay the rate from --lr toward --lr-min-factor x --lr over the rounds")
    train.add_argument("--lr-warmup", type=int, default=0, help="rounds of linear learning-rate warm-up before the schedule (default 0)")
    train.add_argument("--lr-min-factor", type=float, default=0.1, help="final rate as a fraction of --lr for --lr-schedule cosine (default 0.1)")
    train.add_argument("--max-steps", type=int)

    sig = parser.add_argument_group("update signing (docs/security-signing.md)")
    sig.add_argument("--device-keys", type=Path, metavar="DIR", help="import DIR/<device_id>.pub (Ed25519) into STATE_DIR/device-keys, where keys are loaded from at start")
    sig.add_argument("--signing-key", type=Path, metavar="FILE", help="the aggregator's Ed25519 key that signs global models (default STATE_DIR/aggregator-signing.key, made when keys are in use)")
    req = sig.add_mutually_exclusive_group()
    req.add_argument("--require-signatures", dest="require_signatures", action="store_const", const=True, default=None, help="reject unsigned updates (the default when device keys are registered)")
    req.add_argument("--allow-unsigned", dest="require_signatures", action="store_const", const=False, help="accept unsigned updates even though device keys are registered (signed ones are still verified)")

    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", default="text", choices=["text", "json"], help="text (key=value) or json (one object per line, for journald and log shippers)")


def config_from_args(args: argparse.Namespace):
    from fleetlearn.aggregator.server import AggregatorConfig

    return AggregatorConfig(
        broker=args.broker,
        state_dir=args.state_dir,
        rounds=args.rounds,
        min_devices=args.min_devices,
        bundle=args.bundle,
        model=args.model,
        input_shape=args.input_shape,
        loss=args.loss,
        optimizer=args.optimizer,
        fleet=args.fleet,
        target_devices=args.target_devices,
        deadline=args.deadline,
        max_extensions=args.max_extensions,
        test_data=args.test_data,
        local_epochs=args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        lr_min_factor=args.lr_min_factor,
        lr_warmup=args.lr_warmup,
        round_interval=args.round_interval,
        max_steps=args.max_steps,
        strategy=args.strategy,
        clip_norm=args.clip_norm,
        trim_fraction=args.trim_fraction,
        dp_noise_multiplier=args.dp_noise_multiplier,
        dp_delta=args.dp_delta,
        dp_population=args.dp_population,
        client_id=args.client_id,
        username=args.username,
        password_file=args.password_file,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        mqtt_protocol=args.mqtt_protocol,
        chunk_size=args.chunk_size,
        connect_timeout=args.connect_timeout,
        signing_key=args.signing_key,
        device_keys=args.device_keys,
        require_signatures=args.require_signatures,
    )


def run(args: argparse.Namespace) -> int:
    from fleetlearn.aggregator.logs import setup_logging
    from fleetlearn.aggregator.server import EXIT_ROUND_FAILED, EXIT_SIGINT, EXIT_SIGTERM, Aggregator
    from fleetlearn.edge_runtime.core.state_lock import lock_state_dir

    setup_logging(args.log_level, args.log_format)
    config = config_from_args(args)
    config.validate()
    # One process per state dir, held until this process exits (before the engine reads it).
    state_lock = lock_state_dir(config.state_dir, "aggregator")  # noqa: F841 (kept alive on purpose)
    agg = Aggregator(config)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: agg.stop(EXIT_SIGTERM))
        signal.signal(signal.SIGINT, lambda *_: agg.stop(EXIT_SIGINT))
    code = agg.run()
    if code == EXIT_ROUND_FAILED:
        print(f"fleetlearn aggregator: error: {agg.exit_reason}", file=sys.stderr)
    return code
