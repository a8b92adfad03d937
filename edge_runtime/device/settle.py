"""How a device's update is settled: acknowledged, refused, overtaken by a newer round, or
undone because the aggregator went back to an earlier round.

`RoundSettling` is a mixin of `agent.DeviceAgent`, kept in its own file so each file has one job;
the attributes it uses are the agent's, declared below for the type checker.

The aggregator publishes round r+1's global model before round r's commit is durable, and acks
round r's updates after it (aggregator/commit_writer.py). So, normally:

  - the next global model arrives before our ack: the update is settled quietly (the round
    moved on; nothing to say, and training starts at once), and the ack, when it comes, is
    still logged (`update_acknowledged`) and remembered (`acked_round`);
  - if the aggregator is killed in that window, it restarts from its last durable round and
    announces an earlier round than one we already saw (`seen_round`). Then the round went back:
    an update of a later round is dropped (nothing of it was acknowledged: the aggregator acks
    nothing of round r+1 before round r is durable), and we train the announced round again,
    unless the aggregator acknowledged our update of it (it holds that one durably).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from fleetlearn.edge_runtime.core.protocol import Ack, GlobalModel, LeaseView, RoundState
from fleetlearn.edge_runtime.device.eligibility import EligibilityGate
from fleetlearn.edge_runtime.device.state import DeviceState, clear_pending_update
from fleetlearn.edge_runtime.device.wire import DeviceWire


class RoundSettling:
    state: DeviceState
    state_dir: Path
    wire: DeviceWire
    gate: EligibilityGate
    cfg: Any
    leader: LeaseView
    rounds_done: int
    _unsettled: dict[tuple[str, int, str], None]  # (run, round, nonce) of updates settled before their ack came

    # The agent's (agent.DeviceAgent overrides both).
    def _log(self, level: int, event: str, round_: int | None = None, **fields: Any) -> None:
        raise NotImplementedError

    def _status(self, state: str, round_: int | None = None, detail: str = "", force: bool = False) -> None:
        raise NotImplementedError

    def _on_ack(self, payload: bytes) -> None:
        ack = Ack.decode(payload)
        s = self.state
        if ack.device_id != self.cfg.device_id or ack.run_id != s.run_id:
            return
        if (ack.round, ack.nonce) != (s.pending_round, s.pending_nonce):
            if ack.accepted and self._unsettled.pop((ack.run_id, ack.round, ack.nonce), 0) is None:
                # The ack of an update the next round already settled (the aggregator acks after
                # its commit is durable, which is after it published that next round).
                self._log(logging.INFO, "update_acknowledged", ack.round, note=ack.reason or "after the next round opened")
                s.acked_round = max(s.acked_round, ack.round)
            return  # else: an ack for an update we no longer hold (already settled)
        if ack.accepted:
            self._log(logging.INFO, "update_acknowledged", ack.round, note=ack.reason)
            s.acked_round = max(s.acked_round, ack.round)
        else:
            self._log(logging.WARNING, "update_refused", ack.round, reason=ack.reason)
            self.wire.refused(s.pending_nonce)  # not applied: its values go back into the residual
        self._finish_round(ack.round, "")

    def _on_round(self, payload: bytes) -> None:
        if not payload:
            return
        rs = RoundState.decode(payload)
        if rs.run_id != self.state.run_id or not self.leader.allows(rs.run_id):
            return
        if rs.state in ("closed", "finished", "failed"):
            self.gate.drop_until(rs.round)
        if rs.state in ("closed", "finished", "failed") and self.state.pending_round and self.state.pending_round <= rs.round:
            self._finish_round(self.state.pending_round, f"round {rs.state} before our update was acknowledged")

    def _finish_round(self, round_: int, why: str, quiet: bool = False) -> None:
        """Our update of `round_` is settled. `quiet`: a newer round opened and training follows
        at once, so no warning, no `idle` status and no state write here (the pending update's
        write after training carries the state)."""
        s = self.state
        if why:
            self._log(logging.WARNING, "update_dropped", round_, reason=why)
        if quiet:
            self._unsettled[(s.run_id, round_, s.pending_nonce)] = None
            if len(self._unsettled) > 16:  # acks come at most a few commit groups late
                del self._unsettled[next(iter(self._unsettled))]
        self.wire.feedback.settle(s.pending_nonce)  # before the pending update goes (feedback.py)
        clear_pending_update(self.state_dir)
        s.pending_round, s.pending_nonce, s.pending_base = 0, "", 0
        s.last_round = max(s.last_round, round_)
        if not quiet:
            s.save(self.state_dir)
        self._count_round(round_)
        if not quiet:
            self._status("idle", round_)

    def _count_round(self, round_: int) -> None:
        """--max-rounds counts rounds, not settlements: a round trained again after the aggregator
        went back counts once."""
        self._rounds_counted.add((self.state.run_id, round_))
        self.rounds_done = len(self._rounds_counted)

    _rounds_counted: set[tuple[str, int]]

    def _went_back(self, g: GlobalModel) -> None:
        """The aggregator announced round g.round after we saw a later one: it restarted from its
        last durable round. Undo what depended on the lost rounds (see the module docstring)."""
        s = self.state
        self._log(
            logging.WARNING,
            "round_went_back",
            g.round,
            seen=s.seen_round,
            reason="the aggregator restarted before its later rounds were durable; they are trained again",
        )
        if s.pending_round > g.round:
            # Never acknowledged (see above), trained on a global model the aggregator no longer has.
            self.wire.refused(s.pending_nonce)  # with error feedback its values go back into the residual
            clear_pending_update(self.state_dir)
            s.pending_round, s.pending_nonce, s.pending_base = 0, "", 0
        # The rounds after g.round are to come again; g.round itself too, unless our update of it
        # was acknowledged (the aggregator holds it durably and resumes the round with it).
        s.last_round = min(s.last_round, g.round if s.acked_round >= g.round else g.round - 1)
        s.seen_round = g.round
        s.save(self.state_dir)
