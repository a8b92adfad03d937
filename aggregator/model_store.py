"""The aggregator's durable state: the versioned global model, the open round's partial
accumulator, and the round log. One small contract (after NVFlare's edge ModelManager):

    store = ModelStore.open(state_dir, model_hash, num_params, initial_weights=fn)
    store.run_id, store.round, store.weights          # version: (run_id, last completed round)
    store.check_version(run_id, model_hash, rnd)      # None, or why an update is stale/foreign
    store.save_partial(PartialRound(...))             # before acking an accepted update
    store.load_partial(rnd)                           # after a restart mid-round
    store.commit(rnd, new_weights, record, accepted, server_state)  # a round closed: w_r, state, rounds.jsonl
    store.server_state                                # the strategy's cross-round state at the last commit

Layout of a state dir (every file written to a temp file, fsynced, renamed; see
edge_runtime/core/files.py):

    state.json                 run_id, model hash, last completed round, its weights file + sha256,
                               the last round's record and accepted (device, nonce) pairs
    global/round_0000.f32      w_0 (the bundle's initial weights), then w_1, w_2, ... (raw <f4)
    global/server_000r.bin     the strategy's cross-round state after round r (server momentum,
                               adaptive moments; absent for rules without any)
    partial_round.bin          the open round's accumulator (absent between rounds; format: aggregator/partial_round.py)
    rounds.jsonl               one RoundMetrics line per closed round (aggregator/round_log.py:
                               rewritten and renamed, never torn)
    model.onnx                 the final forward-only model (after the last round)
    bundle/                    the exported bundle, when the aggregator exported it (--model)

Two kinds of strategy state, never mixed (aggregator/strategy.py): the within-round
accumulator lives in partial_round.bin (written before acks, group commit); the cross-round
server state lives beside the weights it belongs to and is committed with them.

Commit order, so a crash anywhere leaves a state a restart can use:
    1. global/round_000r.f32   (a new file; the old state still names w_{r-1})
       global/server_000r.bin  (a new file, when the strategy has cross-round state)
    2. state.json -> round r   (the commit point: it names both files with their sha256, so the
                               weights and the server state of one round become current together;
                               it also holds round r's record)
    3. rounds.jsonl            (a restart appends round r's record from state.json if missing)
    4. partial_round.bin removed (a restart ignores a partial whose round is already committed)
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fleetlearn.aggregator.partial_round import (
    PartialRound,
    decode_partial,
    encode_partial,
    pack_state,
    unpack_state,
)
from fleetlearn.aggregator.partial_round import frame_state as _frame
from fleetlearn.aggregator.partial_round import unframe_state as _unframe
from fleetlearn.aggregator.round_log import ROUND_LOG, append_round_record, read_round_log_or_empty
from fleetlearn.edge_runtime.core.errors import ProtocolError, UsageError
from fleetlearn.edge_runtime.core.files import atomic_write_bytes, atomic_write_json, read_json
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


class ModelStore:
    """Versioned global model of one run. Not thread-safe: the round engine's thread owns it."""

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
        self.round = round_  # last completed round; 0 before round 1 closes
        self.weights = weights
        self.server_state: dict[str, Any] = server_state or {}  # the strategy's state_dict() at that commit
        self._doc = doc

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
        """device -> nonce of the updates counted in the last closed round (for late re-sends)."""
        return dict(self._doc.get("last_accepted") or {})

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
        store._write_weights(0, weights)
        store._write_state(0, weights, None, {})
        return store

    def _repair(self) -> None:
        """Finish a commit a crash interrupted: log the committed round, drop a stale partial."""
        rec = self.last_record
        if rec and self.round > 0:
            try:
                record = RoundMetrics.from_doc(rec)
            except ProtocolError as exc:
                raise StateError(f"{self.state_path}: the last round's record is malformed ({exc.reason})") from None
            if not any(
                r.round == self.round and r.run_id == record.run_id for r in read_round_log_or_empty(self.rounds_log).records
            ):
                append_round_record(self.rounds_log, record)
        p = self.load_partial(None)
        if p is not None and (p.run_id != self.run_id or p.round <= self.round):
            self.clear_partial()

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

    def _write_weights(self, rnd: int, weights: np.ndarray) -> bytes:
        raw = np.ascontiguousarray(weights, dtype="<f4").tobytes()
        atomic_write_bytes(self.weights_path(rnd), raw)
        return raw

    def _write_server_state(self, rnd: int, state: dict[str, Any]) -> dict[str, Any] | None:
        """Write round `rnd`'s server state (a new file); its entry for state.json, None if empty."""
        if not state:
            return None
        raw = encode_server_state(self.run_id, rnd, state)
        path = self.server_state_path(rnd)
        atomic_write_bytes(path, raw)
        return {"file": str(path.relative_to(self.state_dir)), "sha256": _sha256(raw)}

    def _write_state(
        self,
        rnd: int,
        weights: np.ndarray,
        record: dict[str, Any] | None,
        accepted: dict[str, str],
        server: dict[str, Any] | None = None,
    ) -> None:
        raw = np.ascontiguousarray(weights, dtype="<f4").tobytes()
        doc = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "run_id": self.run_id,
            "model_hash": self.model_hash,
            "num_params": self.num_params,
            "round": rnd,
            "weights_file": str(self.weights_path(rnd).relative_to(self.state_dir)),
            "weights_sha256": _sha256(raw),
            "last_record": record,
            "last_accepted": accepted,
            "server_state": server,
            "created": self._doc.get("created", time.time()),
            "updated": time.time(),
        }
        atomic_write_json(self.state_path, doc)
        self._doc = doc

    def commit(
        self,
        rnd: int,
        weights: np.ndarray,
        record: RoundMetrics | dict[str, Any],
        accepted: dict[str, str],
        server_state: dict[str, Any] | None = None,
    ) -> None:
        """Round `rnd` closed with `weights` (and the strategy's cross-round `server_state` after
        it): make them durable together (see the module docstring for the order).

        `record` is checked as a RoundMetrics (a dict is converted) before anything is written:
        rounds.jsonl holds only what the protocol says a round record is."""
        if not isinstance(record, RoundMetrics):
            record = RoundMetrics.from_doc(record)
        if rnd != self.open_round:
            raise ValueError(f"commit of round {rnd} while round {self.open_round} is open")
        weights = np.ascontiguousarray(weights, dtype=np.float32)
        if weights.shape != (self.num_params,):
            raise ValueError(f"new weights have shape {weights.shape}")
        self._write_weights(rnd, weights)
        server = self._write_server_state(rnd, dict(server_state or {}))
        self._write_state(rnd, weights, record.to_doc(), dict(accepted), server)
        append_round_record(self.rounds_log, record)
        self.clear_partial()
        self.round = rnd
        self.weights = weights
        self.server_state = dict(server_state or {})

    # ------------------------------------------------------------ partial round

    def save_partial(self, partial: PartialRound) -> None:
        atomic_write_bytes(self.partial_path, encode_partial(partial))

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
        try:
            self.partial_path.unlink()
        except FileNotFoundError:
            pass


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
