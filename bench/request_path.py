"""CPU per request of the request path alone: ``Forwarder.handle`` over in-memory transports.

    .venv/bin/python bench/request_path.py [--requests 20000] [--no-access-log]

(Profile it with ``.venv/bin/python -m cProfile -s tottime bench/request_path.py``: an
``import cProfile`` inside this folder would find bench/profile.py first.)

Everything Side Proxy does per request except moving bytes: routing, the virtual key, reading
the model, acquire, upstream headers, judging the answer, release (with rate-limit headers),
response headers, metrics and the access log line (to /dev/null through the real formatter).
The transport's share (parsing, sockets, syscalls) comes on top: bench/run measures the whole.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from upstream import COMPLETION  # bench/upstream.py (this folder is on sys.path)

from sideproxy import translate
from sideproxy.pool import ManagedCreditPool
from sideproxy.proxy import ProxySettings, Snapshot, configure_logging
from sideproxy.proxy._compile import compile_snapshot
from sideproxy.proxy._exchange import Headers, Inbound, RawHeaders
from sideproxy.proxy._forward import Forwarder
from sideproxy.proxy._metrics import Metrics

BODY = json.dumps(
    {"messages": [{"role": "user", "content": "Say hello in one word."}], "model": "llama-3"}
).encode()
ANSWER = COMPLETION  # what the benchmarks' fake provider answers: usage included
REQUEST_HEADERS: RawHeaders = [
    (b"Host", b"127.0.0.1:8080"),
    (b"Content-Type", b"application/json"),
    (b"Authorization", b"Bearer vk-bench"),
    (b"User-Agent", b"OpenAI/Python 1.0"),
    (b"Accept", b"application/json"),
    (b"Content-Length", str(len(BODY)).encode()),
]
RESPONSE_HEADERS: RawHeaders = [
    (b"Content-Type", b"application/json"),
    (b"Content-Length", str(len(ANSWER)).encode()),
    (b"x-ratelimit-limit-requests", b"14400"),
    (b"x-ratelimit-remaining-requests", b"14399"),
    (b"x-ratelimit-reset-requests", b"6s"),
    (b"x-ratelimit-limit-tokens", b"18000"),
    (b"x-ratelimit-remaining-tokens", b"17990"),
    (b"x-ratelimit-reset-tokens", b"33ms"),
]


class _Response:
    status = 200
    reason = "OK"
    raw_headers = RESPONSE_HEADERS
    content_length = len(ANSWER)
    content_type = "application/json"

    def __init__(self) -> None:
        self.headers: Mapping[str, str] = Headers(RESPONSE_HEADERS)

    async def read(self, limit: int) -> bytes | None:
        return ANSWER

    async def chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        yield ANSWER

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Client:
    async def send(self, method: str, url: str, headers: RawHeaders, body: bytes, **_: Any) -> Any:
        return _Response()


class _Out:
    started = False

    def closed(self) -> bool:
        return False

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        pass

    async def start(self, status: int, headers: RawHeaders, length: int | None = None) -> None:
        pass

    async def write(self, chunk: bytes) -> None:
        pass

    async def finish(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _forwarder(access_log: bool) -> Forwarder:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "sideproxy.dev/v1alpha1",
            "kind": "CreditPool",
            "metadata": {"name": "bench"},
            "spec": {
                "defaultProvider": "groq",
                "clientAuth": {"secretRef": {"name": "clients", "key": "vk"}},
            },
        },
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "clients"},
         "stringData": {"vk": "vk-bench"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"},
         "stringData": {f"k{i}": f"gsk-bench-{i:04d}" for i in range(10)}},
    ]  # fmt: skip
    for i in range(10):
        docs.append(
            {
                "apiVersion": "sideproxy.dev/v1alpha1",
                "kind": "PoolKey",
                "metadata": {"name": f"k{i}"},
                "spec": {"pool": "bench", "provider": "groq",
                         "secretRef": {"name": "keys", "key": f"k{i}"}},
            }
        )  # fmt: skip
    pool_cr, keys, secrets = translate.from_manifests(docs)
    result = translate.translate(pool_cr, keys, secrets, time.time())
    snapshot = Snapshot(result.table.sealed(1), result.material, "bench")
    settings = ProxySettings(access_log=access_log)
    compiled = compile_snapshot(snapshot, settings, time.time())
    pool = ManagedCreditPool()
    pool.configure(compiled.keys, compiled.policy)
    forwarder = Forwarder(settings, pool, Metrics(pool))
    forwarder.compiled = compiled
    forwarder.client = _Client()  # type: ignore[assignment]
    return forwarder


async def _run(forwarder: Forwarder, n: int) -> float:
    out = _Out()
    inbound = Inbound("POST", "/v1/chat/completions", "", Headers(REQUEST_HEADERS), BODY)
    for _ in range(200):  # warm up: label children, schedules
        inbound.headers = Headers(REQUEST_HEADERS)
        await forwarder.handle(inbound, out)  # type: ignore[arg-type]
    started = time.process_time()
    for _ in range(n):
        inbound = Inbound("POST", "/v1/chat/completions", "", Headers(REQUEST_HEADERS), BODY)
        await forwarder.handle(inbound, out)  # type: ignore[arg-type]
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--no-access-log", action="store_true")
    args = parser.parse_args()
    with open(os.devnull, "w") as sink:
        configure_logging("text", "INFO", sink)
        forwarder = _forwarder(not args.no_access_log)
        runs = [asyncio.run(_run(forwarder, args.requests)) for _ in range(3)]
    log = "off" if args.no_access_log else "on"
    print(f"request path, access log {log}: {min(runs):.1f} µs CPU per request (best of 3)")


if __name__ == "__main__":
    main()
