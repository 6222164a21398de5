"""The request body with another model (issue 13): what a route target is sent instead of the
client's name, so that name never reaches a provider.

A splice, not a re-encode: the client's bytes with only the value of the top-level ``"model"``
key replaced, found where ``_model`` finds it (``model_span``: from the end of the body, a
bracket count over the shorter side, all in C), and one copy of the body. When the scan cannot
tell, or the value is not the plain spelling of the model the request asked for (written with
escapes), the body is parsed and dumped whole, which is right for every body and costs a
parse. ``bench/routes.py`` measures both.

The one body the splice reads differently from ``json.loads``: a second top-level model key
spelled with escapes (``"m\\u006fdel"``) after the plain one; ``json.loads`` (and a provider)
takes the last. Only a client that writes such a body on purpose can make a provider see its
own route name; it learns nothing by it.

Routes apply to JSON bodies only (``_routed``): a multipart request names the provider's model.
"""

from __future__ import annotations

import json

from sideproxy.proxy._model import InvalidJSON, model_span

__all__ = ["with_model"]


def with_model(body: bytes, old: str, new: str) -> bytes:
    """``body`` (a JSON object whose top-level model is ``old``) with that model set to
    ``new``."""
    try:
        span = model_span(body)
    except InvalidJSON:
        span = None
    if span is not None:
        start, end = span
        if body[start + 1 : end - 1] == old.encode():
            view = memoryview(body)
            encoded = json.dumps(new, ensure_ascii=False).encode()
            return b"".join((view[:start], encoded, view[end:]))
    doc = json.loads(body)
    doc["model"] = new
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
