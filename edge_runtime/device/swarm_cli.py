"""Run N real devices in one process: `fleetlearn swarm --config device.toml --devices N --data FILE`.

The config gives broker, fleet, bundle, training and security settings; its device_id is
ignored (devices are `<id-prefix>0000`...), its state_dir becomes the parent of one state dir
per device, and its data file is replaced by --data, partitioned across the devices.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from fleetlearn.edge_runtime.core.logs import add_log_arguments, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", required=True, help="device config TOML (see docs/device.md); device_id and data are overridden"
    )
    parser.add_argument("--devices", type=int, required=True, help="how many virtual devices")
    parser.add_argument("--data", required=True, help="dataset (NPZ with x, y or CSV) to partition across the devices")
    parser.add_argument("--partition", default="iid", help="iid (default), dirichlet:ALPHA or shards:K")
    parser.add_argument("--id-prefix", default="swarm-", help="device ids are PREFIX0000, PREFIX0001, ...")
    parser.add_argument("--seed", type=int, default=0, help="partition seed")
    parser.add_argument("--max-rounds", type=int, default=None, help="each device stops after this many completed rounds")
    add_log_arguments(parser)


def run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, args.log_format)
    from fleetlearn.edge_runtime.core.bundle import load_bundle
    from fleetlearn.edge_runtime.core.errors import BundleError, UsageError
    from fleetlearn.edge_runtime.core.names import check_name
    from fleetlearn.edge_runtime.device.config import load_device_config
    from fleetlearn.edge_runtime.device.swarm import Swarm, device_ids, write_shards

    if args.devices < 1:
        raise UsageError("--devices must be >= 1")
    cfg = load_device_config(args.config)
    ids = device_ids(args.id_prefix, args.devices)
    check_name(ids[-1], "--id-prefix + number")
    try:
        task = load_bundle(cfg.bundle).task
    except BundleError:  # no bundle yet (it arrives over the air): iid needs no task
        task = "regression"
    shards = write_shards(args.data, Path(cfg.state_dir), ids, args.partition, args.seed, task, cfg.target)
    logging.getLogger("fleetlearn.swarm").info("event=swarm_shards devices=%d partition=%s", len(ids), args.partition)
    return Swarm(cfg, ids, shards, args.max_rounds).run()
