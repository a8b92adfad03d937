"""The fleetlearn aggregator (FedAvg rounds over MQTT) and the embedded amqtt broker.

Python API (imports are lazy, so `import aggregator` costs nothing):

    from fleetlearn.aggregator import Aggregator, AggregatorConfig, run_aggregator, EmbeddedBroker

    with EmbeddedBroker("127.0.0.1", 0) as broker:            # port 0: any free port
        cfg = AggregatorConfig(broker=broker.url, state_dir=Path("run"), rounds=3,
                               min_devices=2, bundle=Path("bundle"), deadline=30)
        code = run_aggregator(cfg)                              # 0 done, 3 round failed

docs/aggregator.md describes the round state machine, validation, FedAvg, durability.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Aggregator": "fleetlearn.aggregator.server",
    "AggregatorConfig": "fleetlearn.aggregator.server",
    "run_aggregator": "fleetlearn.aggregator.server",
    "EmbeddedBroker": "fleetlearn.aggregator.broker",
    "Strategy": "fleetlearn.aggregator.strategy",
    "FedAvg": "fleetlearn.aggregator.fedavg",
    "ModelStore": "fleetlearn.aggregator.model_store",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'aggregator' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
