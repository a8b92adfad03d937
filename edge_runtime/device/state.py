"""What a device keeps across restarts: its round bookkeeping and the pending update frame."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from fleetlearn.edge_runtime.core.errors import ProtocolError
from fleetlearn.edge_runtime.core.files import atomic_write_bytes, atomic_write_json, read_json
from fleetlearn.edge_runtime.core.protocol import UpdateHeader


@dataclass
class DeviceState:
    """What a device must remember across a power cut (state_dir/device_state.json)."""

    run_id: str = ""
    last_round: int = 0  # the last round whose update was acknowledged or whose round closed
    rounds_done: int = 0  # rounds completed by this process lifetime's counting (for --max-rounds)
    pending_round: int = 0  # round of the update not yet acknowledged (0: none)
    pending_nonce: str = ""
    max_message_size: int = 0  # the last round config's message limit (0: none), for re-sends after a restart
    pending_base: int = 0  # crc32 of the global weights the pending update was trained from (0: unknown)
    seen_round: int = 0  # the highest round whose global model this run showed us
    acked_round: int = 0  # the highest round whose update the aggregator acknowledged as counted

    @classmethod
    def load(cls, state_dir: Path) -> DeviceState:
        doc = read_json(state_dir / "device_state.json")
        if not isinstance(doc, dict):
            return cls()
        try:
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except TypeError:
            return cls()

    def save(self, state_dir: Path) -> None:
        # Not fsynced: after a power cut the pending update file (which is) tells the agent
        # what was pending (recover_pending), and a lost "last round" only makes it re-send an
        # update that the aggregator then recognises (same nonce) or refuses as late. Never
        # counted twice.
        atomic_write_json(state_dir / "device_state.json", asdict(self), durable=False)


def save_pending_update(state_dir: Path, payload: bytes, durable: bool = True) -> None:
    """The encoded update frame, written atomically before it is first sent; re-sent as-is after
    a restart. durable=False (no fsync: it survives the process being killed, not a power cut)
    for the swarm's group commit (it syncs the file system before sending) and for an update
    without an error-feedback residual: losing it to a power cut only costs a retrain, because
    the aggregator counts one update per device and round (another nonce is refused as a
    duplicate). With a residual it must be durable: device/feedback.py decides from it which
    residual is current."""
    atomic_write_bytes(state_dir / "pending_update.bin", payload, durable=durable)


def load_pending_update(state_dir: Path) -> bytes | None:
    try:
        return (state_dir / "pending_update.bin").read_bytes()
    except OSError:
        return None


def clear_pending_update(state_dir: Path) -> None:
    try:
        (state_dir / "pending_update.bin").unlink()
    except FileNotFoundError:
        pass


def recover_pending(state_dir: Path, state: DeviceState) -> int:
    """device_state.json may be older than the pending update file: after a power cut (it is
    not fsynced, the pending update is), and after a crash right after a send (a lone device
    writes its state at the next quiet moment, device/host.py). The frame itself says which
    run, round and nonce it is. Returns the round recovered into `state` (saved), or 0.

    A state that names an older pending round of the same run is stale: the device trained the
    frame's round, so it had settled that older round (its residual included) and seen the
    frame's round."""
    payload = load_pending_update(state_dir)
    if payload is None:
        return 0
    try:
        peek = UpdateHeader.peek(payload, verify_body=True).require("run_id", "round", "nonce")
        run_id, round_, nonce = str(peek.run_id), int(peek.round or 0), str(peek.nonce)
    except ProtocolError:
        if not state.pending_round:  # a state that names a pending update keeps its frame's fate to the agent
            clear_pending_update(state_dir)
        return 0
    if state.pending_round:
        if state.run_id != run_id or round_ <= state.pending_round:
            return 0  # the state knows this frame (or a later one): nothing stale
        state.last_round = max(state.last_round, state.pending_round)
        state.pending_base = 0  # unknown: the frame does not say which global weights it came from
    elif round_ <= state.last_round:
        return 0
    state.run_id, state.pending_round, state.pending_nonce = run_id, round_, nonce
    state.seen_round = max(state.seen_round, round_)
    state.save(state_dir)
    return round_
