"""The fleetlearn aggregator (federated rounds over MQTT) and the embedded amqtt broker.

Python API (imports are lazy, so `import aggregator` costs nothing):

    from fleetlearn.aggregator import Aggregator, AggregatorConfig, RoundPolicy, run_aggregator, EmbeddedBroker

    with EmbeddedBroker("127.0.0.1", 0) as broker:            # port 0: any free port
        cfg = AggregatorConfig(broker=broker.url, state_dir=Path("run"), bundle=Path("bundle"),
                               rounds=RoundPolicy(rounds=3, min_devices=2, deadline=30))
        code = run_aggregator(cfg)                              # 0 done, 3 round failed

docs/aggregator.md describes the round state machine, validation, strategies, durability.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "Aggregator": "fleetlearn.aggregator.engine",
    "run_aggregator": "fleetlearn.aggregator.engine",
    "AggregatorConfig": "fleetlearn.aggregator.config",
    "RoundPolicy": "fleetlearn.aggregator.config",
    "SigningConfig": "fleetlearn.aggregator.config",
    "TrainingPlan": "fleetlearn.aggregator.schedule",
    "StrategyChoice": "fleetlearn.aggregator.registry",
    "make_strategy": "fleetlearn.aggregator.registry",
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
