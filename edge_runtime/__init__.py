"""The device side of fleetlearn: runs with numpy, onnxruntime-training and paho-mqtt only.

Never import torch, onnx, `aggregator` or `export` from here: this package is what a
Raspberry Pi installs. The wire protocol lives here too (`protocol.py`); the aggregator
imports it, not the reverse.
"""
