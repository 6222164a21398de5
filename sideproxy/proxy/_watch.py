"""List, then watch, forever: the one loop behind every watch of the proxy's cluster mode.

Whatever goes wrong — the API server unreachable, a refused request, a watch that expires, a
malformed event, a handler that trips over an object it did not expect — the loop logs it,
waits (0.2 s doubling to 5 s) and starts over with a fresh list. It ends only when cancelled:
a watch that dies silently would leave the proxy serving a table nobody updates (issue 15.5).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp
from kubernetes_asyncio import watch
from kubernetes_asyncio.client.exceptions import ApiException

__all__ = ["BACKOFF_MAX", "BACKOFF_START", "WATCH_SECONDS", "Lister", "describe", "follow"]

log = logging.getLogger("sideproxy.proxy.kube")

# Watches end server-side after this long and are re-established with a fresh list; the client
# gives up a little later so that a half-open connection cannot hang us forever.
WATCH_SECONDS = 60
BACKOFF_START, BACKOFF_MAX = 0.2, 5.0
# Expected on a flaky network or a restarting API server: one line, no traceback.
_ORDINARY = (ApiException, aiohttp.ClientError, TimeoutError, OSError)

Lister = Callable[..., Awaitable[Any]]
Object = Mapping[str, Any]


def describe(exc: BaseException) -> str:
    """A log-safe one-liner: status and reason, or the exception's type (never a body)."""
    if isinstance(exc, ApiException):
        return f"HTTP {exc.status} {exc.reason}"
    return type(exc).__name__


async def follow(
    what: str,
    lister: Lister,
    kwargs: Mapping[str, Any],
    on_listing: Callable[[list[Object]], None],
    on_event: Callable[[str, Object], None],
    *,
    on_connected: Callable[[bool], None] = lambda _: None,
) -> None:
    """``lister(**kwargs)`` (a ``list_*`` call of kubernetes_asyncio) as a list, handed to
    ``on_listing``, then as a watch from that list's resourceVersion, each ADDED / MODIFIED /
    DELETED event handed to ``on_event(type, object)``. Never returns; cancel it to stop."""
    backoff = BACKOFF_START
    while True:
        try:
            response = await lister(
                **kwargs, _preload_content=False, _request_timeout=WATCH_SECONDS
            )
            if not 200 <= response.status <= 299:  # a raw response does not raise by itself
                response.release()
                raise ApiException(status=response.status, reason=response.reason)
            listing = await response.json()
            items = listing.get("items") or []
            on_listing([item for item in items if isinstance(item, Mapping)])
            version = listing["metadata"]["resourceVersion"]
            on_connected(True)
            backoff = BACKOFF_START
            async with watch.Watch() as stream:
                async for event in stream.stream(
                    lister,
                    **kwargs,
                    resource_version=version,
                    timeout_seconds=WATCH_SECONDS,
                    allow_watch_bookmarks=True,
                    _request_timeout=WATCH_SECONDS + 15,
                ):
                    kind = event["type"]
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        on_event(kind, event["raw_object"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the watch outlives anything: see the module docstring
            on_connected(False)
            if isinstance(exc, _ORDINARY):
                log.warning(
                    "watch of %s interrupted (%s); retrying in %.1fs", what, describe(exc), backoff
                )
            else:
                # A surprise (a malformed event, a bug in a handler): the type and where, never
                # the exception's text, which may quote the object.
                log.error(
                    "watch of %s failed (%s at %s); retrying in %.1fs",
                    what,
                    type(exc).__name__,
                    _where(exc),
                    backoff,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)


def _where(exc: BaseException) -> str:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "?"
    return f"{tb.tb_frame.f_code.co_filename.rsplit('/', 1)[-1]}:{tb.tb_lineno}"
