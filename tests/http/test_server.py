"""docs/server-behavior.md, line by line, over real sockets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest

from sideproxy.proxy._exchange import ClientGone
from sideproxy.proxy.http import SCREEN_ABOVE, Cycle, HttpServer, Limits, Refusal, Request
from tests.http.conftest import Conn, Serve, echo

Connect = Callable[[int], Awaitable[Conn]]
GET = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


def code_of(body: bytes) -> str:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "code"}
    return str(error["code"])


async def test_keep_alive_serves_many_requests_on_one_connection(
    serve: Serve, connect: Connect
) -> None:
    _, port = await serve()
    conn = await connect(port)
    for i in range(3):
        await conn.send(b"GET /v1/n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
        status, head, body = await conn.response()
        assert status == 200
        assert body.startswith(b"GET /v1/n%d " % i)
        assert b"Connection: close" not in head


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive"],
)
async def test_connection_close_and_http_1_0_close_after_the_answer(
    serve: Serve, connect: Connect, request_bytes: bytes
) -> None:
    _, port = await serve()
    conn = await connect(port)
    await conn.send(request_bytes)
    status, head, _ = await conn.response()
    assert status == 200
    assert b"Connection: close\r\n" in head
    assert await conn.closed()


async def test_expect_100_continue_gets_100_before_the_body_is_sent(
    serve: Serve, connect: Connect
) -> None:
    _, port = await serve()
    conn = await connect(port)
    await conn.send(
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    status, _, _ = await conn.response()
    assert status == 100
    await conn.send(b"hello")
    status, _, body = await conn.response()
    assert (status, body) == (200, b"POST /v1/x 5 3")


async def test_expect_100_continue_with_a_body_over_the_limit_is_413_without_100(
    serve: Serve, connect: Connect
) -> None:
    _, port = await serve(limits=Limits(max_body=10))
    conn = await connect(port)
    await conn.send(
        b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n"
    )
    status, head, body = await conn.response()
    assert status == 413
    assert code_of(body) == "body_too_large"
    assert b"Connection: close" in head
    assert await conn.closed()


async def test_pipelined_requests_are_answered_in_order(serve: Serve, connect: Connect) -> None:
    async def slow_first(request: Request, cycle: Cycle) -> None:
        if request.target == b"/1":
            await asyncio.sleep(0.05)  # the second request is parsed meanwhile and waits
        await cycle.respond(200, [], request.target)

    _, port = await serve(slow_first)
    conn = await connect(port)
    await conn.send(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in (1, 2, 3)))
    answers = [(await conn.response())[2] for _ in range(3)]
    assert answers == [b"/1", b"/2", b"/3"]


async def test_chunked_and_sized_request_bodies_reach_the_handler_whole(
    serve: Serve, connect: Connect
) -> None:
    bodies: list[bytes] = []

    async def keep(request: Request, cycle: Cycle) -> None:
        bodies.append(request.body)
        await cycle.respond(200, [], b"")

    _, port = await serve(keep)
    conn = await connect(port)
    await conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    await conn.send(b"3\r\nabc\r\n")
    await conn.send(b"2\r\nde\r\n0\r\n\r\n")
    await conn.response()
    await conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nwx")
    await conn.send(b"yz")
    await conn.response()
    assert bodies == [b"abcde", b"wxyz"]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_a_body_over_the_limit_is_413_and_the_connection_closes(
    serve: Serve, connect: Connect, chunked: bool
) -> None:
    seen: list[Request] = []

    async def record(request: Request, cycle: Cycle) -> None:
        seen.append(request)
        await cycle.respond(200, [], b"")

    _, port = await serve(record, Limits(max_body=100))
    conn = await connect(port)
    if chunked:
        await conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        await conn.send(b"64\r\n" + b"x" * 100 + b"\r\n1\r\ny\r\n")
    else:
        await conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")
    status, head, body = await conn.response()
    assert status == 413
    assert code_of(body) == "body_too_large"
    assert b"Connection: close" in head
    assert await conn.closed()
    assert seen == []


@pytest.mark.parametrize(
    ("head", "code"),
    [
        (b"GET /" + b"a" * 300 + b" HTTP/1.1\r\n\r\n", "header_too_large"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 300 + b"\r\n\r\n", "header_too_large"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: 1\r\n" * 17 + b"\r\n", "too_many_headers"),
        (b"GET / HTTP/1.1\r\nX-Nul: a\x00b\r\n\r\n", "malformed_request"),
        (b"GET / HTTP/1.1\r\nX-Lf: a\nX-In: 1\r\n\r\n", "malformed_request"),
        (b"GET / HTTP/1.1\r\n X-Fold: a\r\n\r\n", "malformed_request"),
        (
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "malformed_request",
        ),
        (b"G@T / HTTP/1.1\r\n\r\n", "invalid_method"),
    ],
    ids=[
        "long-line",
        "long-header",
        "many-headers",
        "nul",
        "bare-lf",
        "obs-fold",
        "te-cl",
        "method",
    ],
)
async def test_bad_heads_are_400_in_the_openai_shape_and_close(
    serve: Serve, connect: Connect, head: bytes, code: str
) -> None:
    _, port = await serve(limits=Limits(max_line=256, max_headers=16))
    conn = await connect(port)
    await conn.send(head)
    status, response_head, body = await conn.response()
    assert status == 400
    assert code_of(body) == code
    assert b"Connection: close" in response_head
    assert await conn.closed()


async def test_a_head_trickled_past_its_size_limit_is_400_before_it_ends(
    serve: Serve, connect: Connect
) -> None:
    limits = Limits(max_line=256, max_headers=16)
    _, port = await serve(limits=limits)
    conn = await connect(port)
    await conn.send(b"GET / HTTP/1.1\r\n")
    for _ in range(limits.max_head // 200 + 1):
        await conn.send(b"X-A: " + b"a" * 200)  # one endless header line
    status, _, body = await conn.response()
    assert status == 400
    assert code_of(body) == "header_too_large"


async def test_a_slow_body_gets_408_after_the_body_timeout(serve: Serve, connect: Connect) -> None:
    _, port = await serve(limits=Limits(body_timeout=0.3))
    conn = await connect(port)
    await conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    status, head, body = await conn.response()
    assert status == 408
    assert code_of(body) == "body_read_timeout"
    assert b"Connection: close" in head
    assert await conn.closed()


async def test_slow_headers_and_idle_connections_close_after_the_keepalive_timeout(
    serve: Serve, connect: Connect
) -> None:
    _, port = await serve(limits=Limits(keepalive_timeout=0.3))
    slow = await connect(port)
    await slow.send(b"GET / HTTP/1.1\r\nX-Slow: ")
    idle = await connect(port)
    await idle.send(GET)
    assert (await idle.response())[0] == 200
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(5):  # the timer is not restarted by trickled bytes
        await asyncio.sleep(0.05)
        await slow.send(b"a")
    assert await slow.closed()
    assert await idle.closed()
    assert loop.time() - started < 3


async def test_a_client_that_leaves_cancels_its_handler(serve: Serve, connect: Connect) -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def wait_forever(request: Request, cycle: Cycle) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    _, port = await serve(wait_forever)
    conn = await connect(port)
    await conn.send(GET)
    await entered.wait()
    await conn.close()
    async with asyncio.timeout(5):
        await cancelled.wait()


async def test_streamed_answers_are_chunked_or_sized(serve: Serve, connect: Connect) -> None:
    async def stream(request: Request, cycle: Cycle) -> None:
        sized = request.target == b"/sized"
        await cycle.start(200, [(b"Content-Type", b"text/plain")], 6 if sized else None)
        await cycle.write(b"abc")
        await cycle.write(b"def")
        await cycle.finish()

    _, port = await serve(stream)
    conn = await connect(port)
    await conn.send(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
    status, head, body = await conn.response()
    assert (status, body) == (200, b"abcdef")
    assert b"Transfer-Encoding: chunked" in head
    await conn.send(b"GET /sized HTTP/1.1\r\nHost: x\r\n\r\n")
    status, head, body = await conn.response()
    assert (status, body) == (200, b"abcdef")
    assert b"Content-Length: 6" in head


async def test_framing_headers_from_the_handler_are_replaced_by_the_servers(
    serve: Serve, connect: Connect
) -> None:
    async def lying(request: Request, cycle: Cycle) -> None:
        await cycle.respond(
            200,
            [(b"Content-Length", b"999"), (b"Transfer-Encoding", b"gzip"), (b"X-Ok", b"1")],
            b"ab",
        )

    _, port = await serve(lying)
    conn = await connect(port)
    await conn.send(GET)
    status, head, body = await conn.response()
    assert (status, body) == (200, b"ab")
    assert head.count(b"Content-Length") == 1
    assert b"Transfer-Encoding" not in head
    assert b"X-Ok: 1" in head


async def test_writes_wait_while_the_client_does_not_read(serve: Serve, connect: Connect) -> None:
    """Back-pressure: ``write`` blocks once the socket buffers are full; it resumes when the
    client reads. A client that leaves meanwhile stops the handler (its task is cancelled, or
    ``write`` raises ClientGone)."""
    written = 0
    blocked = asyncio.Event()
    stopped = asyncio.Event()
    outcome: list[BaseException] = []

    async def flood(request: Request, cycle: Cycle) -> None:
        nonlocal written
        await cycle.start(200, [])
        piece = b"x" * 65536
        try:
            while True:
                task = asyncio.ensure_future(cycle.write(piece))
                done, _ = await asyncio.wait([task], timeout=0.5)
                if not done:
                    blocked.set()
                    await task
                written += len(piece)
        except (ClientGone, asyncio.CancelledError) as exc:
            outcome.append(exc)
            stopped.set()
            raise

    _, port = await serve(flood)
    conn = await connect(port)
    await conn.send(GET)
    async with asyncio.timeout(10):
        await blocked.wait()
    assert written < 64 * 1024 * 1024  # bounded by socket buffers, not by memory
    conn.writer.transport.abort()
    async with asyncio.timeout(5):
        await stopped.wait()
    assert isinstance(outcome[0], ClientGone | asyncio.CancelledError)


async def test_a_handler_error_before_the_answer_is_a_500_in_the_openai_shape(
    serve: Serve, connect: Connect
) -> None:
    async def broken(request: Request, cycle: Cycle) -> None:
        raise RuntimeError("boom")

    _, port = await serve(broken)
    conn = await connect(port)
    await conn.send(GET)
    status, _, body = await conn.response()
    assert status == 500
    assert code_of(body) == "internal_error"
    assert b"boom" not in body


async def test_shutdown_lets_the_stream_in_flight_finish_and_closes_idle_connections(
    serve: Serve, connect: Connect
) -> None:
    release = asyncio.Event()
    streaming = asyncio.Event()

    async def stream(request: Request, cycle: Cycle) -> None:
        if request.target == b"/quick":
            await cycle.respond(200, [], b"q")
            return
        await cycle.start(200, [])
        await cycle.write(b"first ")
        streaming.set()
        await release.wait()
        await cycle.write(b"last")
        await cycle.finish()

    server, port = await serve(stream)
    idle = await connect(port)
    await idle.send(b"GET /quick HTTP/1.1\r\nHost: x\r\n\r\n")
    await idle.response()
    busy = await connect(port)
    await busy.send(GET)
    await streaming.wait()
    stopping = asyncio.create_task(server.shutdown(10))
    assert await idle.closed()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    release.set()
    status, head, body = await busy.response()
    assert (status, body) == (200, b"first last")
    assert b"Connection: close" not in head  # the head went out before the shutdown
    assert await busy.closed()
    await stopping


async def test_after_the_grace_a_cancelled_stream_s_last_bytes_are_flushed_before_the_close(
    serve: Serve, connect: Connect
) -> None:
    """A handler that answers the shutdown's cancel with last bytes and a clean finish (as the
    proxy's relay ends an SSE stream with an error event) gets them to the client whole; one
    that does not is aborted, so its client cannot take the truncated body for a whole one."""
    streaming: list[asyncio.Event] = [asyncio.Event(), asyncio.Event()]

    async def stream(request: Request, cycle: Cycle) -> None:
        polite = request.target == b"/polite"
        await cycle.start(200, [])
        await cycle.write(b"first ")
        streaming[polite].set()
        try:
            await asyncio.Event().wait()  # an upstream that never ends
        except asyncio.CancelledError:
            if polite:
                await cycle.write(b"error event")
                await cycle.finish()
            raise

    server, port = await serve(stream)
    polite, rude = await connect(port), await connect(port)
    await polite.send(b"GET /polite HTTP/1.1\r\nHost: x\r\n\r\n")
    await rude.send(GET)
    await asyncio.gather(*(e.wait() for e in streaming))
    await server.shutdown(0.1)
    status, _, body = await polite.response()
    assert (status, body) == (200, b"first error event")
    assert await polite.closed()
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await rude.response()


@pytest.mark.parametrize("status", [413, 408])
async def test_the_refuse_hook_answers_413_and_408_then_the_connection_closes(
    connect: Connect, status: int
) -> None:
    """With a ``refuse`` hook (the proxy logs and counts these), the hook writes the answer."""
    seen: list[tuple[str, bytes, int, str]] = []

    async def refuse(request: Request, cycle: Cycle, code: int, message: str, kind: str) -> None:
        seen.append((request.method, request.target, code, kind))
        await cycle.respond(code, [(b"X-Refused", b"1"), (b"Connection", b"close")], b"no")

    server = HttpServer(echo, Limits(max_body=10, body_timeout=0.2), refuse)
    (_, port), *_ = await server.listen("127.0.0.1", 0)
    try:
        conn = await connect(port)
        length = 11 if status == 413 else 5
        await conn.send(b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nab" % length)
        got, head, body = await conn.response()
        assert (got, body) == (status, b"no")
        assert b"X-Refused: 1" in head
        assert head.count(b"Connection: close") == 1
        assert await conn.closed()
        assert seen == [
            ("POST", b"/v1/x", status, "body_too_large" if status == 413 else "body_read_timeout")
        ]
    finally:
        await server.shutdown(0.5)


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
        b"GET /v1/x HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["connect", "upgrade"],
)
async def test_connect_and_upgrade_are_answered_then_closed_never_tunnelled(
    serve: Serve, connect: Connect, head: bytes
) -> None:
    _, port = await serve()
    conn = await connect(port)
    await conn.send(head + b"GET /v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    status, response_head, body = await conn.response()
    assert status == 200
    assert b"smuggled" not in body
    assert b"Connection: close" in response_head
    assert await conn.closed()


class _Screen:
    """A screen that refuses heads without ``X-Key: ok`` and remembers what it was asked."""

    def __init__(self) -> None:
        self.asked: list[bytes] = []

    def __call__(self, target: bytes, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
        self.asked.append(target)
        if (b"X-Key", b"ok") in headers:
            return None
        return 401, "no key", "invalid_virtual_key"


async def _screened(screen: _Screen, handled: list[bytes]) -> tuple[HttpServer, int]:
    async def handler(request: Request, cycle: Cycle) -> None:
        handled.append(request.body)
        await echo(request, cycle)

    server = HttpServer(handler, Limits(), screen=screen)
    (_, port), *_ = await server.listen("127.0.0.1", 0)
    return server, port


@pytest.mark.parametrize(
    "framing",
    [b"Content-Length: %d\r\n" % (8 << 20), b"Transfer-Encoding: chunked\r\n"],
    ids=["large", "chunked"],
)
async def test_a_screened_head_is_refused_before_its_body_is_read(
    connect: Connect, framing: bytes
) -> None:
    screen, handled = _Screen(), []
    server, port = await _screened(screen, handled)
    try:
        conn = await connect(port)
        # The head alone, and it says 100-continue: the client waits before sending 8 MiB.
        await conn.send(
            b"POST /v1/x HTTP/1.1\r\nHost: x\r\n%bExpect: 100-continue\r\n\r\n" % framing
        )
        status, head, body = await conn.response()
        assert (status, code_of(body)) == (401, "invalid_virtual_key")  # no 100 before it
        assert b"Connection: close" in head
        assert await conn.closed()
        assert screen.asked == [b"/v1/x"]
        assert handled == []
    finally:
        await server.shutdown(0.5)


async def test_a_screened_head_that_passes_reads_its_body_and_small_bodies_are_not_screened(
    connect: Connect,
) -> None:
    screen, handled = _Screen(), []
    server, port = await _screened(screen, handled)
    size = SCREEN_ABOVE + 1
    try:
        conn = await connect(port)
        await conn.send(
            b"POST /v1/big HTTP/1.1\r\nHost: x\r\nX-Key: ok\r\nContent-Length: %d\r\n"
            b"Expect: 100-continue\r\n\r\n" % size
        )
        status, _, _ = await conn.response()
        assert status == 100
        await conn.send(b"a" * size)
        status, _, body = await conn.response()
        assert (status, body) == (200, b"POST /v1/big %d 4" % size)
        # A body the size of a chat request is read without asking: the handler decides.
        await conn.send(b"POST /v1/small HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
        status, _, body = await conn.response()
        assert (status, body) == (200, b"POST /v1/small 5 2")
        assert screen.asked == [b"/v1/big"]
        assert handled == [b"a" * size, b"hello"]
    finally:
        await server.shutdown(0.5)
