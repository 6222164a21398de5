"""Python load for what wrk cannot measure: streamed TTFB/TTLB (scenario 3), the 429 storm (4).

    python bench/loadclient.py stream URL TOKEN --requests 400 --concurrency 8
    python bench/loadclient.py storm  URL TOKEN --seconds 10 --concurrency 16 --stats STATS_URL
    python bench/loadclient.py hold   URL TOKEN --connections 10000 [--streams] --seconds 60

``hold`` (scenario 7, memory): opens ``--connections`` connections (raw sockets, not aiohttp),
each sends one request; without ``--streams`` it reads the whole answer and the connection then
sits idle (keep-alive); with ``--streams`` it asks for an SSE stream and reads only its first
bytes, so the stream stays in flight. Then it prints ``READY <json>`` and holds everything until
stdin closes or ``--seconds`` pass, and prints the final JSON line.

Prints one JSON object on stdout. Every loop is bounded by a count and a deadline; only
127.0.0.1 URLs are accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from urllib.parse import urlsplit

import aiohttp
import uvloop

BODY = {
    "model": "bench-model",
    "messages": [{"role": "user", "content": "Say hello."}],
    "max_tokens": 16,
}


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {f"p{p}".replace(".", "_"): pct(values, p) * 1e3 for p in (50, 90, 99)} | {
        "mean": (sum(values) / len(values) * 1e3) if values else float("nan")
    }


async def stream(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    body = json.dumps(BODY | {"stream": True}).encode()
    ttfb: list[float] = []
    ttlb: list[float] = []
    chunks: list[int] = []
    errors: dict[str, int] = {}
    deadline = time.monotonic() + args.timeout
    queue = iter(range(args.requests + args.warmup))

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        t0 = time.perf_counter()
        async with session.post(args.url, data=body, headers=headers) as resp:
            if resp.status != 200:
                await resp.read()
                errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                return
            first = None
            n = 0
            done = False
            async for data in resp.content.iter_any():
                if first is None and data.strip():
                    first = time.perf_counter()
                n += data.count(b"data: ")
                if b"[DONE]" in data:
                    done = True
            last = time.perf_counter()
        if first is None or not done:
            errors["incomplete"] = errors.get("incomplete", 0) + 1
            return
        if i >= args.warmup:
            ttfb.append(first - t0)
            ttlb.append(last - t0)
            chunks.append(n)

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            if time.monotonic() > deadline:
                return
            try:
                await one(session, i)
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
    return {
        "completed": len(ttfb),
        "errors": errors,
        "chunks_per_stream": (sum(chunks) / len(chunks)) if chunks else 0,
        "ttfb_ms": summary(ttfb),
        "ttlb_ms": summary(ttlb),
    }


async def storm(args: argparse.Namespace) -> dict[str, object]:
    headers = {"Authorization": f"Bearer {args.token}", "Content-Type": "application/json"}
    body = json.dumps(BODY).encode()
    results: list[tuple[float, int]] = []  # (send time, status or -1)
    start = time.monotonic()
    end = start + args.seconds
    cap = args.max_requests

    async def stats(session: aiohttp.ClientSession) -> dict[str, object]:
        async with session.get(args.stats) as resp:
            return await resp.json()

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < end and len(results) < cap:
            sent = time.monotonic() - start
            try:
                async with session.post(args.url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except (TimeoutError, aiohttp.ClientError):
                status = -1
            results.append((sent, status))

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=args.concurrency + 2)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        before = await stats(session)
        tasks = [asyncio.create_task(worker(session)) for _ in range(args.concurrency)]
        await asyncio.sleep(min(args.settle, args.seconds))
        at_settle = await stats(session)
        # Requests sent after this snapshot are compared with the attempts counted after it.
        settled_at = time.monotonic() - start
        await asyncio.gather(*tasks)
        after = await stats(session)

    def attempts(a: dict, b: dict) -> dict[str, object]:  # type: ignore[type-arg]
        keys = set(a["by_key"]) | set(b["by_key"])
        by_key = {}
        for k in sorted(keys):
            sa, sb = a["by_key"].get(k, {}), b["by_key"].get(k, {})
            d = {s: sb.get(s, 0) - sa.get(s, 0) for s in set(sa) | set(sb)}
            d = {s: v for s, v in d.items() if v}
            if d:
                by_key[k] = d
        return {"total": b["requests"] - a["requests"], "by_key": by_key}

    statuses: dict[str, int] = {}
    for _, s in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    late = [s for t, s in results if t >= settled_at]
    all_att = attempts(before, after)
    late_att = attempts(at_settle, after)
    n = len(results)
    return {
        "client_requests": n,
        "client_statuses": statuses,
        "client_errors": n - statuses.get("200", 0),
        "error_rate": (n - statuses.get("200", 0)) / n if n else float("nan"),
        "upstream_attempts": all_att,
        "attempts_per_request": all_att["total"] / n if n else float("nan"),
        "settle_s": settled_at,
        "after_settle": {
            "client_requests": len(late),
            "client_errors": sum(1 for s in late if s != 200),
            "upstream_attempts": late_att,
            "attempts_per_request": late_att["total"] / len(late) if late else float("nan"),
        },
    }


async def hold(args: argparse.Namespace) -> dict[str, object]:
    parts = urlsplit(args.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stream = args.streams
    body = json.dumps(BODY | ({"stream": True} if stream else {})).encode()
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {args.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    writers: list[asyncio.StreamWriter] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(256)  # connects in flight at once

    async def one() -> None:
        async with gate:
            try:
                async with asyncio.timeout(60):
                    reader, writer = await asyncio.open_connection(host, port)
                    writers.append(writer)
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        errors[head[9:12].decode()] = errors.get(head[9:12].decode(), 0) + 1
                        return
                    if stream:
                        await reader.read(1)  # the stream has started; leave it in flight
                        return
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            await reader.readexactly(int(line.split(b":")[1]))
                            return
                    errors["unsized"] = errors.get("unsized", 0) + 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(args.connections)))
    ready = {"open": len(writers), "errors": errors, "open_s": time.monotonic() - started}
    print("READY " + json.dumps(ready), flush=True)
    loop = asyncio.get_running_loop()
    stdin_closed = loop.run_in_executor(None, sys.stdin.read)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(stdin_closed), args.seconds)
    alive = sum(1 for w in writers if not w.transport.is_closing())
    for w in writers:
        w.transport.abort()
    return {**ready, "still_open": alive}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("stream", "storm", "hold"))
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=120.0, help="hard deadline, seconds")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=1.0, help="storm: window start")
    parser.add_argument("--max-requests", type=int, default=200_000)
    parser.add_argument("--stats", default="")
    parser.add_argument("--connections", type=int, default=1000, help="hold: how many")
    parser.add_argument("--streams", action="store_true", help="hold: streams in flight")
    args = parser.parse_args()
    for u in (args.url, args.stats):
        if u and urlsplit(u).hostname not in ("127.0.0.1", "localhost"):
            sys.exit(f"refusing a non-loopback URL: {u}")
    if args.mode == "hold":
        import resource  # noqa: PLC0415 - only this mode needs many descriptors

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    modes = {"stream": stream, "storm": storm, "hold": hold}
    result = uvloop.run(modes[args.mode](args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
