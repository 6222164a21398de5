"""The access log's handler writes what one event-loop turn logged in one batch (issue 17:
the access log stays on and costs little)."""

from __future__ import annotations

import asyncio
import io
import logging

from sideproxy.proxy._logging import BatchingHandler, TextFormatter


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_of_one_loop_turn_are_written_once_and_before_the_next_turn() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream)
    handler.setFormatter(TextFormatter())
    logger = logging.getLogger("sideproxy.test.batching")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for i in range(3):
            logger.info("line %d", i)
        assert stream.writes == 0  # not yet: at the end of this turn
        await asyncio.sleep(0)
        assert stream.writes == 1
        lines = stream.getvalue().splitlines()
        assert [line.rsplit(": ", 1)[1] for line in lines] == ["line 0", "line 1", "line 2"]
    finally:
        logger.removeHandler(handler)


def test_without_a_running_loop_each_line_is_written_at_once() -> None:
    stream = CountingStream()
    handler = BatchingHandler(stream)
    logger = logging.getLogger("sideproxy.test.batching.sync")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        logger.warning("now")
        assert stream.getvalue() == "now\n"
    finally:
        logger.removeHandler(handler)
