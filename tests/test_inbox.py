"""The engine's inbox (aggregator/inbox.py): batches in arrival order, control events first,
and a backlog bounded by bytes (the network thread waits, the engine never does)."""

from __future__ import annotations

import threading
import time

from fleetlearn.aggregator.inbox import Inbox


def test_batches_keep_arrival_order_and_control_events_jump_the_queue():
    box = Inbox(max_bytes=1 << 20)
    for i in range(5):
        box.put("message", f"t/{i}", bytes(10))
    box.put_control("durable", seq=7)
    first = box.take(0.0, 3)
    assert [(e.kind, e.seq) for e in first[:1]] == [("durable", 7)]
    assert [e.topic for e in first[1:]] + [e.topic for e in box.take(0.0, 10)] == [f"t/{i}" for i in range(5)]
    assert box.take(0.0, 10) == [] and box.empty() and box.backlog_bytes == 0
    t0 = time.monotonic()
    assert box.take(0.2, 10) == [] and time.monotonic() - t0 >= 0.19  # waits for the first event


def test_the_backlog_is_bounded_by_bytes_until_closed():
    box = Inbox(max_bytes=1000)
    box.put("message", "a", bytes(600))
    done = threading.Event()

    def network_thread() -> None:
        box.put("message", "b", bytes(600))  # over the bound: waits for the engine
        done.set()

    threading.Thread(target=network_thread, daemon=True).start()
    assert not done.wait(0.3), "a put over the bound went through"
    box.put_control("durable", seq=1)  # the engine's own events never wait
    assert [e.topic for e in box.take(0.0, 2)] == ["", "a"]
    assert done.wait(2), "taking the backlog did not release the waiting put"
    assert box.backlog_bytes == 600 and [e.topic for e in box.take(0.0, 5)] == ["b"]
    box.put("message", "c", bytes(5000))  # larger than the bound, but the backlog is empty: goes through
    late = threading.Event()
    threading.Thread(target=lambda: (box.put("message", "d", bytes(600)), late.set()), daemon=True).start()
    assert not late.wait(0.2)
    box.close()
    assert late.wait(2), "close() did not release a waiting put"
