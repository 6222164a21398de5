"""The data plane: an aiohttp reverse proxy that spreads requests over a pool of API keys.

Public surface (``tests/proxy/test_public_api.py`` checks this list against ``__all__`` and
against what the rest of the repository imports)::

    create_app(settings, source, *, on_transitions=None, pool=None, clock=time.time)
    ProxySettings                       process-level settings (host, port, limits, ...)
    serve(settings, source, ...)        run until SIGTERM with graceful shutdown
    running(app) -> url                 async context manager: serve in this event loop
    new_event_loop()                    uvloop's loop when installed
    configure_logging(fmt, level)       text or JSON log lines
    ConfigRuntime                       applies source events to the app (app[RUNTIME])
    TransitionHook                      the type of ``on_transitions``
    sources: ConfigSource, Snapshot, SourceEvent, Rejected, EnvSource, FileSource,
             StaticSource, QueueSource, load_file,
             HealthPeer (a source that shares key health: cluster mode's
             ``sideproxy.proxy.kube.KubeSource``, loaded only in cluster mode)
    app keys: POOL, RUNTIME, METRICS, FORWARDER, SETTINGS
    errors: ProxyError and error_response (the one OpenAI-shaped error helper)

The request path, stage by stage, is described in ``sideproxy.proxy._forward``; the interface a
transport plugs into in ``sideproxy.proxy._exchange``.
Routing rule and path safety: see ``sideproxy.proxy._paths``.
"""

from sideproxy.proxy._app import (
    FORWARDER,
    METRICS,
    POOL,
    RUNTIME,
    SETTINGS,
    ConfigRuntime,
    create_app,
)
from sideproxy.proxy._errors import ProxyError, error_response
from sideproxy.proxy._forward import TransitionHook
from sideproxy.proxy._logging import configure_logging
from sideproxy.proxy._server import new_event_loop, running, serve
from sideproxy.proxy._settings import ProxySettings
from sideproxy.proxy.sources import (
    ConfigSource,
    EnvSource,
    FileSource,
    HealthPeer,
    QueueSource,
    Rejected,
    Snapshot,
    SourceEvent,
    StaticSource,
    load_file,
)

__all__ = [
    "FORWARDER",
    "METRICS",
    "POOL",
    "RUNTIME",
    "SETTINGS",
    "ConfigRuntime",
    "ConfigSource",
    "EnvSource",
    "FileSource",
    "HealthPeer",
    "ProxyError",
    "ProxySettings",
    "QueueSource",
    "Rejected",
    "Snapshot",
    "SourceEvent",
    "StaticSource",
    "TransitionHook",
    "configure_logging",
    "create_app",
    "error_response",
    "load_file",
    "new_event_loop",
    "running",
    "serve",
]
