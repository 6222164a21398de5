"""``sideproxy diag URL``: N concurrent small chat completions against a proxy, and a report.

Prints the status-code distribution, latency percentiles (p50/p90/p99) and, when the proxy's
status endpoint answers, how the requests spread over the pool's keys (the difference of each
key's request counter before and after the run). Exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

__all__ = ["DiagResult", "add_arguments", "format_report", "run", "run_diag"]


@dataclass
class DiagResult:
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: list[float] = field(default_factory=list)  # seconds, successful or not
    errors: list[str] = field(default_factory=list)  # a few samples of what went wrong
    per_key: dict[str, int] | None = None  # key name -> requests during the run
    elapsed: float = 0.0

    @property
    def failed(self) -> int:
        return sum(n for status, n in self.statuses.items() if status != "200")

    @property
    def total(self) -> int:
        return sum(self.statuses.values())

    def percentile(self, p: float) -> float:
        """Nearest-rank percentile of the latencies, in seconds."""
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]


def _endpoints(url: str) -> tuple[str, str]:
    """(chat completions URL, status URL) for a proxy URL with or without ``/v1``."""
    parsed = URL(url)
    path = parsed.path.rstrip("/")
    if not path.endswith("/v1"):
        path += "/v1"
    base = parsed.with_path(path).with_query(None)
    origin = parsed.origin()
    return str(base) + "/chat/completions", str(origin) + "/sideproxy/status"


async def _key_counts(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> dict[str, int] | None:
    try:
        async with session.get(url, headers=headers) as resp:
            if resp.status != 200:
                return None
            body = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    keys = body.get("keys") if isinstance(body, dict) else None
    if not isinstance(keys, list):
        return None
    return {str(k.get("name")): int(k.get("requests", 0)) for k in keys if isinstance(k, dict)}


async def run_diag(
    url: str,
    *,
    requests: int = 100,
    concurrency: int = 100,
    key: str | None = None,
    model: str = "llama-3.1-8b-instant",
    request_timeout: float = 60.0,
) -> DiagResult:
    chat_url, status_url = _endpoints(url)
    headers = {"Authorization": f"Bearer {key or 'sk-none'}", "Content-Type": "application/json"}
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Say OK."}], "max_tokens": 2}
    ).encode()
    result = DiagResult()
    limit = asyncio.Semaphore(max(1, concurrency))
    connector = aiohttp.TCPConnector(limit=max(1, concurrency))
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=request_timeout)
    ) as session:
        before = await _key_counts(session, status_url, headers)

        async def one() -> None:
            async with limit:
                started = time.perf_counter()
                try:
                    async with session.post(chat_url, data=body, headers=headers) as resp:
                        payload = await resp.read()
                        status = str(resp.status)
                        if resp.status != 200 and len(result.errors) < 5:
                            result.errors.append(
                                f"{resp.status}: {payload[:200].decode(errors='replace')}"
                            )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    status = type(exc).__name__
                    if len(result.errors) < 5:
                        result.errors.append(f"{status}: {exc}")
                result.latencies.append(time.perf_counter() - started)
                result.statuses[status] += 1

        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(requests)))
        result.elapsed = time.perf_counter() - started
        after = await _key_counts(session, status_url, headers)
    if after is not None:
        before = before or {}
        result.per_key = {name: n - before.get(name, 0) for name, n in sorted(after.items())}
    return result


def format_report(result: DiagResult) -> str:
    lines = [
        f"{result.total} requests in {result.elapsed:.2f}s "
        f"({result.total / result.elapsed if result.elapsed else 0:.0f}/s), "
        f"{result.failed} failed",
        "status codes:",
    ]
    for status, n in sorted(result.statuses.items()):
        lines.append(f"  {status:>8}  {n}")
    lines.append(
        "latency: " + ", ".join(f"p{p} {result.percentile(p) * 1000:.1f}ms" for p in (50, 90, 99))
    )
    if result.per_key is not None:
        total = sum(result.per_key.values()) or 1
        lines.append("requests per key (upstream attempts):")
        for name, n in result.per_key.items():
            lines.append(f"  {name:<24} {n:>6}  {100 * n / total:5.1f}%")
    else:
        lines.append("per-key spread: status endpoint not reachable")
    if result.errors:
        lines.append("sample errors:")
        lines.extend(f"  {e}" for e in result.errors)
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="proxy URL, e.g. http://127.0.0.1:8080 or .../groq/v1")
    parser.add_argument("-n", "--requests", type=int, default=100, help="requests (default 100)")
    parser.add_argument(
        "-c", "--concurrency", type=int, default=100, help="in flight at once (default 100)"
    )
    parser.add_argument(
        "--key",
        default=os.environ.get("SIDE_PROXY_VIRTUAL_KEY"),
        help="virtual key to present (env SIDE_PROXY_VIRTUAL_KEY)",
    )
    parser.add_argument("--model", default="llama-3.1-8b-instant", help="model name to request")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")


def run(args: argparse.Namespace) -> int:
    result = asyncio.run(
        run_diag(
            args.url,
            requests=args.requests,
            concurrency=args.concurrency,
            key=args.key,
            model=args.model,
            request_timeout=args.timeout,
        )
    )
    print(format_report(result))
    return 1 if result.failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sideproxy diag", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
