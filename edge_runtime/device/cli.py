"""Run the device agent: join the fleet named in the config, train each round, send deltas.

Needs only the `edge` extra (numpy, onnxruntime-training, paho-mqtt): no torch, no onnx.
"""

from __future__ import annotations

import argparse

from fleetlearn.edge_runtime.core.logs import add_log_arguments, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="device config TOML (see docs/device.md)")
    parser.add_argument(
        "--max-rounds", type=int, default=None, help="exit cleanly after this many completed rounds (tests, benchmarks)"
    )
    add_log_arguments(parser)  # --log-level, --log-format text|json


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    from fleetlearn.edge_runtime.device.agent import DeviceAgent
    from fleetlearn.edge_runtime.device.config import load_device_config

    cfg = load_device_config(args.config)
    return DeviceAgent(cfg, max_rounds=args.max_rounds).run()
