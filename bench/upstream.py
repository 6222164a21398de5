"""A fast fake OpenAI upstream for the benchmarks: N uvloop processes sharing one port.

    python bench/upstream.py --port 9100 [--workers 2] [--delay 0.02]
        [--chunks 20 --chunk-interval 0.005] [--keys k1,k2,k3,k4] [--limited k2 --retry-after 60]

* ``POST /v1/chat/completions`` answers a canned chat completion after ``--delay`` seconds, or,
  when the body asks for ``"stream": true``, ``--chunks`` SSE chunks ``--chunk-interval`` apart
  (the first one at once) and ``data: [DONE]``.
* A key named in ``--limited`` (sent as ``Authorization: Bearer <key>``) always gets a 429 with
  ``retry-after: --retry-after`` and OpenAI's rate-limit error body: a key rate-limited hard.
* ``POST /_fake/limit`` with a body ``k2`` (comma-separated names, empty for none) changes
  which keys are limited, in every worker at once (a shared flag array).
* ``GET /_fake/stats`` counts requests by key and status across all worker processes
  (shared memory, one row per worker, so no locks); ``POST /_fake/reset`` zeroes it.

Every worker binds the port with SO_REUSEPORT, so the kernel spreads connections over them. The
body is never parsed as JSON (a substring test finds ``"stream": true``): the upstream must not be
the bottleneck. Only ever binds 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import signal
import sys
import time

import uvloop
from aiohttp import web

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 7, "total_tokens": 16},
    }
).encode()

RATE_LIMITED = json.dumps(
    {
        "error": {
            "message": "Rate limit reached for requests",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
).encode()


def chunk(i: int, last: bool) -> bytes:
    delta = {} if last else {"content": f"tok{i} "}
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": "stop" if last else None}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


# Slots in each worker's row of the shared counter array.
STATUSES = (200, 401, 429)


class Counters:
    """Per-worker rows of a shared int64 array: [key index][status index]."""

    def __init__(self, workers: int, keys: list[str]) -> None:
        self.keys = [*keys, "other"]
        self.width = len(self.keys) * len(STATUSES)
        self.array = multiprocessing.Array("q", workers * self.width, lock=False)
        self.limited = multiprocessing.Array("b", len(self.keys), lock=False)
        self.row = 0

    def index(self, key: str) -> int:
        try:
            return self.keys.index(key)
        except ValueError:
            return len(self.keys) - 1

    def add(self, key_index: int, status: int) -> None:
        self.array[self.row * self.width + key_index * len(STATUSES) + STATUSES.index(status)] += 1

    def snapshot(self) -> dict[str, object]:
        totals = [0] * self.width
        for base in range(0, len(self.array), self.width):
            for j in range(self.width):
                totals[j] += self.array[base + j]
        by_key: dict[str, dict[str, int]] = {}
        for k, name in enumerate(self.keys):
            counts = {
                str(s): totals[k * len(STATUSES) + i]
                for i, s in enumerate(STATUSES)
                if totals[k * len(STATUSES) + i]
            }
            if counts:
                by_key[name] = counts
        return {"requests": sum(totals), "by_key": by_key, "time": time.time()}

    def reset(self) -> None:
        for j in range(len(self.array)):
            self.array[j] = 0


def make_app(args: argparse.Namespace, counters: Counters) -> web.Application:
    for name in filter(None, args.limited.split(",")):
        counters.limited[counters.index(name)] = 1
    limited = counters.limited
    retry_after = str(args.retry_after)
    keys = counters.keys
    index_of = {f"Bearer {k}": i for i, k in enumerate(keys)}
    other = len(keys) - 1
    delay, chunks, interval = args.delay, args.chunks, args.chunk_interval
    stream_chunks = [chunk(i, i == chunks - 1) for i in range(chunks)]
    sse_headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        k = index_of.get(request.headers.get("Authorization", ""), other)
        if limited[k]:
            counters.add(k, 429)
            return web.Response(
                status=429,
                body=RATE_LIMITED,
                content_type="application/json",
                headers={"retry-after": retry_after, "x-ratelimit-remaining-requests": "0"},
            )
        counters.add(k, 200)
        if b'"stream": true' in body or b'"stream":true' in body:
            resp = web.StreamResponse(headers=sse_headers)
            await resp.prepare(request)
            try:
                for i, data in enumerate(stream_chunks):
                    if i:
                        await asyncio.sleep(interval)
                    await resp.write(data)
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
            except ConnectionError:  # the client left mid-stream
                pass
            return resp
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=COMPLETION, content_type="application/json")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench-model"}]})

    async def stats(_: web.Request) -> web.Response:
        return web.json_response(counters.snapshot())

    async def reset(_: web.Request) -> web.Response:
        counters.reset()
        return web.json_response({"ok": True})

    async def limit(request: web.Request) -> web.Response:
        names = set(filter(None, (await request.text()).strip().split(",")))
        for i, name in enumerate(keys):
            limited[i] = 1 if name in names else 0
        return web.json_response({"limited": sorted(names)})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/_fake/stats", stats)
    app.router.add_post("/_fake/reset", reset)
    app.router.add_post("/_fake/limit", limit)
    return app


def serve(args: argparse.Namespace, counters: Counters, row: int) -> None:
    counters.row = row
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    runner = web.AppRunner(make_app(args, counters), access_log=None, handle_signals=False)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", args.port, reuse_port=True, backlog=1024)
    loop.run_until_complete(site.start())
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.run_until_complete(stop.wait())
    loop.run_until_complete(runner.cleanup())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-interval", type=float, default=0.005)
    parser.add_argument("--keys", default="k1,k2,k3,k4", help="keys counted by name")
    parser.add_argument("--limited", default="", help="keys that always get 429")
    parser.add_argument("--retry-after", type=int, default=60)
    args = parser.parse_args()
    counters = Counters(args.workers, args.keys.split(","))
    children: list[int] = []
    for row in range(1, args.workers):
        pid = os.fork()
        if pid == 0:
            serve(args, counters, row)
            os._exit(0)
        children.append(pid)
    try:
        serve(args, counters, 0)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)
    sys.exit(0)


if __name__ == "__main__":
    main()
