"""The access log: one line per request through stdlib logging, at a fraction of its cost.

``Logger.info(msg, *args, extra=...)`` builds a ``LogRecord`` field by field, merges ``extra``
key by key and formats the message with ``%``; the record then passes the logger's filters and
``callHandlers``, the handler's lock and filters, and the formatter. Together that is most of
what a proxied request costs the proxy outside the network.

Two paths, the same bytes out:

- Direct: in the setup ``configure_logging`` makes (one ``BatchingHandler`` on the root, our
  text or JSON formatter, no filters, no other handler anywhere on the way), the formatter
  makes the line from the time, the message and the fields, and the handler queues it: no
  record at all. ``direct_handler`` says whether that is the case, asked on every line, since
  logging tells no one when its handlers or filters change.
- Record: otherwise (pytest's ``caplog``, a user's handler, filter or formatter) a
  ``LogRecord`` is made as a copy of a per-process template (the fields that do not change:
  logger name, level, file, thread, process) with the few that do set directly, and goes through
  ``Logger.handle`` like any record, so everyone sees an ordinary record.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from sideproxy.proxy._logging import STANDARD_ATTRIBUTES, direct_handler

__all__ = ["AccessLog"]

_INFO = logging.INFO
# What LogRecord measures relativeCreated from (logging's own import time).
_START: float = logging._startTime  # type: ignore[attr-defined]

# Every AccessLog, so a forked child drops its parent's template (pid, thread) without asking
# os.getpid() on every line.
_LIVE: weakref.WeakSet[AccessLog] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for log in list(_LIVE):
        log._template = None


os.register_at_fork(after_in_child=_after_fork_in_child)


class AccessLog:
    """``write`` one request's line to the ``sideproxy.access`` logger, if it is enabled."""

    __slots__ = ("__weakref__", "_clock", "_levelname", "_logger", "_name", "_template")

    def __init__(
        self, logger: logging.Logger | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self._logger = logger or logging.getLogger("sideproxy.access")
        self._clock = clock
        self._template: dict[str, Any] | None = None
        self._name = self._logger.name
        self._levelname = logging.getLevelName(_INFO)
        _LIVE.add(self)

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(_INFO)

    def _base(self) -> dict[str, Any]:
        # Once per process (the fork hook clears it): this process's pid and first thread.
        record = logging.LogRecord(self._name, _INFO, "(access)", 0, "", None, None)
        self._template = template = dict(vars(record))
        self._levelname = template["levelname"]
        return template

    def write(self, fields: dict[str, Any], message: str) -> None:
        """``fields`` become record attributes (JSON members); ``message`` is the text line."""
        now = self._clock()
        handler = direct_handler(self._logger)
        if (
            handler is not None
            and STANDARD_ATTRIBUTES.isdisjoint(fields)
            and handler.emit_access(now, self._levelname, self._name, message, fields)
        ):
            return
        template = self._template
        if template is None:
            template = self._base()
        record = logging.LogRecord.__new__(logging.LogRecord)
        attrs = record.__dict__
        attrs.update(template)
        attrs["created"] = now
        attrs["msecs"] = (now - int(now)) * 1000.0
        attrs["relativeCreated"] = (now - _START) * 1000.0
        attrs["msg"] = message
        attrs.update(fields)
        self._logger.handle(record)
