"""The wire protocol: MQTT topics and payload encodings, shared by devices and the aggregator.

Everything here treats its input as hostile: every decoder checks sizes before it allocates,
validates every field, and raises `ProtocolError` with a one-line reason. Nothing is ever
unpickled. docs/protocol.md is the prose version of this package.

    fields    field checks, the JSON envelope ("v": 1) of control messages, name/hex patterns
    frame     the binary frame: header (the one parser: read_header), encode/decode, peek_meta
    topics    the topic tree (TOPIC_TREE: who publishes and who reads each topic) and Topics
    messages  RoundConfig, Invitation, GlobalModel, Update (+ UpdateHeader), Ack, RoundState
    status    Status (+ Health), a device's retained state
    bundle    BundleAnnouncement and BUNDLE_CHUNK frames, chunk-size bounds
    metrics   RoundMetrics: the `metrics` message and a line of rounds.jsonl
    encodings tensor body encodings (float32, fp16, int8 blocks, top-k) and error feedback
    parts     PART frames: messages over --max-message-size, and the one chunk assembly
    lease     Lease and LeaseView: which aggregator run leads the fleet (`leader`)

Import from here (`from fleetlearn.edge_runtime.core.protocol import Update`); a new wire
message is one type in one of these modules, exported below.

Topics (per fleet; topics.TOPIC_TREE is the table):
    fleetlearn/<fleet>/global              retained  binary GLOBAL frame: round, model hash, flat weights, round config, invitation
    fleetlearn/<fleet>/global/part/<i>     retained  binary PART frames of a GLOBAL frame over --max-message-size
    fleetlearn/<fleet>/round               retained  JSON round state (open / closed / finished / failed)
    fleetlearn/<fleet>/update/<device>     -         binary UPDATE frame: device -> aggregator weight delta
    fleetlearn/<fleet>/ack/<device>        -         JSON acknowledgement of one update (accepted or the reason)
    fleetlearn/<fleet>/status/<device>     retained  JSON device status; the MQTT Last Will sets "offline"
    fleetlearn/<fleet>/metrics             retained  JSON metrics of the last closed round
    fleetlearn/<fleet>/leader              retained  JSON lease: the aggregator run that leads the fleet
    fleetlearn/<fleet>/bundle              retained  JSON bundle announcement (manifest + chunking)
    fleetlearn/<fleet>/bundle/<hash>/<i>   retained  binary BUNDLE_CHUNK frames of the bundle's files

Binary frame (all integers little-endian):
    offset size field
    0      4    magic b"FLRN"
    4      1    wire version (1)
    5      1    kind (1 GLOBAL, 2 UPDATE, 3 BUNDLE_CHUNK, 4 PART)
    6      1    body encoding (0 float32 LE; 1 raw bytes; 2 fp16 LE; 3 int8 blocks; 4 top-k)
    7      1    flags (bit 0: signed)
    8      4    meta_len: bytes of the UTF-8 JSON meta object that follows the header
    12     4    body_len: bytes of the body that follows the meta
    16     4    crc32 of the body (zlib.crc32), catches truncation and corruption in transit
    20     2    sig_len: bytes of the signature that follows the body (0 when unsigned)
    22     2    reserved (0)
    24     ...  meta | body | signature
The signature (Ed25519 when present) covers every byte before it.
"""

from __future__ import annotations

from fleetlearn.edge_runtime.core.protocol.bundle import (
    DEFAULT_CHUNK_SIZE,
    MAX_BUNDLE_ANNOUNCEMENT_BYTES,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    BundleAnnouncement,
    decode_chunk,
    encode_chunk,
)
from fleetlearn.edge_runtime.core.protocol.encodings import (
    DEFAULT_INT8_BLOCK,
    TENSOR_ENCODINGS,
    Compression,
    decode_tensor,
    encode_tensor,
    feedback_step,
    max_body_bytes,
)
from fleetlearn.edge_runtime.core.protocol.fields import (
    HEX32_RE,
    HEX64_RE,
    MAX_JSON_BYTES,
    MAX_ROUND,
    NAME_RE,
    WIRE_VERSION,
    decode_json,
    encode_json,
)
from fleetlearn.edge_runtime.core.protocol.frame import (
    FLAG_SIGNED,
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_META_BYTES,
    MAX_SIG_BYTES,
    Encoding,
    Frame,
    FrameHeader,
    Kind,
    Signer,
    decode_frame,
    encode_frame,
    max_frame_bytes,
    peek_meta,
    read_header,
    tensor_from_body,
    tensor_to_body,
)
from fleetlearn.edge_runtime.core.protocol.lease import LEASE_STATES, Lease, LeaseView, encode_probe, probe_token
from fleetlearn.edge_runtime.core.protocol.messages import (
    MAX_DECODE_PARAMS,
    MAX_MAX_MESSAGE_SIZE,
    MAX_MODEL_PARAMS,
    MAX_PROXIMAL_MU,
    MIN_MAX_MESSAGE_SIZE,
    RANK_SPACE,
    ROUND_STATES,
    Ack,
    GlobalModel,
    Invitation,
    RoundConfig,
    RoundState,
    Update,
    UpdateHeader,
    invitation_rank,
)
from fleetlearn.edge_runtime.core.protocol.metrics import RoundMetrics
from fleetlearn.edge_runtime.core.protocol.parts import (
    PART_META_RESERVE,
    PART_TIMEOUT_S,
    ChunkAssembly,
    GlobalParts,
    Part,
    PartsBusy,
    Reassembler,
    is_part,
    part_capacity,
    split_message,
)
from fleetlearn.edge_runtime.core.protocol.status import DEVICE_STATES, POWER_SOURCES, Health, Status
from fleetlearn.edge_runtime.core.protocol.topics import TOPIC_TREE, Grant, TopicRule, Topics

__all__ = [
    "DEFAULT_CHUNK_SIZE", "MAX_BUNDLE_ANNOUNCEMENT_BYTES", "MAX_CHUNK_SIZE", "MIN_CHUNK_SIZE", "BundleAnnouncement", "decode_chunk", "encode_chunk",
    "HEX32_RE", "HEX64_RE", "MAX_JSON_BYTES", "MAX_ROUND", "NAME_RE", "WIRE_VERSION", "decode_json", "encode_json",
    "FLAG_SIGNED", "HEADER", "HEADER_SIZE", "MAGIC", "MAX_META_BYTES", "MAX_SIG_BYTES", "Encoding", "Frame", "FrameHeader", "Kind", "Signer",
    "decode_frame", "encode_frame", "max_frame_bytes", "peek_meta", "read_header", "tensor_from_body", "tensor_to_body",
    "DEVICE_STATES", "MAX_DECODE_PARAMS", "MAX_MODEL_PARAMS", "MAX_PROXIMAL_MU", "RANK_SPACE", "ROUND_STATES", "Ack", "GlobalModel", "Invitation", "invitation_rank", "RoundConfig", "RoundState", "Status", "Update", "UpdateHeader",
    "DEFAULT_INT8_BLOCK", "TENSOR_ENCODINGS", "Compression", "decode_tensor", "encode_tensor", "feedback_step", "max_body_bytes",
    "MAX_MAX_MESSAGE_SIZE", "MIN_MAX_MESSAGE_SIZE",
    "PART_META_RESERVE", "PART_TIMEOUT_S", "ChunkAssembly", "GlobalParts", "Part", "PartsBusy", "Reassembler", "is_part", "part_capacity", "split_message",
    "LEASE_STATES", "Lease", "LeaseView", "encode_probe", "probe_token",
    "RoundMetrics", "POWER_SOURCES", "Health", "TOPIC_TREE", "Grant", "TopicRule", "Topics",
]  # fmt: skip
