"""The aggregator's structured logs: the shared formatter in fleetlearn.edge_runtime.core.logs
(key=value text or one JSON object per line), re-exported here for the aggregator's modules."""

from fleetlearn.edge_runtime.core.logs import LEVELS, JsonFormatter, KVFormatter, kv, kv_value, setup_logging

__all__ = ["LEVELS", "JsonFormatter", "KVFormatter", "kv", "kv_value", "setup_logging"]
