"""The one `fleetlearn` command.

Each subcommand lives in a module with `add_arguments(parser)` and `run(args) -> int`.
Those modules import their heavy dependencies (torch, onnx, amqtt, rich...) inside `run`,
so a device that installed only the `edge` extra can still run `fleetlearn device`.
Only the chosen subcommand's module is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from fleetlearn.edge_runtime.core.errors import UsageError

# name -> (module, one-line help). Kept as data so `fleetlearn --help` imports nothing.
COMMANDS: dict[str, tuple[str, str]] = {
    "export": ("fleetlearn.export.cli", "export a PyTorch model to an on-device training bundle"),
    "device": ("fleetlearn.edge_runtime.device.cli", "run the device agent (torch-free)"),
    "swarm": ("fleetlearn.edge_runtime.device.swarm_cli", "run N real devices in one process (one epoll loop, shared data file)"),
    "aggregator": ("fleetlearn.aggregator.cli", "run the federated aggregator (FedAvg over MQTT)"),
    "broker": ("fleetlearn.aggregator.broker", "run a local MQTT broker: mosquitto if installed, else embedded amqtt"),
    "broker-config": ("fleetlearn.provisioning.broker_config", "write a secured mosquitto config for a fleet"),
    "demo": ("fleetlearn.demo", "broker + aggregator + N device processes on Boston housing"),
    "flash": ("fleetlearn.firmware_configs.flash", "write a self-contained device image from a profile"),
    "monitor": ("fleetlearn.monitor", "watch a fleet's rounds and devices live"),
    "report": ("fleetlearn.report", "plots and a summary table from an aggregator's round log"),
    "experiment": ("fleetlearn.experiment", "run a grid of strategy x partition x seed on a local fleet, tabulate the results"),
}


def _top_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: fleetlearn COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `fleetlearn COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    if argv[0] == "--version":
        from fleetlearn import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"fleetlearn: error: unknown command {name!r}; one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_ = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"fleetlearn {name}", description=(module.__doc__ or help_).strip())
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(module.run(args) or 0)
    except UsageError as exc:
        print(f"fleetlearn {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
