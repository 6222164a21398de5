"""Token-free probes: how a key that is out (exhausted, revoked) comes back.

An exhausted key (out of quota, billing, a daily limit) or a revoked one (401) never returns
through a client's request: the pool offers it for a probe when its back-off ends
(``pool.probes_due``), and this task sends ``GET <baseURL>/models`` with that key, which costs no
tokens. A 2xx returns the key at once (``pool.probe_result(key, True)``); any other answer keeps
it out with a longer back-off. A probe that gets no answer (connect error, timeout) is not
reported: the pool offers it again after ``quota_probe_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sideproxy.proxy._exchange import UpstreamClient, UpstreamFailure

if TYPE_CHECKING:
    from sideproxy.pool import Key
    from sideproxy.proxy._compile import Compiled
    from sideproxy.proxy._forward import Forwarder

__all__ = ["Prober"]

log = logging.getLogger("sideproxy.proxy")

_PROBE_TIMEOUT = 30.0
_BODY_CAP = 1 << 20  # a model list is read (so the connection can be reused) up to this


class Prober:
    """Checks ``pool.probes_due`` every ``interval`` seconds and probes what is due."""

    def __init__(self, forwarder: Forwarder, interval: float = 1.0) -> None:
        self.forwarder = forwarder
        self.interval = interval

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a bug here must not end probing for the life of the process
                log.exception("key probes failed; trying again")
            await asyncio.sleep(self.interval)

    async def tick(self) -> int:
        """Probe every key due now; returns how many were probed."""
        fwd = self.forwarder
        compiled, client = fwd.compiled, fwd.client
        if compiled is None or client is None:
            return 0
        due = fwd.pool.probes_due(fwd.clock())
        if due:
            await asyncio.gather(*(self._probe(key, compiled, client) for key in due))
        return len(due)

    async def _probe(self, key: Key, compiled: Compiled, client: UpstreamClient) -> None:
        fwd = self.forwarder
        upstream = compiled.upstreams.get(key.provider)
        if upstream is None:
            return
        auth = (upstream.auth_name, upstream.auth_prefix + key.secret.encode())
        try:
            status = await _ask(client, upstream.base + "/models", auth, compiled.connect)
        except UpstreamFailure as exc:
            log.info("probe of key %s (%s) got no answer: %s", key.name, key.fingerprint, exc)
            fwd.metrics.probe(key.provider, "no_answer")
            return
        ok = 200 <= status < 300
        fwd.metrics.probe(key.provider, "ok" if ok else "refused")
        transitions = fwd.pool.probe_result(key, ok, fwd.clock())
        if transitions:
            fwd.report(transitions)


async def _ask(client: UpstreamClient, url: str, auth: tuple[bytes, bytes], connect: float) -> int:
    """The status of ``GET url``; the body is read (and dropped) so the connection is reused."""
    resp = await client.send(
        "GET",
        url,
        [auth],
        b"",
        connect_timeout=connect,
        first_byte_timeout=_PROBE_TIMEOUT,
        total_timeout=_PROBE_TIMEOUT,
    )
    try:
        body = await resp.read(_BODY_CAP)
    except BaseException:
        resp.close()
        raise
    if body is None:
        resp.close()
    else:
        resp.release()
    return resp.status
