"""A backend using the official openai SDK, run inside the node's network namespace.

The pod tests start it with ``nsenter --net=... python -m tests.pods.client MODE ...`` (see
:func:`tests.pods.release.run_client`), so it reaches the proxy exactly as an in-cluster backend
would: through the Service's ClusterIP (kube-proxy's iptables rules), or a pod IP. It prints one
JSON object as its last stdout line.

Modes:

``chat N``        N chat completions in a row; ``{"ok": n, "errors": [...]}``.
``load``          chat completions from ``--workers`` loops until stdin closes (the test closes
                  it when its disruption is over); ``{"ok": n, "errors": [...]}``.
``streams``       ``--per`` streams to each ``--url``, all at once; prints ``STARTED`` when each
                  has its first chunk, then per stream ``{"url", "outcome", "chunks", "error"}``
                  with outcome ``done`` (a whole answer), ``error_event`` (the stream ended with an
                  error event: the SDK raised APIError) or ``broken`` (anything else).

The SDK keeps its default retries (2) in ``chat`` and ``load``, as a real backend would: a
request counts as failed only when the SDK gives up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import openai

MODEL = "fake-model"


def _client(base_url: str, key: str, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=30.0, **kw)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


async def _one(client: openai.AsyncOpenAI) -> None:
    reply = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}]
    )
    if not reply.choices:
        raise RuntimeError("an answer without choices")


async def chat(args: argparse.Namespace) -> dict[str, Any]:
    ok, errors = 0, []
    async with _client(args.base_url, args.key) as client:
        for _ in range(args.n):
            try:
                await _one(client)
                ok += 1
            except Exception as exc:
                errors.append(_describe(exc))
    return {"ok": ok, "errors": errors}


async def load(args: argparse.Namespace) -> dict[str, Any]:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # stdin closing (the test's signal to stop) ends the load; its EOF arrives on a thread.
    loop.run_in_executor(None, sys.stdin.read).add_done_callback(lambda _: stop.set())
    counts = {"ok": 0}
    errors: list[str] = []

    async def worker(client: openai.AsyncOpenAI) -> None:
        while not stop.is_set():
            try:
                await _one(client)
                counts["ok"] += 1
            except Exception as exc:
                errors.append(_describe(exc))
            await asyncio.sleep(args.pause)

    async with _client(args.base_url, args.key) as client:
        await _one(client)  # the load starts healthy, or not at all
        print("STARTED", flush=True)
        await asyncio.gather(*(worker(client) for _ in range(args.workers)))
    return {"ok": counts["ok"], "errors": errors}


async def _stream(url: str, key: str, started: asyncio.Event) -> dict[str, Any]:
    result: dict[str, Any] = {"url": url, "outcome": "broken", "chunks": 0, "error": ""}
    async with _client(url, key, max_retries=0) as client:
        try:
            stream = await client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "tell me"}], stream=True
            )
            finished = False
            async for chunk in stream:
                result["chunks"] += 1
                started.set()
                if chunk.choices and chunk.choices[0].finish_reason:
                    finished = True
            result["outcome"] = "done" if finished else "broken"
        except openai.APIConnectionError as exc:
            result["error"] = _describe(exc)
        except openai.APIError as exc:  # an error event in the stream (or an error status)
            result["outcome"] = "error_event" if result["chunks"] else "broken"
            result["error"] = _describe(exc)
        except Exception as exc:
            result["error"] = _describe(exc)
    started.set()
    return result


async def streams(args: argparse.Namespace) -> dict[str, Any]:
    events = [asyncio.Event() for _ in args.url for _ in range(args.per)]
    tasks = [
        asyncio.create_task(_stream(url, args.key, events[i * args.per + j]))
        for i, url in enumerate(args.url)
        for j in range(args.per)
    ]
    await asyncio.gather(*(e.wait() for e in events))
    print("STARTED", flush=True)
    return {"streams": await asyncio.gather(*tasks)}


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m tests.pods.client")
    p.add_argument("--key", required=True, help="the client's virtual key")
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("chat")
    c.add_argument("--base-url", required=True)
    c.add_argument("n", type=int)
    c.set_defaults(run=chat)
    ld = sub.add_parser("load")
    ld.add_argument("--base-url", required=True)
    ld.add_argument("--workers", type=int, default=4)
    ld.add_argument("--pause", type=float, default=0.05, help="seconds between a worker's calls")
    ld.set_defaults(run=load)
    s = sub.add_parser("streams")
    s.add_argument("--url", action="append", required=True, help="a base URL; repeatable")
    s.add_argument("--per", type=int, default=3, help="streams per URL")
    s.set_defaults(run=streams)
    args = p.parse_args()
    print(json.dumps(asyncio.run(args.run(args))), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
