"""The aggregator's flags for running as a service: the fleet lease and the Prometheus endpoint.
Kept out of cli.py so the flags of one concern stay together (aggregator/leader.py,
aggregator/metrics.py, docs/operations-service.md)."""

from __future__ import annotations

import argparse
from typing import Any


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
    lease = parser.add_argument_group("one writer per fleet (docs/operations-service.md)")
    lease.add_argument(
        "--takeover", action="store_true", help="take the fleet over when its leader's lease has expired (planned failover)"
    )
    lease.add_argument(
        "--lease-ttl", type=float, default=30.0, help="seconds the fleet lease lasts without a renewal (default 30)"
    )
    met = parser.add_argument_group("Prometheus metrics (docs/operations-service.md)")
    add_metrics_arguments(met)


def add_metrics_arguments(group: Any) -> None:
    """--metrics-port/--metrics-host/--metrics-per-device (the aggregator's and the monitor's)."""
    group.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on http://HOST:PORT/metrics")
    group.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics endpoint listens on (default 127.0.0.1)")
    group.add_argument(
        "--metrics-per-device", action="store_true", help="also export one series per device (cardinality grows with the fleet)"
    )


def lease_policy(args: argparse.Namespace):
    from fleetlearn.aggregator.leader import LeasePolicy

    return LeasePolicy(ttl=args.lease_ttl, takeover=args.takeover)


def start_metrics(args: argparse.Namespace, agg: Any):
    """With --metrics-port: an exporter listening to `agg`'s events, served; else None."""
    if args.metrics_port is None:
        return None
    try:
        from fleetlearn.aggregator.metrics import MetricsExporter
    except ImportError as exc:
        from fleetlearn.edge_runtime.core.errors import UsageError

        raise UsageError(f"--metrics-port needs prometheus-client (the server extra): {exc}") from None
    exporter = MetricsExporter(per_device=args.metrics_per_device)
    agg.events.listen(exporter.on_event)
    agg.watch_devices = True
    return exporter.serve(args.metrics_host, args.metrics_port)
