"""The aggregator's durable state: the versioned global model, the open round's partial
accumulator, and the round log. One small contract (after NVFlare's edge ModelManager):

    store = ModelStore.open(state_dir, model_hash, num_params, initial_weights=fn)
    store.run_id, store.round, store.weights          # version: (run_id, last completed round)
    store.check_version(run_id, model_hash, rnd)      # None, or why an update is stale/foreign
    store.save_partial(PartialRound(...))             # before acking an accepted update
    store.load_partial(rnd)                           # after a restart mid-round
    store.commit(rnd, new_weights, record, accepted, server_state)  # a round closed: w_r, state, rounds.jsonl
    pending = store.advance(rnd, new_weights, accepted, server_state)  # ... in memory first,
    store.write_commits([pending, ...])               # ... made durable later (commit_writer.py)
    store.server_state                                # the strategy's cross-round state at the last commit

Layout of a state dir (every file written to a temp file, fsynced, renamed; see
edge_runtime/core/files.py):

    state.json                 run_id, model hash, last durable round, its weights file + sha256,
                               the records of the rounds its commit wrote, the last round's
                               accepted (device, nonce) pairs
    global/round_0000.f32      w_0 (the bundle's initial weights), then w_1, w_2, ... (raw <f4)
    global/server_000r.bin     the strategy's cross-round state after round r (server momentum,
                               adaptive moments; absent for rules without any)
    partial_round.bin          the open round's accumulator (absent between rounds)
    rounds.jsonl               one RoundMetrics line per closed round (aggregator/round_log.py:
                               rewritten once per process, then appended and fsynced)
    model.onnx                 the final forward-only model (after the last round)
    bundle/                    the exported bundle, when the aggregator exported it (--model)

Two kinds of strategy state, never mixed (aggregator/strategy.py): the within-round
accumulator lives in partial_round.bin (written before acks, group commit); the cross-round
server state lives beside the weights it belongs to and is committed with them.

Commit order, so a crash anywhere leaves a state a restart can use. The round engine takes the
commit off its critical path (aggregator/commit_writer.py): a round closes in memory first
(`advance`: round r+1 opens on w_r at once) and is written by one writer thread while the
devices train round r+1:

    0. advance(r)              (memory only: the global model of round r+1 is published next)
    1. global/round_000r.f32   (new files, fsynced; then the directory, once per group)
       global/server_000r.bin  (when the strategy has cross-round state)
    2. state.json -> round r   (the commit point: it names both files with their sha256, so the
                               weights and the server state of one round become current together;
                               it also holds the records of the rounds this group commits)
    3. rounds.jsonl            (appended; a restart appends any committed record it lacks)
    4. partial_round.bin removed, if it is a committed round's (a restart ignores such a partial)
    5. (engine) round r's acks, its metrics message and its round_closed event

Rounds that close while an earlier commit is still being written wait and are written as one
group (steps 1-4 once). The rule that keeps an acknowledged update safe: an ack goes out only
after what holds its update is durable, and no update of round r+1 is acknowledged before
round r's commit is durable (its partial_round.bin is written after that commit, by the same
writer, in order). A crash between 0 and 2 therefore loses only unacknowledged work: the
restart reopens round r on w_{r-1}, the devices train it again (they see the round go back:
device/agent.py), and a partial of round r+1 left on disk is dropped (never acknowledged).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.aggregator.partial_round import (  # noqa: F401  (re-exported: the state files' codec lived here)
    PARTIAL_MAGIC,
    PartialRound,
    decode_partial,
    encode_partial,
    pack_state,
    unpack_state,
)
from fleetlearn.aggregator.partial_round import frame_state as _frame
from fleetlearn.aggregator.partial_round import unframe_state as _unframe
from fleetlearn.aggregator.round_log import ROUND_LOG, append_round_lines, append_round_record, read_round_log_or_empty
from fleetlearn.edge_runtime.core.errors import ProtocolError, UsageError
from fleetlearn.edge_runtime.core.files import atomic_write_bytes, atomic_write_json, fsync_dir, read_json
from fleetlearn.edge_runtime.core.protocol import HEX32_RE, RoundMetrics

STATE_FORMAT = "fleetlearn-aggregator-state"
STATE_VERSION = 1
SERVER_MAGIC = b"FLSRV1\n\0"


class StateError(UsageError):
    """The state dir is unusable (another model, corrupt files): the operator must decide."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode_server_state(run_id: str, rnd: int, state: dict[str, Any]) -> bytes:
    """The strategy's cross-round state after round `rnd`, in the partial file's framing."""
    scalars, arrays, body = pack_state(state)
    return _frame(SERVER_MAGIC, {"run_id": run_id, "round": rnd, "state": scalars, "arrays": arrays}, body)


def decode_server_state(raw: bytes) -> tuple[str, int, dict[str, Any]]:
    header, body = _unframe(SERVER_MAGIC, raw, "server-state")
    return header["run_id"], int(header["round"]), unpack_state(header["state"], header["arrays"], body)


@dataclass
class PendingCommit:
    """A closed round between `ModelStore.advance` (in memory: devices may train on it) and
    `ModelStore.write_commits` (durable). Everything is copied into bytes at advance, so the
    engine may go on mutating its arrays while a writer thread writes these."""

    round: int
    weights_raw: bytes  # w_r as raw little-endian float32
    server_raw: bytes | None  # the strategy's cross-round state after round r, encoded (None: none)
    accepted: dict[str, str]
    record: dict[str, Any] | None = None  # the round's RoundMetrics doc, set before the write


class ModelStore:
    """Versioned global model of one run. The round engine's thread owns it; `write_commits`
    and `write_partial` may run on one writer thread (aggregator/commit_writer.py), which is then
    the only one touching the files."""

    def __init__(
        self,
        state_dir: Path,
        run_id: str,
        model_hash: str,
        num_params: int,
        round_: int,
        weights: np.ndarray,
        doc: dict[str, Any],
        server_state: dict[str, Any] | None = None,
    ):
        self.state_dir = state_dir
        self.run_id = run_id
        self.model_hash = model_hash
        self.num_params = num_params
        self.round = round_  # last completed round (in memory); 0 before round 1 closes
        self.durable_round = round_  # last round whose commit is on disk (<= round)
        self.weights = weights
        self.server_state: dict[str, Any] = server_state or {}  # the strategy's state_dict() at that commit
        self._doc = doc
        self._last_accepted: dict[str, str] = dict(doc.get("last_accepted") or {})
        self._partial_round: int | None = None  # the round of the partial_round.bin this process wrote or found
        self._log_checked = False  # rounds.jsonl read and rewritten once: later records are appended

    # ------------------------------------------------------------ paths

    @property
    def state_path(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def partial_path(self) -> Path:
        return self.state_dir / "partial_round.bin"

    @property
    def rounds_log(self) -> Path:
        return self.state_dir / ROUND_LOG

    def weights_path(self, rnd: int) -> Path:
        return self.state_dir / "global" / f"round_{rnd:04d}.f32"

    def server_state_path(self, rnd: int) -> Path:
        return self.state_dir / "global" / f"server_{rnd:04d}.bin"

    @property
    def last_record(self) -> dict[str, Any] | None:
        return self._doc.get("last_record")

    @property
    def last_accepted(self) -> dict[str, str]:
        """device -> nonce of the updates counted in the last closed round (for late re-sends; read only)."""
        return self._last_accepted

    # ------------------------------------------------------------ open

    @classmethod
    def open(
        cls, state_dir: str | Path, model_hash: str, num_params: int, initial_weights: Callable[[], np.ndarray]
    ) -> ModelStore:
        """Resume the run in `state_dir`, or start a new run there (fresh run_id, w_0 saved)."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "state.json"
        if not path.exists():
            return cls._create(state_dir, model_hash, num_params, initial_weights())
        doc = read_json(path)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise StateError(f"{path} is not an aggregator state file (or is corrupt); use a fresh --state-dir")
        if doc.get("version") != STATE_VERSION:
            raise StateError(f"{path} has state version {doc.get('version')!r}, this aggregator reads {STATE_VERSION}")
        if doc.get("model_hash") != model_hash or doc.get("num_params") != num_params:
            raise StateError(
                f"{state_dir} belongs to model {str(doc.get('model_hash'))[:12]} ({doc.get('num_params')} params), "
                f"the bundle is {model_hash[:12]} ({num_params} params); use a fresh --state-dir for a new model"
            )
        run_id, rnd = doc.get("run_id"), doc.get("round")
        if not isinstance(run_id, str) or not HEX32_RE.fullmatch(run_id) or not isinstance(rnd, int) or rnd < 0:
            raise StateError(f"{path}: bad run_id or round")
        wpath = state_dir / doc.get("weights_file", "")
        try:
            raw = wpath.read_bytes()
        except OSError as exc:
            raise StateError(f"{state_dir}: global weights of round {rnd} unreadable ({exc})") from None
        if len(raw) != 4 * num_params or _sha256(raw) != doc.get("weights_sha256"):
            raise StateError(f"{wpath} fails its size/sha256 check (corrupt state dir)")
        weights = np.frombuffer(raw, dtype="<f4").astype(np.float32)
        store = cls(state_dir, run_id, model_hash, num_params, rnd, weights, doc, _read_server_state(state_dir, doc, run_id, rnd))
        store._repair()
        return store

    @classmethod
    def _create(cls, state_dir: Path, model_hash: str, num_params: int, weights: np.ndarray) -> ModelStore:
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (num_params,) or not np.isfinite(weights).all():
            raise StateError(f"initial weights have shape {weights.shape} (expected ({num_params},)) or are not finite")
        store = cls(state_dir, secrets.token_hex(16), model_hash, num_params, 0, weights, {"created": time.time()})
        store.write_commits([PendingCommit(0, _raw(weights), None, {})])
        return store

    def _repair(self) -> None:
        """Finish a commit a crash interrupted: log the committed rounds, drop a stale partial.

        A partial of a committed round is stale; so is one of a round after the open one: it was
        written while the round before it was still being committed (commit_writer.py), and that
        commit never became durable, so none of its updates was acknowledged."""
        recs = self._doc.get("recent_records") or ([self.last_record] if self.last_record else [])
        if recs and self.round > 0:
            try:
                records = [RoundMetrics.from_doc(r) for r in recs]
            except ProtocolError as exc:
                raise StateError(f"{self.state_path}: the last round's record is malformed ({exc.reason})") from None
            logged = {(r.round, r.run_id) for r in read_round_log_or_empty(self.rounds_log).records}
            for record in records:
                if (record.round, record.run_id) not in logged:
                    append_round_record(self.rounds_log, record)
        p = self.load_partial(None)
        if p is not None and (p.run_id != self.run_id or p.round <= self.round or p.round > self.open_round):
            self.clear_partial()
        elif p is not None:
            self._partial_round = p.round

    # ------------------------------------------------------------ version

    @property
    def open_round(self) -> int:
        return self.round + 1

    def check_version(self, run_id: str, model_hash: str, rnd: int) -> str | None:
        """Why an update for (run_id, model_hash, rnd) cannot count now, or None if it can."""
        if run_id != self.run_id:
            return f"run {run_id[:8]} is not the current run {self.run_id[:8]}"
        if model_hash != self.model_hash:
            return f"model {model_hash[:12]} is not the current model {self.model_hash[:12]}"
        if rnd < self.open_round:
            return f"round {rnd} closed (stale: trained on an older global model; round {self.open_round} is open)"
        if rnd > self.open_round:
            return f"round {rnd} not open (round {self.open_round} is)"
        return None

    # ------------------------------------------------------------ commit

    def advance(
        self, rnd: int, weights: np.ndarray, accepted: dict[str, str], server_state: dict[str, Any] | None = None
    ) -> PendingCommit:
        """Round `rnd` closed with `weights`: make them the current version in memory (the next
        round opens on them) and return what `write_commits` makes durable. Nothing is on disk
        yet: no update of round `rnd`+1 may be acknowledged before that write is done."""
        if rnd != self.open_round:
            raise ValueError(f"commit of round {rnd} while round {self.open_round} is open")
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (self.num_params,):
            raise ValueError(f"new weights have shape {weights.shape}")
        state = dict(server_state or {})
        server_raw = encode_server_state(self.run_id, rnd, state) if state else None
        pending = PendingCommit(rnd, _raw(weights), server_raw, dict(accepted))
        self.round, self.weights, self.server_state, self._last_accepted = rnd, weights, state, dict(accepted)
        return pending

    def write_commits(self, batch: list[PendingCommit]) -> None:
        """Make closed rounds durable, in round order, as one group (see the module docstring for
        the order): each round's weights and server state files, then state.json naming the last
        round (the commit point; it keeps every record of the group), then their lines in
        rounds.jsonl, then a partial of a committed round removed."""
        if not batch:
            return
        entries = []
        for c in batch:
            self._write_weights(c.round, c.weights_raw, sync_dir=False)
            entries.append(self._write_server_state(c.round, c.server_raw, sync_dir=False))
        fsync_dir(self.weights_path(0).parent)  # the new files' names, before state.json names them
        last, records = batch[-1], [c.record for c in batch if c.record is not None]
        self._write_state(last, records, entries[-1])
        if records:
            self._log_records([RoundMetrics.from_doc(r) for r in records])
        if self._partial_round is not None and self._partial_round <= last.round:
            self.clear_partial()
        self.durable_round = last.round

    def _write_weights(self, rnd: int, weights: np.ndarray | bytes, sync_dir: bool = True) -> None:
        """Step 1: w_rnd, a new file (nothing names it until state.json does)."""
        atomic_write_bytes(self.weights_path(rnd), weights if isinstance(weights, bytes) else _raw(weights), sync_dir=sync_dir)

    def _write_server_state(self, rnd: int, state: dict[str, Any] | bytes | None, sync_dir: bool = True) -> dict[str, Any] | None:
        """Step 1: round `rnd`'s server state (a new file); its entry for state.json, None if empty."""
        raw = (
            state
            if isinstance(state, bytes) or state is None
            else (encode_server_state(self.run_id, rnd, state) if state else None)
        )
        if raw is None:
            return None
        path = self.server_state_path(rnd)
        atomic_write_bytes(path, raw, sync_dir=sync_dir)
        return {"file": str(path.relative_to(self.state_dir)), "sha256": _sha256(raw)}

    def _write_state(self, c: PendingCommit, records: list[dict[str, Any]], server: dict[str, Any] | None) -> None:
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "model_hash": self.model_hash,
            "num_params": self.num_params,
            "round": c.round,
            "weights_file": str(self.weights_path(c.round).relative_to(self.state_dir)),
            "weights_sha256": _sha256(c.weights_raw),
            "last_record": records[-1] if records else None,
            "recent_records": records,  # every round of this group: a restart logs any rounds.jsonl lacks
            "last_accepted": c.accepted,
            "server_state": server,
            "created": self._doc.get("created", time.time()),
            "updated": time.time(),
        }
        atomic_write_json(self.state_path, doc)
        self._doc = doc

    def _log_records(self, records: list[RoundMetrics]) -> None:
        """Append to rounds.jsonl (fsynced). The first write of a process rewrites the file
        (round_log.append_round_record: it replaces a line of a round closed again after a
        restart, and drops a torn tail); after that this process is the file's only writer and
        its rounds only grow, so an append is enough, and costs O(1) instead of O(rounds)."""
        if not self._log_checked:
            for record in records:
                append_round_record(self.rounds_log, record)
            self._log_checked = True
        else:
            append_round_lines(self.rounds_log, records)

    def commit(
        self,
        rnd: int,
        weights: np.ndarray,
        record: RoundMetrics | dict[str, Any],
        accepted: dict[str, str],
        server_state: dict[str, Any] | None = None,
    ) -> None:
        """Round `rnd` closed with `weights` (and the strategy's cross-round `server_state` after
        it): advance and write it at once (the synchronous form of advance + write_commits).

        `record` is checked as a RoundMetrics (a dict is converted) before anything is written:
        rounds.jsonl holds only what the protocol says a round record is."""
        doc = (record if isinstance(record, RoundMetrics) else RoundMetrics.from_doc(record)).to_doc()
        pending = self.advance(rnd, weights, accepted, server_state)
        pending.record = doc
        self.write_commits([pending])

    # ------------------------------------------------------------ partial round

    def save_partial(self, partial: PartialRound) -> None:
        self.write_partial(partial.round, encode_partial(partial))

    def write_partial(self, rnd: int, raw: bytes) -> None:
        """An encoded PartialRound of round `rnd` (durable, atomic)."""
        atomic_write_bytes(self.partial_path, raw)
        self._partial_round = rnd

    def load_partial(self, rnd: int | None) -> PartialRound | None:
        """The persisted partial round (of round `rnd`, when given), or None when there is none.

        A corrupt file (never written by us: writes are atomic) is moved aside as
        partial_round.bin.corrupt and StateError raised: the updates it held were acked, so
        losing them silently would be wrong; the operator sees why, and a restart opens the
        round afresh."""
        try:
            raw = self.partial_path.read_bytes()
        except OSError:
            return None
        try:
            p = decode_partial(raw)
        except (ValueError, KeyError, TypeError) as exc:
            os.replace(self.partial_path, self.partial_path.with_suffix(".bin.corrupt"))
            raise StateError(f"{self.partial_path} is corrupt ({exc}); moved aside, restart to open the round afresh") from None
        if rnd is not None and (p.run_id != self.run_id or p.round != rnd):
            return None
        return p

    def clear_partial(self) -> None:
        self._partial_round = None
        try:
            self.partial_path.unlink()
        except FileNotFoundError:
            pass


def _raw(weights: np.ndarray) -> bytes:
    return np.ascontiguousarray(weights, dtype="<f4").tobytes()


def _read_server_state(state_dir: Path, doc: dict[str, Any], run_id: str, rnd: int) -> dict[str, Any]:
    """The server state state.json names (checked against its sha256, run and round); {} if none."""
    entry = doc.get("server_state")
    if not entry:
        return {}
    path = state_dir / str(entry.get("file", ""))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StateError(f"{state_dir}: server state of round {rnd} unreadable ({exc})") from None
    if _sha256(raw) != entry.get("sha256"):
        raise StateError(f"{path} fails its sha256 check (corrupt state dir)")
    try:
        saved_run, saved_round, state = decode_server_state(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"{path} is corrupt ({exc})") from None
    if saved_run != run_id or saved_round != rnd:
        raise StateError(f"{path} belongs to run {saved_run[:8]} round {saved_round}, not run {run_id[:8]} round {rnd}")
    return state
