"""Stage 1, parse and route: which provider, which upstream URL, which model, and what the
request allows (replay after an ambiguous failure, the final event its stream must end with).

The path rules are ``_paths``'s; the model is read by ``_model`` (cheap, bounded). A JSON body
is checked for validity here (400 ``invalid_json``): its bytes go upstream untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sideproxy.proxy._errors import BadRequest, NotFound
from sideproxy.proxy._model import PARSE_LIMIT, InvalidJSON, model_of_form, parse_json, scan_json

if TYPE_CHECKING:
    from sideproxy.proxy._compile import Compiled, Upstream
    from sideproxy.proxy._exchange import Inbound

__all__ = ["Route", "resolve"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Requests that change nothing at the provider but the bill, so they may be sent again after a
# failure that could have reached the provider (a 5xx, a timeout, a reset, a broken body). Any
# other request (files, batches, fine-tuning jobs, assistants, vector stores, ...) moves to the
# next key only when the provider cannot have acted on it: a refused connection, a 429, a 401.
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_REPLAYABLE_PATHS = frozenset(
    {
        "/chat/completions",
        "/completions",
        "/embeddings",
        "/messages",
        "/messages/count_tokens",
        "/moderations",
        "/responses",
        "/rerank",
        "/images/generations",
        "/audio/speech",
        "/audio/transcriptions",
        "/audio/translations",
    }
)
_OPENAI_STREAMS = ("/chat/completions", "/completions")


class Route:
    """Where one request goes and what it allows; made once per request."""

    __slots__ = ("model", "replayable", "terminator", "upstream", "url")

    def __init__(
        self,
        upstream: Upstream,
        url: str,
        model: str | None,
        replayable: bool,
        terminator: bytes | None,
    ) -> None:
        self.upstream = upstream
        self.url = url
        self.model = model
        self.replayable = replayable
        # The final event a 200 SSE stream must end with ([DONE], message_stop), or None.
        self.terminator = terminator


def upstream_of(compiled: Compiled, prefix: str | None) -> Upstream:
    """The provider a path prefix names (None: the table's default), or 404."""
    if prefix is None:
        if compiled.default is None:
            raise NotFound("this pool has no default provider", code="unknown_provider")
        return compiled.default
    found = compiled.upstreams.get(prefix)
    if found is None:
        served = ", ".join(sorted(compiled.upstreams))
        raise NotFound(
            f"unknown provider {prefix[:64]!r}: this pool serves {served}",
            code="unknown_provider",
        )
    return found


def resolve(inbound: Inbound, upstream: Upstream, rest: str, query: str) -> Route:
    url = upstream.base + rest
    if query:
        url += "?" + query
    terminator: bytes | None = None
    if upstream.anthropic:
        if rest.endswith("/messages"):
            terminator = b"message_stop"
    elif rest.endswith(_OPENAI_STREAMS):
        terminator = b"[DONE]"
    replayable = inbound.method in _SAFE_METHODS or rest in _REPLAYABLE_PATHS
    return Route(upstream, url, model_of(inbound), replayable, terminator)


def model_of(inbound: Inbound) -> str | None:
    """The model a request body names (checking a JSON body's validity on the way)."""
    body = inbound.body
    if not body or inbound.method not in _BODY_METHODS:
        return None
    headers = inbound.headers
    ctype = (headers.get("content-type") or "").partition(";")
    media = ctype[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        if "content-encoding" in headers:
            return None  # compressed: the provider's to read
        try:
            return parse_json(body) if len(body) <= PARSE_LIMIT else scan_json(body)
        except InvalidJSON:
            raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if media == "multipart/form-data":
        return model_of_form(body, ctype[2])
    return None
