"""Per-request cost of reading the model from a request body (issue 11 item 1).

    .venv/bin/python bench/model_read.py

Compares, per body size, what the request path does (``_route.model_of``: a full ``json.loads``
up to ``PARSE_LIMIT``, which the validity check needed before models existed, else the bounded
scan) with the validity-only ``json.loads`` of the seed. Bodies are OpenAI SDK chat requests
(``messages`` first, ``model`` last), the worst place for the model to be; plus a multipart
transcription request with 1 MiB of audio. Prints microseconds per call (best of 5 runs).
"""

from __future__ import annotations

import json
import timeit
from collections.abc import Callable

from sideproxy.proxy._exchange import Headers, Inbound
from sideproxy.proxy._model import model_of_form, parse_json, scan_json
from sideproxy.proxy._route import model_of

JSON_HEADERS = Headers([(b"Content-Type", b"application/json")])


def chat(size: int) -> bytes:
    turn = {"role": "user", "content": "lorem ipsum dolor sit amet " * 10}
    n = max(1, size // len(json.dumps(turn)))
    return json.dumps({"messages": [turn] * n, "model": "llama-3.3-70b", "stream": False}).encode()


def form(audio: int, model_first: bool) -> tuple[bytes, str]:
    file = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.mp3"\r\n\r\n'
        + b"\x00" * audio
        + b"\r\n"
    )
    model = b'--xyz\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-large-v3\r\n'
    body = (model + file if model_first else file + model) + b"--xyz--\r\n"
    return body, "multipart/form-data; boundary=xyz"


def best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def main() -> None:
    print(f"{'body':>12} {'model_of (µs)':>14} {'json.loads only (µs)':>21} {'scan (µs)':>10}")
    for size in (300, 2_000, 16_000, 64_000, 256_000, 1_000_000):
        body = chat(size)
        inbound = Inbound("POST", "/v1/chat/completions", "", JSON_HEADERS, body)
        number = max(20, 200_000 // max(1, len(body) // 100))
        ours = best_us(lambda: model_of(inbound), number)  # noqa: B023 - timed right here
        plain = best_us(lambda: json.loads(body), number)  # noqa: B023
        scan = best_us(lambda: scan_json(body), number)  # noqa: B023
        assert model_of(inbound) == parse_json(body) == scan_json(body) == "llama-3.3-70b"
        print(f"{len(body):>12,} {ours:>14.2f} {plain:>21.2f} {scan:>10.2f}")
    for first in (True, False):
        body, ctype = form(1 << 20, first)
        assert model_of_form(body, ctype) == "whisper-large-v3"
        us = best_us(lambda: model_of_form(body, ctype), 2000)  # noqa: B023
        where = "before" if first else "after"
        print(f"multipart, model {where} 1 MiB of audio: {us:.2f} µs")


if __name__ == "__main__":
    main()
