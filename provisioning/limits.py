"""Broker limits sized from the model and the fleet: every legitimate message passes, nothing
else is unbounded. Frame sizes come from the wire protocol (max_frame_bytes, MAX_JSON_BYTES,
MAX_MODEL_PARAMS), never copied here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from fleetlearn.edge_runtime.core.protocol import MAX_JSON_BYTES, MAX_MODEL_PARAMS, max_body_bytes, max_frame_bytes
from fleetlearn.provisioning.errors import BrokerConfigError

HEADROOM_BYTES = 64 * 1024  # slack above the largest legitimate payload (a longer meta, a new field)
# max_packet_size counts the whole PUBLISH packet: fixed header (<=5), topic (<=2+65535), packet
# id, MQTT 5 properties. Above the payload limit by this much, a packet is no longer "a slightly
# too large message" but hostile: the broker disconnects the sender before buffering it.
PACKET_OVERHEAD_BYTES = 64 * 1024 + 1024
MQTT_MAX_PAYLOAD = 268_435_455 - PACKET_OVERHEAD_BYTES

# Without --bundle the bundle's size is a guess: model.onnx, the training graph's checkpoint and
# graphs hold about two copies of the float32 weights; 12 bytes a parameter plus 1 MiB of graph
# is generous (the boston-mlp bundle is 25.6 kB for 1657 parameters: 15.5 B/param, mostly graph).
EST_BUNDLE_BYTES_PER_PARAM = 12
EST_BUNDLE_GRAPH_BYTES = 1 << 20

CONTROL_MESSAGES = 100  # round/metrics/ack/status messages on top of the model traffic
CONTROL_BYTES = 1 << 20
MAX_INFLIGHT_MESSAGES = 20  # mosquitto's default, stated so nobody "tunes" it to 0 (no limit)


@dataclass(frozen=True)
class ModelSize:
    """What the limits are sized from: the model, and the bundle devices fetch over MQTT."""

    num_params: int
    chunk_size: int
    bundle_bytes: int  # total bytes of the bundle's files (estimated without --bundle)
    announcement_bytes: int  # the retained bundle announcement (JSON with the manifest)
    measured: bool  # True when read from a bundle, False when estimated from --max-model-params


@dataclass(frozen=True)
class Limits:
    message_size_limit: int
    max_packet_size: int
    max_queued_messages: int
    max_queued_bytes: int
    max_inflight_messages: int
    max_connections: int


def model_frame_bytes(num_params: int) -> int:
    """Largest GLOBAL or UPDATE frame of a model: header + meta bound + body bound (float32 + the encodings' 16) + signature bound."""
    return max_frame_bytes(max_body_bytes(num_params), signed=True)


def chunk_frame_bytes(chunk_size: int) -> int:
    """Largest BUNDLE_CHUNK frame (chunks are never signed)."""
    return max_frame_bytes(chunk_size, signed=False)


def size_from_params(num_params: int, chunk_size: int) -> ModelSize:
    if not 1 <= num_params <= MAX_MODEL_PARAMS:
        raise BrokerConfigError(f"--max-model-params {num_params} must be between 1 and {MAX_MODEL_PARAMS} (what devices accept)")
    estimate = EST_BUNDLE_BYTES_PER_PARAM * num_params + EST_BUNDLE_GRAPH_BYTES
    return ModelSize(num_params, chunk_size, estimate, MAX_JSON_BYTES, measured=False)


def size_from_bundle(bundle_dir: Path, chunk_size: int) -> ModelSize:
    """Exact sizes from an exported bundle: num_params, file bytes, the announcement's length."""
    from fleetlearn.edge_runtime.core.bundle import load_bundle, plan_announcement

    if not Path(bundle_dir).is_dir():
        raise BrokerConfigError(f"--bundle {bundle_dir}: not a directory")
    manifest = load_bundle(bundle_dir)  # BundleError is a UsageError: one line, exit 2
    a = plan_announcement(bundle_dir, manifest, chunk_size)
    return ModelSize(manifest.num_params, chunk_size, a.total_bytes, len(a.encode()), measured=True)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def compute_limits(size: ModelSize, n_devices: int) -> Limits:
    """Broker limits for a fleet: every legitimate message passes, nothing else is unbounded.

    mosquitto 2.0 has one value per limit for all clients, so each is the largest any one
    client legitimately needs:
      * the aggregator (and a monitor) get one update per device per round, all at once;
      * a device fetching the bundle gets every retained chunk at once, plus a global model or two.
    """
    frame = model_frame_bytes(size.num_params)
    chunk = chunk_frame_bytes(size.chunk_size)
    largest = max(frame, chunk, size.announcement_bytes, MAX_JSON_BYTES)
    message_limit = _round_up(largest + HEADROOM_BYTES, 4096)
    if message_limit > MQTT_MAX_PAYLOAD:
        raise BrokerConfigError(
            f"a {size.num_params}-parameter model needs {message_limit}-byte messages, over MQTT's limit; use a smaller model"
        )
    chunks = math.ceil(size.bundle_bytes / size.chunk_size)
    # Monitor: an update, a status and an ack per device per round; device: every chunk.
    queued_messages = max(3 * n_devices, chunks + 4) + CONTROL_MESSAGES
    queued_bytes = max(n_devices * frame, chunks * chunk + 2 * frame, 2 * message_limit) + CONTROL_BYTES
    return Limits(
        message_size_limit=message_limit,
        max_packet_size=message_limit + PACKET_OVERHEAD_BYTES,
        max_queued_messages=queued_messages,
        max_queued_bytes=_round_up(queued_bytes, 1 << 20),
        max_inflight_messages=MAX_INFLIGHT_MESSAGES,
        # Each client once, plus as many again for reconnects racing their old socket's
        # timeout, plus some for operators' tools: a flood of half-open sockets stops here.
        max_connections=2 * (n_devices + 2) + 32,
    )
