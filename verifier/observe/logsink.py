"""Where log lines go: JSON lines (`JsonFormatter`) through a buffered stderr handler (`BufferedStderrHandler`).

Apart from `verifier.observe.audit` (which writes the audit line and configures logging with these), so that the
audit line's module holds no subclass of logging's classes: the hot path compiled with mypyc (`bench/native.py`)
compiles that module, and a compiled subclass of logging's `Handler` crashed the interpreter at exit.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

_STANDARD = set(vars(logging.makeLogRecord({})).keys()) | {"message", "asctime"}

# One line is one record to whatever reads stderr: Docker and containerd (max_container_log_line_size) split a
# line past 16 KiB into pieces that are not JSON. A value is the sender's choice more often than not (a forged
# token's iss and kid, the client's path), and written as `\uXXXX` escapes it grows up to twelvefold: a line that
# would pass the bound has its long values cut to CUT_CHARS (marked "…") and says `"truncated": true`.
MAX_LINE_BYTES = 16 * 1024  # the newline included; every line is ASCII (json.dumps escapes the rest)
CUT_CHARS = 200  # characters kept of a long value in a line past the bound
EXC_TAIL_CHARS = 8 * 1024  # of a traceback past the bound: its end (the innermost frames, the exception)
_ELLIPSIS = "\u2026"


def cut(value: str) -> str:
    """`value` cut to CUT_CHARS characters, marked with an ellipsis; as it is when short enough."""
    return value if len(value) <= CUT_CHARS else value[:CUT_CHARS] + _ELLIPSIS


def cut_any(value: Any) -> Any:
    """`value` with its long strings cut (`cut`) and its lists and mappings cut to CUT_CHARS items, nested ones too."""
    if isinstance(value, str):
        return cut(value)
    if isinstance(value, list | tuple):
        return [cut_any(v) for v in value[:CUT_CHARS]]
    if isinstance(value, dict):
        return {cut(str(k)): cut_any(v) for k, v in list(value.items())[:CUT_CHARS]}
    return value


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Formats a record as JSON."""
        fields = record.__dict__.get("_json_fields")
        if fields is not None:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            return (
                f'{{"time": "{stamp}.{int(record.msecs):03d}Z", "level": "{record.levelname}", '
                f'"logger": "{record.name}", "msg": "{record.getMessage()}", {fields}}}'
            )
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        line = json.dumps(out, default=str)
        if len(line) < MAX_LINE_BYTES:
            return line
        return _bounded(out)


_KEPT = ("time", "level", "logger", "msg", "event")


def _bounded(out: dict[str, Any]) -> str:
    """The line of a record whose line would pass MAX_LINE_BYTES: its long values cut; lists and mappings that
    still do not fit left out, then every field but the record's own; a traceback's end in the room left (room
    for its field and its "…" mark is kept from the start: the mark alone must not take the line past the bound)."""
    exc = out.pop("exc", None)
    limit = MAX_LINE_BYTES - (len(_EXC_FIELD) if isinstance(exc, str) else 0)
    cut_out = {k: v if k in _KEPT[:3] else cut_any(v) for k, v in out.items()}
    cut_out["truncated"] = True
    line = json.dumps(cut_out, default=str)
    if len(line) >= limit:
        cut_out = {k: _ELLIPSIS if isinstance(v, list | dict) else v for k, v in cut_out.items()}
        line = json.dumps(cut_out, default=str)
    if len(line) >= limit:
        cut_out = {k: v for k, v in cut_out.items() if k in _KEPT or k == "truncated"}
        line = json.dumps(cut_out, default=str)
    if isinstance(exc, str):
        room = limit - 1 - len(line)  # characters left for the traceback's end, escaped
        tail = exc[-min(room, EXC_TAIL_CHARS) :] if room > 0 else ""
        while tail and len(json.dumps(tail)) - 2 > room:  # escapes take up to 12 characters each
            tail = tail[max(len(tail) // 2, 1) :]  # a last character whose escape passes the room: none left
        cut_out["exc"] = _ELLIPSIS + tail
        line = json.dumps(cut_out, default=str)
    return line


_EXC_FIELD = ', "exc": "\\u2026"'  # what a traceback's field adds to a line before the traceback's end


FLUSH_INTERVAL_SECONDS = 0.2  # audit lines reach stderr at most this late (or when 64 KiB are waiting)
LOG_BUFFER_BYTES = 64 * 1024
MAX_PENDING_LINES = 256  # audit lines kept unformatted (their values) before they are formatted in one batch


class BufferedStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """JSON lines to stderr through a 64 KiB buffer, flushed at least every 0.2 s.

    A plain StreamHandler flushes (one write syscall) per line; with an audit line per signature
    check that syscall costs more than the check's own parsing. Lines at WARNING and above are
    flushed at once, and `flush_now()` runs on shutdown.

    The audit line's values can be handed over unformatted (`defer`): they wait
    in a list of at most `MAX_PENDING_LINES` and are formatted in one batch (`format_deferred(pending)` returns
    their lines) when the list is full, when the flush interval has passed, before any other line is written
    (so the lines keep their order) and on `flush_now()`.
    """

    def __init__(self, format_deferred: Callable[[list[Any]], str]) -> None:
        super().__init__(open(sys.stderr.fileno(), "w", buffering=LOG_BUFFER_BYTES, closefd=False))  # noqa: SIM115
        self._last_flush = time.monotonic()
        self._format_deferred = format_deferred
        self._pending: list[Any] = []

    def flush(self) -> None:
        """Flushes when the interval has passed; otherwise the buffer keeps the line."""
        now = time.monotonic()
        if now - self._last_flush >= FLUSH_INTERVAL_SECONDS:
            self.flush_now(now)

    def flush_now(self, now: float | None = None) -> None:
        """Writes out whatever is buffered (the pending audit lines formatted first)."""
        self._last_flush = now if now is not None else time.monotonic()
        if self._pending:
            self._write_pending()
        super().flush()

    def defer(self, values: Any) -> None:
        """Keeps one audit line's values (the audit fast path) to be formatted with the next batch."""
        pending = self._pending
        pending.append(values)
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL_SECONDS:
            self.flush_now()
        elif len(pending) >= MAX_PENDING_LINES:
            self._write_pending()

    def _write_pending(self) -> None:
        """Formats the pending audit lines into the buffer, in the order they came."""
        with self.lock:  # type: ignore[union-attr]  # a record from another thread may write them meanwhile
            pending = self._pending  # the same list throughout: a line added meanwhile stays for the next batch
            batch = pending[:]
            del pending[: len(batch)]
            self.stream.write(self._format_deferred(batch))

    def write_line(self, line: str) -> None:
        """Appends one preformatted line (same buffer, same flushing; after the pending ones)."""
        if self._pending:
            self._write_pending()
        self.stream.write(line + "\n")
        if time.monotonic() - self._last_flush >= FLUSH_INTERVAL_SECONDS:
            self.flush_now()

    def emit(self, record: logging.LogRecord) -> None:
        """Writes a line (after the pending audit lines); urgent lines go out at once."""
        if self._pending:
            try:
                self._write_pending()
            except Exception:
                self.handleError(record)
        super().emit(record)
        if record.levelno >= logging.WARNING:
            self.flush_now()
