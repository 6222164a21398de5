"""The floor of Side Proxy's own transport: a bare pass-through on ``sideproxy.proxy.http``
(reference only), the same job as ``bare_proxy.py`` does on aiohttp.

    python bench/transport_proxy.py --port 9306 --upstream http://127.0.0.1:9100/v1 \\
        --keys k1,k2 --vk bench-vk

uvloop, the server and upstream client of ``sideproxy/proxy/http``, a virtual-key check, keys
rotated per request, the response read whole when sized, else streamed chunk by chunk. No pool,
no retries, no metrics, no access log: the cost of the transport alone.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools

import uvloop

from sideproxy.proxy.http import Cycle, HttpServer, Limits, Request, UpstreamClient

DROP = frozenset({b"host", b"authorization", b"content-length", b"transfer-encoding",
                  b"connection"})  # fmt: skip


async def serve(args: argparse.Namespace) -> None:
    keys = itertools.cycle([b"Bearer " + k.encode() for k in args.keys.split(",")])
    expected = b"Bearer " + args.vk.encode()
    base = args.upstream.rstrip("/")
    client = UpstreamClient()

    async def forward(request: Request, cycle: Cycle) -> None:
        auth = b""
        headers = []
        for name, value in request.headers:
            low = name.lower()
            if low == b"authorization":
                auth = value
            elif low not in DROP:
                headers.append((name, value))
        if auth != expected:
            await cycle.respond(401, [], b'{"error":{"message":"bad key"}}')
            return
        headers.append((b"Authorization", next(keys)))
        url = base + request.target[3:].decode()
        up = await client.send(request.method, url, headers, request.body,
                               connect_timeout=10, first_byte_timeout=60)  # fmt: skip
        if up.content_length is not None and up.content_length < 1 << 20:
            body = await up.read(1 << 20)
            up.release()
            await cycle.respond(up.status, up.raw_headers, body or b"")
            return
        await cycle.start(up.status, up.raw_headers, up.content_length)
        async for data in up.chunks(60):
            await cycle.write(data)
        up.release()
        await cycle.finish()

    server = HttpServer(forward, Limits())
    await server.listen("127.0.0.1", args.port)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--keys", required=True)
    parser.add_argument("--vk", required=True)
    uvloop.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
