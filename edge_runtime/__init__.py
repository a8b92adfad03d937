"""The device side of fleetlearn, and the ground floor every other part stands on.

Three rooms, in the order they depend on each other:

- `core/`: the torch-free core that every side shares: the wire protocol (`protocol`), the
  MQTT link (`mqtt`), typed errors (`errors`), crash-safe files (`files`), topic-safe names
  (`names`), the bundle manifest reader (`bundle`), data loading (`data`) and Ed25519 signing
  (`signing`, needs `cryptography` and is imported only when keys are configured).
- `engines/`: training and evaluation engines that run a bundle's ONNX graphs through ONNX
  Runtime. The aggregator uses them to evaluate the global model.
- `device/`: the device agent that only devices run: its config, durable round state,
  bundle fetch, local differential privacy and `fleetlearn device`.

Imports allowed here: the standard library, numpy, onnxruntime (or onnxruntime-training),
paho-mqtt, and cryptography when signing is configured. Never torch, onnx, or the other
fleetlearn packages (aggregator, export, firmware_configs, the CLI layer): this package is what
a Raspberry Pi installs, and tests/test_layers.py checks the rule.
"""
