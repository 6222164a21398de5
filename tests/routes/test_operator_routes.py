"""The operator with routes, against the in-memory API server of tests/operator/fakes.py: a
route is carried into the table; a route no key may serve is refused with the pool's Ready
condition naming it, and the last good table stays."""

from __future__ import annotations

from sideproxy.models import TableRoute, TableTarget
from tests.operator.fakes import FakeKube, key, pool
from tests.operator.test_reconcile import NS, Clock, fake, reconciler, status, table

__all__ = ["fake"]  # the fixture, used by name

ROUTED = {
    "providers": [{"name": "groq"}, {"name": "openai"}],
    "routes": [
        {
            "model": "fast",
            "targets": [
                {"provider": "groq", "model": "llama-3.1-8b-instant"},
                {"provider": "openai", "model": "gpt-4o-mini"},
            ],
        }
    ],
}


async def test_route_reaches_the_table_and_a_bad_one_keeps_the_last(fake: FakeKube) -> None:
    clock = Clock()
    fake.put("creditpools", pool(NS, "p", ROUTED))
    rec = reconciler(fake, clock)
    await rec.reconcile((NS, "p"))
    good = table(fake)
    assert good.routes == [
        TableRoute(
            model="fast",
            targets=[
                TableTarget(provider="groq", model="llama-3.1-8b-instant", order=0, weight=1),
                TableTarget(provider="openai", model="gpt-4o-mini", order=1, weight=1),
            ],
        )
    ]

    # The only OpenAI key may now serve gpt-4o only: route fast cannot send gpt-4o-mini.
    fake.put("poolkeys", key(NS, "k-c", "p", "openai", "key", provider="openai", models=["gpt-4o"]))
    clock.now += 1
    await rec.reconcile((NS, "p"))
    ready = {c["type"]: c for c in status(fake, "creditpools", "p")["conditions"]}["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert ready["message"] == (
        "route fast: no PoolKey of provider 'openai' may serve model 'gpt-4o-mini' (spec.models)"
    )
    assert table(fake) == good  # the last good table keeps serving
