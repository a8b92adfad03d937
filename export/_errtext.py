"""Turn exceptions from native code (ORT's C++, torch's exporter) into one readable line."""

from __future__ import annotations

# ORT's C++ messages open with a source location and a full function signature; the reason
# follows one of these markers.
_MARKERS = (" : FAIL : ", " : INVALID_ARGUMENT : ", " : INVALID_GRAPH : ", " : NOT_IMPLEMENTED : ",
            " : RUNTIME_EXCEPTION : ", " was false. ", "[ShapeInferenceError] ", "[TypeInferenceError] ")  # fmt: skip


def one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    for marker in _MARKERS:
        if marker in text:
            head, _, tail = text.rpartition(marker)
            # "<location> <signature> CONDITION was false. " has nothing after the marker: keep the condition.
            text = tail if tail.strip() else head.rsplit(") ", 1)[-1].removeprefix("const ") + marker.rstrip(". ")
            break
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = " ".join(lines[0].split()) if lines else type(exc).__name__
    return line[:limit] + ("..." if len(line) > limit else "")
