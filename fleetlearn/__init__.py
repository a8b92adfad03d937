"""fleetlearn: federated learning that runs on real edge devices."""

__version__ = "0.1.0"
