"""Stage 1, parse and route: which provider, which upstream URL, which model, and what the
request allows (replay after an ambiguous failure, the final event its stream must end with).

The path rules are ``_paths``'s; the model is read by ``_model`` (cheap, bounded). A JSON body
is checked for validity here (400 ``invalid_json``): its bytes go upstream untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sideproxy.proxy._errors import BadRequest, NotFound
from sideproxy.proxy._model import PARSE_LIMIT, InvalidJSON, model_of_form, parse_json, scan_json
from sideproxy.proxy._rewrite import with_model

if TYPE_CHECKING:
    from sideproxy.proxy._compile import Compiled, Upstream
    from sideproxy.proxy._exchange import Inbound

__all__ = ["Route", "anthropic_shaped", "json_body", "resolve", "retarget"]

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

    __slots__ = ("body", "model", "replayable", "terminator", "upstream", "url")

    def __init__(
        self,
        upstream: Upstream,
        url: str,
        model: str | None,
        replayable: bool,
        terminator: bytes | None,
        *,
        body: bytes = b"",
    ) -> None:
        self.upstream = upstream
        self.url = url
        self.model = model
        self.replayable = replayable
        # The final event a 200 SSE stream must end with ([DONE], message_stop), or None.
        self.terminator = terminator
        self.body = body  # what is sent upstream: the client's bytes, or a route target's


def retarget(route: Route, upstream: Upstream, rest: str, query: str, model: str) -> Route:
    """The same request for a route target (``_targets``): its provider's URL and stream end,
    and the body with the target's model in place of the client's (``_rewrite``)."""
    body = route.body
    if route.model is not None and route.model != model:
        body = with_model(body, route.model, model)
    return Route(
        upstream,
        _url(upstream, rest, query),
        model,
        route.replayable,
        _terminator(upstream, rest),
        body=body,
    )


def anthropic_shaped(rest: str) -> bool:
    """Is this an Anthropic Messages request (routes send it to Anthropic targets only)?"""
    return rest.startswith("/messages")


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
    replayable = inbound.method in _SAFE_METHODS or rest in _REPLAYABLE_PATHS
    return Route(
        upstream,
        _url(upstream, rest, query),
        model_of(inbound),
        replayable,
        _terminator(upstream, rest),
        body=inbound.body,
    )


def _url(upstream: Upstream, rest: str, query: str) -> str:
    url = upstream.base + rest
    return url + "?" + query if query else url


def _terminator(upstream: Upstream, rest: str) -> bytes | None:
    if upstream.anthropic:
        return b"message_stop" if rest.endswith("/messages") else None
    return b"[DONE]" if rest.endswith(_OPENAI_STREAMS) else None


def model_of(inbound: Inbound) -> str | None:
    """The model a request body names (checking a JSON body's validity on the way)."""
    body = inbound.body
    if not body or inbound.method not in _BODY_METHODS:
        return None
    headers = inbound.headers
    ctype = (headers.get("content-type") or "").partition(";")
    media = ctype[0].strip().lower()
    if _is_json(media):
        if "content-encoding" in headers:
            return None  # compressed: the provider's to read
        try:
            return parse_json(body) if len(body) <= PARSE_LIMIT else scan_json(body)
        except InvalidJSON:
            raise BadRequest("request body is not valid JSON", code="invalid_json") from None
    if media == "multipart/form-data":
        return model_of_form(body, ctype[2])
    return None


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def json_body(inbound: Inbound) -> bool:
    """Does the request carry a JSON body (the only kind a route rewrites)?"""
    media = (inbound.headers.get("content-type") or "").partition(";")[0].strip().lower()
    return _is_json(media)
