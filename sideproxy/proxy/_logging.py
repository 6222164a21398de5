"""Structured logs on stdlib ``logging``: ``text`` (human) or ``json`` (one object per line).

Lines logged while an event loop runs are written in one batch at the end of the loop's
current turn (one write and flush per turn, not one per line): under load the access log then
costs one system call for many requests; at rest each line is out within the turn it was logged.

Fields passed with ``extra=`` (the access log's method, path, status, key name, key
fingerprint, ...) become JSON members, or ``k=v`` pairs in text. Nothing in the proxy logs a key
value or a virtual key: keys are named by PoolKey name and fingerprint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import IO, Any

__all__ = ["BatchingHandler", "JsonFormatter", "TextFormatter", "configure_logging"]

_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and v is not None}


class _Stamps:
    """The formatted second of a timestamp, cached: a busy proxy logs many lines per second,
    and strftime + localtime/gmtime is the dearest part of formatting one."""

    __slots__ = ("_convert", "_fmt", "_second", "_text")

    def __init__(self, fmt: str, convert: Any) -> None:
        self._fmt = fmt
        self._convert = convert
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._text = time.strftime(self._fmt, self._convert(second))
            self._second = second
        return self._text


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._stamp = _Stamps("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        stamp = self._stamp(record.created)
        body: dict[str, Any] = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        body.update(_extras(record))
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # strftime once per second, not once per line (the logging default's format).
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.name == "sideproxy.access":
            return line  # the message already says it all; keep access lines short
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A ``StreamHandler`` that writes what one event-loop turn logged in one batch (module
    docstring). Without a running loop (startup, threads, shutdown) it writes at once."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()
            return
        self._scheduled = True
        loop.call_soon(self._write_locked)

    def _write_locked(self) -> None:
        with self.lock or _NO_LOCK:
            self._write()

    def _write(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:  # noqa: S110 - a log write must never break a request
            pass

    def flush(self) -> None:
        with self.lock or _NO_LOCK:
            self._write()


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


_NO_LOCK = _NoLock()


def configure_logging(
    fmt: str = "text", level: str | int = "INFO", stream: IO[str] | None = None
) -> None:
    """Route all logs (ours, aiohttp's) through one handler on the root logger."""
    if fmt not in ("text", "json"):
        raise ValueError("log format must be 'text' or 'json'")
    handler = BatchingHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    # Logging HOWTO, "Optimization": no caller lookup, no thread/process fields (no format here
    # uses them). This is process-wide, so only the CLI's setup does it, not an import.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # aiohttp's own access logger is off (handler_args); its server errors still come through.
