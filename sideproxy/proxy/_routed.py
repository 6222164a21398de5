"""One routed request (issue 13): the attempt stage's view of a request whose model names a
route. Each attempt asks :meth:`Routed.acquire` for a target and a key (``_targets``); the
request then goes to that target's provider with that target's model in its body
(``_route.retarget``, built once per target per request), and the answer says which target
served (``x-sideproxy-route-target``, through :class:`_targets.Tagged`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING

from sideproxy.proxy._errors import BadRequest
from sideproxy.proxy._route import Route, json_body, retarget
from sideproxy.proxy._targets import Plan, Tagged, Target

if TYPE_CHECKING:
    from sideproxy.pool import Key, ManagedCreditPool
    from sideproxy.proxy._exchange import Inbound, Responder

__all__ = ["Routed"]


class Routed:
    __slots__ = ("_asked", "_path", "_routes", "model", "out", "plan", "provider", "route")

    def __init__(
        self, plan: Plan, asked: Route, inbound: Inbound, out: Responder, path: tuple[str, str]
    ) -> None:
        if not json_body(inbound):
            raise BadRequest(
                f"model {plan.model!r} is a route: routes serve JSON requests only; name the "
                "provider's own model here",
                code="invalid_request",
            )
        self.plan = plan
        self.model = plan.model  # the client's name for it
        self._asked = asked  # the client's request: its body, its model
        self._path = path  # (rest after /v1, query)
        self._routes: dict[Target, Route] = {}
        self.out = Tagged(out)
        first = next(iter(plan.targets()))
        self.provider = first.provider  # until a target is picked (metrics of a 429)
        self.route = asked

    @property
    def label(self) -> str:
        target = self.out.target
        return target.label if target is not None else "-"

    def acquire(self, pool: ManagedCreditPool, now: float, tried: Collection[str]) -> Key | None:
        """The next attempt's key; ``route`` and ``provider`` then say where it goes."""
        picked = self.plan.pick(pool, now, tried)
        if picked is None:
            return None
        target, key = picked
        route = self._routes.get(target)
        if route is None:
            rest, query = self._path
            route = retarget(self._asked, target.upstream, rest, query, target.model)
            self._routes[target] = route
        self.route, self.provider, self.out.target = route, target.provider, target
        return key
