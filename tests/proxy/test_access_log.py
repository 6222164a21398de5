"""The access log's direct path: in the setup ``configure_logging`` makes it writes the very bytes
the record path writes, and any other setup (caplog, another handler, a filter, a formatter
that is not ours, a level) takes the record path, so everyone still sees an ordinary record."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sideproxy.proxy import configure_logging
from sideproxy.proxy._access import AccessLog
from sideproxy.proxy._logging import STANDARD_ATTRIBUTES, BatchingHandler, TextFormatter

ACCESS = logging.getLogger("sideproxy.access")
# 2021-03-04 05:06:07.089 UTC: an odd millisecond, and a second the stamp caches do not hold yet.
WHEN = 1614834367.0891

FIELDS: dict[str, Any] = {
    "method": "POST",
    "path": "/v1/chat/completions",
    "status": 200,
    "provider": "groq",
    "key": "groq-0",
    "key_fingerprint": "3f2a9c1e",
    "attempts": 1,
    "route_target": None,
    "duration_ms": 12.5,
}
MESSAGE = "POST /v1/chat/completions 200 12.50ms"


@contextlib.contextmanager
def only_ours(fmt: str = "text") -> Iterator[io.StringIO]:
    """The root logger as ``configure_logging`` leaves it, for the test body only (pytest's own
    handlers are put back after, and the process-wide switches it turns off)."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    switches = (logging._srcfile, logging.logThreads, logging.logProcesses)
    multiprocessing = logging.logMultiprocessing
    stream = io.StringIO()
    configure_logging(fmt, "INFO", stream)
    try:
        yield stream
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging._srcfile, logging.logThreads, logging.logProcesses = switches
        logging.logMultiprocessing = multiprocessing


class Handles:
    """Counts the records the access logger handles (the record path), and can forbid them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, forbid: bool = False) -> None:
        self.count = 0
        real = ACCESS.handle

        def handle(record: logging.LogRecord) -> None:
            self.count += 1
            assert not forbid, "the record path was taken"
            real(record)

        monkeypatch.setitem(vars(ACCESS), "handle", handle)  # undone by deleting it again


def _clock(when: float) -> Callable[[], float]:
    return lambda: when


def _root_handler() -> BatchingHandler:
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, BatchingHandler)
    return handler


def _no_record(record: logging.LogRecord) -> None:
    raise AssertionError("the record path was taken")


def _both_paths(fmt: str, fields: dict[str, Any], message: str, when: float) -> tuple[str, str]:
    """The same line through the direct path and, forced by a filter that passes everything,
    through the record path to the same handler and formatter."""
    log = AccessLog(clock=_clock(when))
    with only_ours(fmt) as stream:
        vars(ACCESS)["handle"] = _no_record  # the first line must not take the record path
        try:
            log.write(fields, message)
        finally:
            del vars(ACCESS)["handle"]
        direct = stream.getvalue()
        passed: list[logging.LogRecord] = []
        ACCESS.addFilter(lambda record: passed.append(record) is None)
        try:
            log.write(fields, message)
        finally:
            ACCESS.filters.clear()
        assert len(passed) == 1  # it did take the record path
        return direct, stream.getvalue()[len(direct) :]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (FIELDS, MESSAGE),
        ({**FIELDS, "key": None, "key_fingerprint": None}, MESSAGE),
        (
            {**FIELDS, "path": '/v1/ünï/cödé/🦜\t"q"\\'},
            'POST /v1/ünï/cödé/🦜\t"q"\\ 200 12.50ms',
        ),
        ({**FIELDS, "status": True, "attempts": 10**30, "duration_ms": 1e-7}, "x"),
        ({**FIELDS, "duration_ms": float("nan"), "other": float("-inf")}, "nan"),
        ({**FIELDS, "tags": ["a", 1], "when": object.__new__(object)}, "not plain"),
        ({**FIELDS, "ts": "mine", "level": "mine too"}, "names the JSON head"),
        ({}, ""),
    ],
)
def test_the_direct_line_is_the_record_line_byte_for_byte(
    fmt: str, fields: dict[str, Any], message: str
) -> None:
    direct, recorded = _both_paths(fmt, fields, message, WHEN)
    assert direct == recorded
    assert direct.endswith("\n")
    assert direct.count("\n") == 1
    if fmt == "json" and "ts" not in fields:
        body = json.loads(direct)
        assert body["ts"] == "2021-03-04T05:06:07.089Z"
        assert (body["level"], body["logger"]) == ("info", "sideproxy.access")
    if fmt == "text":
        assert f" INFO    sideproxy.access: {message}\n" in direct


@settings(max_examples=150, deadline=None)
@given(
    fmt=st.sampled_from(["text", "json"]),
    when=st.floats(min_value=0, max_value=4e9),
    message=st.text(),
    fields=st.dictionaries(
        st.text(min_size=1).filter(lambda k: k not in STANDARD_ATTRIBUTES),
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        max_size=12,
    ),
)
def test_any_fields_any_time_the_same_bytes(
    fmt: str, when: float, message: str, fields: dict[str, Any]
) -> None:
    direct, recorded = _both_paths(fmt, fields, message, when)
    assert direct == recorded


def test_a_logger_not_the_access_one_shows_its_fields_in_text_too() -> None:
    other = logging.getLogger("sideproxy.test.accesslike")
    log = AccessLog(other, clock=_clock(WHEN))
    with only_ours("text") as stream:
        log.write(FIELDS, MESSAGE)
        direct = stream.getvalue()
        other.addFilter(lambda record: True)
        try:
            log.write(FIELDS, MESSAGE)
        finally:
            other.filters.clear()
        assert stream.getvalue() == direct * 2
    assert direct.rstrip("\n").endswith(" attempts=1 duration_ms=12.5")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_logging_alone_takes_the_direct_path(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Handles(monkeypatch, forbid=True)
    with only_ours(fmt) as stream:
        AccessLog(clock=_clock(WHEN)).write(FIELDS, MESSAGE)
    assert MESSAGE in stream.getvalue()


def test_a_field_named_like_a_record_attribute_takes_the_record_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handles = Handles(monkeypatch)
    with only_ours("json") as stream:
        AccessLog(clock=_clock(WHEN)).write({"module": "mine", **FIELDS}, MESSAGE)
    assert handles.count == 1
    assert "mine" not in stream.getvalue()  # a record attribute, as today: not a member


async def test_in_a_running_loop_lines_wait_for_the_end_of_the_turn() -> None:
    log = AccessLog(clock=_clock(WHEN))
    with only_ours("text") as stream:
        log.write(FIELDS, MESSAGE)
        log.write(FIELDS, MESSAGE)
        assert stream.getvalue() == ""
        await asyncio.sleep(0)
        assert stream.getvalue().count(MESSAGE) == 2


def test_caplog_sees_the_record(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles = Handles(monkeypatch)
    with only_ours("text") as stream:
        logging.getLogger().addHandler(caplog.handler)
        AccessLog(clock=_clock(WHEN)).write(FIELDS, MESSAGE)
    assert handles.count == 1
    [record] = [r for r in caplog.records if r.name == "sideproxy.access"]
    assert record.getMessage() == MESSAGE
    assert record.__dict__["key_fingerprint"] == "3f2a9c1e"
    assert record.created == WHEN
    assert MESSAGE in stream.getvalue()  # and our handler still wrote it


def _drop(record: logging.LogRecord) -> bool:
    return False


def _root_filter() -> None:
    logging.getLogger().addFilter(_drop)


def _root_handler_filter() -> None:
    _root_handler().addFilter(_drop)


def _access_filter() -> None:
    ACCESS.addFilter(_drop)


def _access_warning() -> None:
    ACCESS.setLevel(logging.WARNING)


def _root_handler_warning() -> None:
    _root_handler().setLevel(logging.WARNING)


def _access_disabled() -> None:
    ACCESS.disabled = True


def _access_not_propagating() -> None:
    ACCESS.propagate = False


def _plain_formatter() -> None:
    _root_handler().setFormatter(logging.Formatter("%(levelname)s|%(name)s|%(message)s"))


class _MyText(TextFormatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return "T"


def _subclassed_formatter() -> None:
    _root_handler().setFormatter(_MyText())


class _Shouting(BatchingHandler):
    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).upper()


def _subclassed_handler() -> None:
    root = logging.getLogger()
    ours = _root_handler()
    root.removeHandler(ours)
    shouting = _Shouting(ours.stream)
    shouting.setFormatter(ours.formatter)
    root.addHandler(shouting)


@pytest.mark.parametrize(
    ("change", "written"),
    [
        (_root_filter, True),  # logging does not ask the root's filters about a child's record
        (_root_handler_filter, False),
        (_access_filter, False),
        (_access_warning, True),  # Logger.handle does not look at levels: write() is asked first
        (_root_handler_warning, False),
        (_access_disabled, False),
        (_access_not_propagating, False),
        (_plain_formatter, True),
        (_subclassed_formatter, True),
        (_subclassed_handler, False),  # it wrote MESSAGE.upper()
    ],
)
def test_any_other_setup_takes_the_record_path_and_is_honoured(
    change: Callable[[], None], written: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles = Handles(monkeypatch)
    root = logging.getLogger()
    saved = (ACCESS.level, ACCESS.disabled, ACCESS.propagate)
    try:
        with only_ours("text") as stream:
            change()
            AccessLog(clock=_clock(WHEN)).write(FIELDS, MESSAGE)
    finally:
        ACCESS.filters.clear()
        root.filters.clear()
        ACCESS.disabled, ACCESS.propagate = saved[1:]
        ACCESS.setLevel(saved[0])  # and logging forgets what it cached
    assert handles.count == 1
    assert (MESSAGE in stream.getvalue()) is written
    if change is _plain_formatter:
        assert stream.getvalue() == f"INFO|sideproxy.access|{MESSAGE}\n"
    if change is _subclassed_formatter:
        assert stream.getvalue() == f"T INFO    sideproxy.access: {MESSAGE}\n"
    if change is _subclassed_handler:
        assert stream.getvalue().endswith(f" SIDEPROXY.ACCESS: {MESSAGE.upper()}\n")


@pytest.mark.parametrize("where", ["root", "access", "between"])
def test_another_handler_anywhere_on_the_way_takes_the_record_path(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    handles = Handles(monkeypatch)
    extra = logging.StreamHandler(io.StringIO())
    logger = {
        "root": logging.getLogger(),
        "access": ACCESS,
        "between": logging.getLogger("sideproxy"),
    }[where]
    with only_ours("json") as stream:
        logger.addHandler(extra)
        try:
            AccessLog(clock=_clock(WHEN)).write(FIELDS, MESSAGE)
        finally:
            logger.removeHandler(extra)
    assert handles.count == 1
    assert extra.stream.getvalue() == MESSAGE + "\n"
    assert json.loads(stream.getvalue())["msg"] == MESSAGE


def test_a_field_json_cannot_write_is_reported_as_today(monkeypatch: pytest.MonkeyPatch) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    handles = Handles(monkeypatch)
    errors: list[logging.LogRecord] = []
    with only_ours("json") as stream:
        monkeypatch.setattr(_root_handler(), "handleError", errors.append)
        AccessLog(clock=_clock(WHEN)).write({**FIELDS, "odd": Unprintable()}, MESSAGE)
    assert handles.count == 1  # the direct path gave up, the record path reported it
    assert [r.getMessage() for r in errors] == [MESSAGE]
    assert stream.getvalue() == ""


def test_a_forked_child_makes_its_own_record_template() -> None:
    log = AccessLog(clock=_clock(WHEN))
    with only_ours("text"):
        ACCESS.addFilter(lambda record: True)  # the record path, which uses the template
        try:
            log.write(FIELDS, MESSAGE)
        finally:
            ACCESS.filters.clear()
    assert log._template is not None
    assert log._template["process"] in (os.getpid(), None)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, b"fresh" if log._template is None else b"stale")
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 16) == b"fresh"
    finally:
        os.close(read)
        os.waitpid(pid, 0)
    assert log._template is not None  # the parent's own stays
