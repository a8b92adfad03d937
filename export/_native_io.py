"""Keep native chatter off the user's terminal while torch.onnx and ORT build graphs.

`onnxruntime.set_default_logger_severity(3)` does not reach every logger: the graph optimisation
that `generate_artifacts` runs (`get_optimized_model` with a default `SessionOptions`) logs each
GraphTransformer at INFO straight to the C++ stderr, and torch's exporter dumps its IR graph on
failure. Those writes bypass `sys.stderr`, so we point file descriptors 1 and 2 at a temporary
file around the call.

The redirection is process-wide, so anything else written meanwhile (another thread's logging,
a print in the model's forward) lands there too. On success we therefore replay every captured
line except ORT's own log lines; on failure we drop it all, because the exception carries the
reason and the caller reports it as one line.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# "2026-01-01 10:00:00.123 [I:onnxruntime:Default, graph_transformer.cc:15 Apply] ...", possibly
# wrapped in ANSI colour codes.
_ORT_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\S+ \S+ \[[VIWEF]:onnxruntime")


@dataclass
class Captured:
    text: str = ""


@contextmanager
def quiet_native_output() -> Iterator[Captured]:
    """Redirect fds 1 and 2 (and silence Python warnings) for the duration of the block."""
    captured = Captured()
    _flush_all()
    try:
        saved = (os.dup(1), os.dup(2))
    except OSError:  # no stdout/stderr to protect (closed descriptors): nothing to do
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield captured
        return
    ok = False
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's legacy-exporter DeprecationWarning and friends
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield captured
            ok = True
        finally:
            _flush_all()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", errors="replace")
    if ok:
        rest = [ln for ln in captured.text.splitlines(keepends=True) if not _ORT_LOG_LINE.match(ln)]
        if rest:
            sys.stderr.write("".join(rest))
            _flush_all()


def _flush_all() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
