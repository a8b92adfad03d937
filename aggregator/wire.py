"""How the aggregator's messages fit the wire: the compression devices are asked to encode their
deltas with, and the largest message any topic may carry (`--compression`, `--max-message-size`).

Both travel to devices in every round config (protocol RoundConfig `compression`,
`max_message_size`). The message limit also shapes what the aggregator itself publishes: a
global model over it goes out as retained PART frames (protocol/parts.py, publisher.py), and the
bundle's chunks are cut small enough to fit (`bundle_chunk_size`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fleetlearn.edge_runtime.core.errors import ProtocolError, UsageError
from fleetlearn.edge_runtime.core.protocol import (
    MAX_MAX_MESSAGE_SIZE,
    MIN_MAX_MESSAGE_SIZE,
    Compression,
    RoundConfig,
    part_capacity,
)


@dataclass(frozen=True)
class WirePolicy:
    compression: str = "none"  # none | fp16 | int8[:BLOCK] | topk:FRACTION (protocol/encodings.py)
    max_message_size: int | None = None  # bytes; None: no limit

    @property
    def spec(self) -> Compression:
        return Compression.parse(self.compression)

    def validate(self) -> None:
        try:
            Compression.parse(self.compression)
        except ProtocolError as exc:
            raise UsageError(f"--compression: {exc.reason}") from None
        m = self.max_message_size
        if m is not None and not MIN_MAX_MESSAGE_SIZE <= m <= MAX_MAX_MESSAGE_SIZE:
            raise UsageError(
                f"--max-message-size must be in [{MIN_MAX_MESSAGE_SIZE}, {MAX_MAX_MESSAGE_SIZE}] bytes (JSON control messages are up to 64 KiB), got {m}"
            )

    def apply(self, config: RoundConfig) -> RoundConfig:
        """Round config with the wire settings devices must follow (left out when default)."""
        spec = self.spec
        return replace(config, compression=None if spec.kind == "none" else str(spec), max_message_size=self.max_message_size)

    def bundle_chunk_size(self, chunk_size: int) -> int:
        """The bundle chunk size that keeps each chunk frame under the message limit."""
        return chunk_size if self.max_message_size is None else min(chunk_size, part_capacity(self.max_message_size))
