"""Route targets (issue 13): which provider, and which of its models, serves a request for a
route's model.

A route (``CreditPool.spec.routes``) names a model clients ask for and the targets that serve
it: each a provider endpoint and the model name that provider knows. :func:`compile_routes`
turns a table's routes into :class:`Routes` once per table; per request::

    plan = routes.plan(model, anthropic_shaped)   None: not a route, the request routes as before
    plan.pick(pool, now, exclude) -> (target, key) | None          one call per attempt

``pick`` walks the orders, lowest first. Targets of one order share load by weight with the
pool's own idea, stride scheduling: each target's pass advances by 1/weight when it is picked
and the lowest pass goes next, so over any window each target gets its share of that order's
picks ±1. A target is skipped when no key of its provider can serve its model now
(``pool.acquire(..., model=target.model)`` is None: every key cooling for that model, out of
quota, revoked, or already tried by this request); a skipped target does not bank picks while
it is out (its pass is brought up to the one picked), so it does not burst when it returns.

Anthropic-shaped requests (``/v1/messages``...) go to Anthropic-type targets only and every
other request to the others: a provider is never sent a body in a shape it does not speak.

Nothing here does I/O or reads the clock: ``now`` and the pool come in, so every schedule is
testable with plain numbers (tests/routes/test_targets.py).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from sideproxy.proxy._errors import NotFound

if TYPE_CHECKING:
    from sideproxy.models import TableRoute
    from sideproxy.pool import Key, ManagedCreditPool
    from sideproxy.proxy._compile import Upstream
    from sideproxy.proxy._exchange import RawHeaders, Responder

__all__ = ["ROUTE_TARGET", "Plan", "Routes", "Tagged", "Target", "TargetError", "compile_routes"]

ROUTE_TARGET = b"x-sideproxy-route-target"


class TargetError(ValueError):
    """A table route the proxy cannot serve (a target naming no known provider)."""


class Target:
    """One provider endpoint and the model name it knows."""

    __slots__ = ("header", "label", "model", "provider", "upstream", "weight")

    def __init__(self, upstream: Upstream, model: str, weight: int) -> None:
        self.upstream = upstream
        self.provider = upstream.provider
        self.model = model
        self.weight = weight
        # What the response header, the access log and the metric label say served.
        self.label = f"{upstream.provider}/{model}"
        self.header = self.label.encode()

    def __repr__(self) -> str:
        return f"Target({self.label}, weight={self.weight})"


class _Order:
    """The targets sharing one order, and their stride schedule."""

    __slots__ = ("passes", "strides", "targets")

    def __init__(self, targets: list[Target]) -> None:
        self.targets = tuple(targets)
        self.strides = [1.0 / t.weight for t in targets]
        # Staggered starts, (rank + 1/2) of a stride, as the pool does for a new lane: equal
        # weights become round-robin in configuration order.
        n = len(targets)
        self.passes = [s * (i + 0.5) / n for i, s in enumerate(self.strides)]

    def pick(
        self, pool: ManagedCreditPool, now: float, exclude: Collection[str]
    ) -> tuple[Target, Key] | None:
        targets, passes = self.targets, self.passes
        if len(targets) == 1:
            only = targets[0]
            key = pool.acquire(only.provider, now, exclude, model=only.model)
            return None if key is None else (only, key)
        ranked = sorted(range(len(targets)), key=passes.__getitem__)
        for n, i in enumerate(ranked):
            target = targets[i]
            key = pool.acquire(target.provider, now, exclude, model=target.model)
            if key is None:
                continue
            due = passes[i]
            for skipped in ranked[:n]:
                passes[skipped] = max(passes[skipped], due)
            passes[i] = due + self.strides[i]
            return target, key
        return None


class Plan:
    """A route's targets for one request shape: what the attempts of a request walk."""

    __slots__ = ("model", "orders")

    def __init__(self, model: str, orders: tuple[_Order, ...]) -> None:
        self.model = model
        self.orders = orders

    def pick(
        self, pool: ManagedCreditPool, now: float, exclude: Collection[str] = ()
    ) -> tuple[Target, Key] | None:
        """The target and key for the next attempt, or None when no target can serve now."""
        for order in self.orders:
            picked = order.pick(pool, now, exclude)
            if picked is not None:
                return picked
        return None

    def targets(self) -> Iterable[Target]:
        for order in self.orders:
            yield from order.targets

    def next_recovery(self, pool: ManagedCreditPool, now: float) -> float | None:
        """Earliest time any target can serve again (None: none will by itself)."""
        times = [
            t
            for target in self.targets()
            if (t := pool.next_recovery(target.provider, now, target.model)) is not None
        ]
        return min(times) if times else None


class Routes:
    """A table's routes, compiled: route model -> its plans by request shape."""

    __slots__ = ("_plans",)

    def __init__(self, plans: Mapping[str, tuple[Plan, Plan]]) -> None:
        self._plans = dict(plans)

    def __bool__(self) -> bool:
        return bool(self._plans)

    def __contains__(self, model: object) -> bool:
        return model in self._plans

    def plan(self, model: str | None, anthropic: bool) -> Plan | None:
        """The plan for a request's model (None: the model is not a route). A route without a
        target of the request's shape is 404 ``model_not_found``."""
        if model is None:
            return None
        plans = self._plans.get(model)
        if plans is None:
            return None
        plan = plans[1] if anthropic else plans[0]
        if not plan.orders:
            shape = "Anthropic Messages" if anthropic else "OpenAI-compatible"
            raise NotFound(
                f"route {model!r} has no target for {shape} requests: its targets speak the "
                "other API",
                code="model_not_found",
            )
        return plan


def compile_routes(routes: Iterable[TableRoute], upstreams: Mapping[str, Upstream]) -> Routes:
    """Each route's targets, grouped by order, split by the API shape they speak."""
    plans: dict[str, tuple[Plan, Plan]] = {}
    for route in routes:
        shapes: tuple[dict[int, list[Target]], dict[int, list[Target]]] = ({}, {})
        for t in route.targets:
            upstream = upstreams.get(t.provider)
            if upstream is None:
                raise TargetError(f"route {route.model}: provider {t.provider!r} has no base URL")
            shapes[upstream.anthropic].setdefault(t.order, []).append(
                Target(upstream, t.model, t.weight)
            )
        openai, anthropic = (
            Plan(route.model, tuple(_Order(by_order[o]) for o in sorted(by_order)))
            for by_order in shapes
        )
        plans[route.model] = (openai, anthropic)
    return Routes(plans)


class Tagged:
    """A Responder that adds ``x-sideproxy-route-target: <provider>/<model>`` to the answer:
    the target of the attempt that answered (read when the answer starts, so the last one)."""

    __slots__ = ("_out", "target")

    def __init__(self, out: Responder) -> None:
        self._out = out
        self.target: Target | None = None

    def _headers(self, headers: RawHeaders) -> RawHeaders:
        target = self.target
        if target is None:
            return headers
        return [*headers, (ROUTE_TARGET, target.header)]

    @property
    def started(self) -> bool:
        return self._out.started

    def closed(self) -> bool:
        return self._out.closed()

    async def respond(self, status: int, headers: RawHeaders, body: bytes) -> None:
        await self._out.respond(status, self._headers(headers), body)

    async def start(self, status: int, headers: RawHeaders, length: int | None = None) -> None:
        await self._out.start(status, self._headers(headers), length)

    async def write(self, chunk: bytes) -> None:
        await self._out.write(chunk)

    async def finish(self) -> None:
        await self._out.finish()

    def abort(self) -> None:
        self._out.abort()
