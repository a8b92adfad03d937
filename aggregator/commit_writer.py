"""The durable writes off the round engine's critical path: one thread that writes, in order,
the closed rounds' commits and the open round's partial accumulator, while the engine goes on.

    writer = CommitWriter(store, notify=lambda: queue.put(("durable", "", b"")))
    job = writer.commit(pending, payload)        # a closed round (ModelStore.advance), then its acks
    job = writer.partial(rnd, snapshot, payload) # a PartialRound (a copy), then its acks
    for job in writer.done(): ...                # finished jobs, in submission order (engine thread)
    writer.wait_idle(timeout); writer.close()

Why: a durable commit costs several fsyncs (6.8-9.5 ms per round measured here), and an fsync
on the engine's thread stops everything behind it: the next round's global model, the updates
arriving. Here the engine publishes round r+1's global model as soon as round r is aggregated,
and this thread makes round r durable while the devices train. What keeps an acknowledged
update safe is the order, not the timing: the jobs run one after another in submission order,
and the engine publishes a job's acks only once the job is done (`done()`), so

  - an update's ack goes out after the write that holds it is durable (as before), and
  - no update of round r+1 is acknowledged before round r's commit is durable (its partial
    is written after that commit).

Jobs that queued up while the thread was writing are written as one group: consecutive commits
share one state.json write and one rounds.jsonl append (ModelStore.write_commits), and a
partial that a later job of its round supersedes (a newer partial, or the round's commit) is
not written at all: the later write holds everything it held.

A failed write (disk full, ...) fails its job and every job after it; the engine raises the
error when it sees the first failed job, so no ack that depends on it goes out.

Test hook: FLEETLEARN_TEST_COMMIT_DELAY_S (seconds, default 0) makes the thread wait that long
before each group holding a round commit, so a fault test can SIGKILL the aggregator in the
window between round r+1's global model and round r's commit (tests/test_faults_commit.py).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetlearn.aggregator.model_store import ModelStore, PendingCommit
from fleetlearn.aggregator.partial_round import PartialRound, encode_partial

DELAY_ENV = "FLEETLEARN_TEST_COMMIT_DELAY_S"


@dataclass(eq=False)
class Job:
    kind: str  # "commit" | "partial"
    round: int
    payload: Any  # the engine's: what to publish once the job is durable
    pending: PendingCommit | None = None
    snapshot: PartialRound | None = None  # encoded on the writer thread (and only if not superseded)
    error: BaseException | None = None


class CommitWriter:
    def __init__(self, store: ModelStore, notify: Callable[[], None], delay_s: float | None = None):
        self.store = store
        self.notify = notify  # called on the writer thread after jobs finished (the engine's queue.put)
        self.delay_s = float(os.environ.get(DELAY_ENV) or 0.0) if delay_s is None else delay_s
        self._cond = threading.Condition()
        self._todo: list[Job] = []
        self._done: list[Job] = []
        self._busy = False
        self._closed = False
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="commit-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ engine thread

    def commit(self, pending: PendingCommit, payload: Any) -> Job:
        return self._submit(Job("commit", pending.round, payload, pending=pending))

    def partial(self, rnd: int, snapshot: PartialRound, payload: Any) -> Job:
        """`snapshot` must be a copy the engine no longer changes (intake.Intake._partial)."""
        return self._submit(Job("partial", rnd, payload, snapshot=snapshot))

    def _submit(self, job: Job) -> Job:
        with self._cond:
            if self._closed:
                raise RuntimeError("the commit writer is closed")
            self._todo.append(job)
            self._cond.notify_all()
        return job

    def done(self) -> list[Job]:
        """The jobs finished since the last call, in submission order."""
        with self._cond:
            out, self._done = self._done, []
        return out

    def commits_in_flight(self) -> int:
        with self._cond:
            return sum(j.kind == "commit" for j in self._todo) + (1 if self._busy else 0)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every submitted job is finished (done() then returns them)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._todo or self._busy:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def wait_below(self, commits: int) -> None:
        """Block until fewer than `commits` round commits are queued or being written."""
        with self._cond:
            while sum(j.kind == "commit" for j in self._todo) + (1 if self._busy else 0) >= commits:
                self._cond.wait()

    def close(self, timeout: float = 30.0) -> None:
        """Finish what was submitted, then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ------------------------------------------------------------ writer thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._closed:
                    self._cond.wait()
                if not self._todo:
                    return
                group, self._todo, self._busy = self._todo, [], True
            try:
                self._write(group)
            except BaseException as exc:  # noqa: BLE001 - handed to the engine, which raises it
                self._failed = exc
            with self._cond:
                for job in group:
                    job.error = self._failed
                self._done.extend(group)
                self._busy = False
                self._cond.notify_all()
            self.notify()

    def _write(self, group: list[Job]) -> None:
        if self._failed is not None:
            raise self._failed  # nothing after a failed write may look durable
        if self.delay_s > 0 and any(j.kind == "commit" for j in group):
            time.sleep(self.delay_s)
        commits: list[PendingCommit] = []
        for i, job in enumerate(group):
            if job.kind == "commit":
                assert job.pending is not None
                commits.append(job.pending)
                continue
            if any(later.round == job.round for later in group[i + 1 :]):
                continue  # a newer partial of its round, or the round's commit, holds all it held
            self.store.write_commits(commits)  # the rounds before it first
            commits = []
            assert job.snapshot is not None
            self.store.write_partial(job.round, encode_partial(job.snapshot))
        self.store.write_commits(commits)
