"""Structured logs on stdlib ``logging``: ``text`` (human) or ``json`` (one object per line).

Lines logged while an event loop runs are written in one batch at the end of the loop's
current turn (one write and flush per turn, not one per line): under load the access log then
costs one system call for many requests; at rest each line is out within the turn it was logged.

Fields passed with ``extra=`` (the access log's method, path, status, key name, key
fingerprint, ...) become JSON members, or ``k=v`` pairs in text. The access log may skip the
record: when ``direct_handler`` finds this module's setup and nothing else on the way, the
formatter's ``access_line`` writes what ``format`` would and ``emit_access`` queues it.

Nothing in the proxy logs a key value or a virtual key: keys are named by PoolKey name and
fingerprint.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import IO, Any

__all__ = [
    "STANDARD_ATTRIBUTES",
    "BatchingHandler",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "direct_handler",
]

_STANDARD = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None)).keys()
    | {"message", "asctime", "taskName"}
)


# What a record's attributes are named (and so what an ``extra`` field may not be named).
STANDARD_ATTRIBUTES = _STANDARD

_INFO = logging.INFO
_ACCESS = "sideproxy.access"


# "000" to "999": a table is a third of what f"{ms:03d}" costs.
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))


def _millis(created: float, second: int) -> str:
    """``f"{int(record.msecs):03d}"`` for a record made at ``created`` (``second`` its int)."""
    ms = int((created - second) * 1000.0)
    return _MILLIS[ms] if 0 <= ms < 1000 else f"{ms:03d}"


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
        self._heads: dict[tuple[str, str], str] = {}

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

    def access_line(
        self, created: float, levelname: str, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        """What ``format`` makes of a record with these attributes, ``fields`` as its extras
        (none of them named like a standard attribute), no args and no exception.

        The common case (str, int, finite float, bool or None values; keys that are strings and
        not ``ts``/``level``/``logger``/``msg``) is spelled out here the way the C encoder
        writes it, for a third of ``json.dumps``' cost; anything else goes to ``json.dumps``.
        """
        second = int(created)
        ts = f"{self._stamp(second)}.{_millis(created, second)}Z"
        head = self._heads.get((levelname, name))
        if head is None:
            head = f'", "level": {_quote(levelname.lower())}, "logger": {_quote(name)}, "msg": '
            if len(self._heads) < 16:
                self._heads[(levelname, name)] = head
        parts = [f'{{"ts": "{ts}{head}{_quote(message)}']
        keys = _JSON_KEYS
        for k, v in fields.items():
            kind = type(v)
            if kind is str:
                text = _quote(v)
            elif v is None:
                continue
            elif kind is int:
                text = _int_repr(v)
            elif kind is float and _NEG_INF < v < _INF:
                text = _float_repr(v)
            elif kind is bool:
                text = "true" if v else "false"
            else:
                return self._access_body(ts, levelname, name, message, fields)
            key = keys.get(k)
            if key is None:
                if type(k) is not str or k in _JSON_HEAD:
                    return self._access_body(ts, levelname, name, message, fields)
                key = f", {_quote(k)}: "
                if len(keys) < 256:
                    keys[k] = key
            parts.append(key)
            parts.append(text)
        parts.append("}")
        return "".join(parts)

    @staticmethod
    def _access_body(
        ts: str, levelname: str, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        body: dict[str, Any] = {
            "ts": ts,
            "level": levelname.lower(),
            "logger": name,
            "msg": message,
        }
        body.update({k: v for k, v in fields.items() if v is not None})
        return json.dumps(body, default=str, ensure_ascii=False)


# The JSON access line's own pieces (``JsonFormatter.access_line``).
_quote = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) quotes with
_int_repr = int.__repr__
_float_repr = float.__repr__
_INF = float("inf")
_NEG_INF = -_INF
_JSON_HEAD = frozenset(("ts", "level", "logger", "msg"))
_JSON_KEYS: dict[str, str] = {}  # a field's name, quoted, between ", " and ": "


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self._second = -1
        self._stamp = ""
        self._heads: dict[tuple[str, str], str] = {}

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        # strftime once per second, not once per line (the logging default's format).
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"

    def access_line(
        self, created: float, levelname: str, name: str, message: str, fields: dict[str, Any]
    ) -> str:
        """What ``format`` makes of a record with these attributes, ``fields`` as its extras
        (none of them named like a standard attribute), no args and no exception."""
        second = int(created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        head = self._heads.get((levelname, name))
        if head is None:  # "%(levelname)-7s %(name)s: "
            head = f" {levelname:<7} {name}: "
            if len(self._heads) < 16:
                self._heads[(levelname, name)] = head
        line = f"{self._stamp},{_millis(created, second)}{head}{message}"
        if name == _ACCESS:
            return line
        extras = [f"{k}={v}" for k, v in fields.items() if v is not None]
        return f"{line} {' '.join(extras)}" if extras else line

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.name == _ACCESS:
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
        self._add(line)

    def emit_access(
        self, created: float, levelname: str, name: str, message: str, fields: dict[str, Any]
    ) -> bool:
        """What ``handle`` does with an access record, without making one: the formatter's
        ``access_line`` (only for the handler ``direct_handler`` returned). False, having done
        nothing, if the formatter raised: the caller then takes the record path, whose
        ``handleError`` reports it."""
        with self.lock or _NO_LOCK:
            try:
                line = self.formatter.access_line(  # type: ignore[union-attr]
                    created, levelname, name, message, fields
                )
            except Exception:
                return False
            self._add(line)
        return True

    def _add(self, line: str) -> None:
        self._pending.append(line)
        if self._scheduled:
            return
        loop = asyncio._get_running_loop()  # None, not an exception, without one
        if loop is None:
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

_ACCESS_FORMATTERS = (TextFormatter, JsonFormatter)


def direct_handler(logger: logging.Logger) -> BatchingHandler | None:
    """The one handler an INFO record of ``logger`` would reach, if handing it the line with
    ``emit_access`` cannot change what anyone sees; else None (use ``logger.handle``).

    That is: ``logger`` is enabled for INFO and has no filters; it and every logger between it
    and the root have no handlers and propagate; the root has no filters (logging does not ask
    them about a child's records, but a filter there is a sign someone watches) and exactly one
    handler, our ``BatchingHandler`` (not a subclass) with no filters, a level that lets INFO
    through and our own text or JSON formatter. pytest's ``caplog``, a user's handler or filter,
    a different formatter: any of them means None. logging tells no one when this changes, so
    this is cheap enough to ask on every line (well under a microsecond).
    """
    if logger.filters or logger.disabled or not logger.isEnabledFor(_INFO):
        return None
    current = logger
    while not current.handlers:
        if not current.propagate or current.parent is None:
            return None
        current = current.parent
    if current is not logging.root or current.filters or len(current.handlers) != 1:
        return None
    handler = current.handlers[0]
    if (
        type(handler) is not BatchingHandler
        or handler.filters
        or handler.level > _INFO
        or type(handler.formatter) not in _ACCESS_FORMATTERS
    ):
        return None
    return handler


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
