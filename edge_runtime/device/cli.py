"""Run the device agent: join the fleet named in the config, train each round, send deltas.

Needs only the `edge` extra (numpy, onnxruntime-training, paho-mqtt): no torch, no onnx.
"""

from __future__ import annotations

import argparse
import logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="device config TOML (see docs/device.md)")
    parser.add_argument("--max-rounds", type=int, default=None, help="exit cleanly after this many completed rounds (tests, benchmarks)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity (default info)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    from fleetlearn.edge_runtime.device.agent import DeviceAgent
    from fleetlearn.edge_runtime.device.config import load_device_config

    cfg = load_device_config(args.config)
    return DeviceAgent(cfg, max_rounds=args.max_rounds).run()
