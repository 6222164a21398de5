"""The proxy's HTTP/1.1 transport on asyncio protocols and httptools (llhttp), both sides.

- ``HttpServer`` / ``ServerProtocol`` / ``Cycle``: the client-facing server
  (docs/server-behavior.md);
- ``UpstreamClient``: keep-alive pools per provider origin, TLS, deadlines, back-pressure;
- ``FlowControl``: the one flow-control class both sides use.

Nothing here knows about keys, pools or routes: a handler gets a whole ``Request`` and a
``Cycle`` (the ``Responder`` of ``sideproxy.proxy._exchange``).
"""

from sideproxy.proxy.http._client import UpstreamClient
from sideproxy.proxy.http._cycle import Cycle, Request
from sideproxy.proxy.http._flow import FlowControl
from sideproxy.proxy.http._limits import Limits
from sideproxy.proxy.http._server import (
    SCREEN_ABOVE,
    Handler,
    HttpServer,
    Refusal,
    Screen,
    ServerProtocol,
)
from sideproxy.proxy.http._tls import client_context

__all__ = [
    "SCREEN_ABOVE",
    "Cycle",
    "FlowControl",
    "Handler",
    "HttpServer",
    "Limits",
    "Refusal",
    "Request",
    "Screen",
    "ServerProtocol",
    "UpstreamClient",
    "client_context",
]
