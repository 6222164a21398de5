"""The floor for an aiohttp proxy: a bare pass-through with round-robin keys (reference only).

    python bench/bare_proxy.py --port 9300 --upstream http://127.0.0.1:9100/v1 \\
        --keys k1,k2 --vk bench-vk

One ClientSession, uvloop, no access log, a virtual-key check, keys rotated per request, body
read once, the response streamed back chunk by chunk. No retries, no cool-downs, no metrics: what
is left is the cost of aiohttp itself on both sides, which Side Proxy cannot go below.
"""

from __future__ import annotations

import argparse
import itertools

import uvloop
from aiohttp import ClientSession, TCPConnector, web

DROP = {"host", "authorization", "content-length", "transfer-encoding", "connection"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--keys", required=True)
    parser.add_argument("--vk", required=True)
    args = parser.parse_args()
    keys = itertools.cycle([f"Bearer {k}" for k in args.keys.split(",")])
    expected = f"Bearer {args.vk}"
    base = args.upstream.rstrip("/")
    session_key = web.AppKey("session", ClientSession)

    async def forward(request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != expected:
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROP}
        headers["Authorization"] = next(keys)
        url = base + request.raw_path[3:]
        async with request.app[session_key].request(
            request.method, url, data=body, headers=headers
        ) as up:
            out = {k: v for k, v in up.headers.items() if k.lower() not in DROP}
            if up.content_length is not None and up.content_length < 1 << 20:
                return web.Response(status=up.status, body=await up.read(), headers=out)
            resp = web.StreamResponse(status=up.status, headers=out)
            await resp.prepare(request)
            async for data in up.content.iter_any():
                await resp.write(data)
            await resp.write_eof()
            return resp

    async def session_ctx(app: web.Application):  # type: ignore[no-untyped-def]
        app[session_key] = ClientSession(
            connector=TCPConnector(limit=0), auto_decompress=False, skip_auto_headers=["User-Agent"]
        )
        yield
        await app[session_key].close()

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/v1/{tail:.*}", forward)
    web.run_app(
        app, host="127.0.0.1", port=args.port, access_log=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
