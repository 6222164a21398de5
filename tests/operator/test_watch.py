"""The metadata watch (``sideproxy/operator/_watch.py``) against a scripted API: pages, 410,
and surviving whatever a broken connection raises. The real API server's side is in
tests/operator/test_kube_faults.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from sideproxy.operator._watch import MetaWatch


class Scripted:
    """list_meta pages and watch_meta streams, one script item per call."""

    def __init__(self, pages: list[dict[str, Any]], watches: list[Any]) -> None:
        self.pages = pages
        self.watches = watches
        self.params: list[dict[str, str]] = []

    async def list_meta(
        self, plural: str, namespace: str | None, params: Mapping[str, str]
    ) -> dict[str, Any]:
        self.params.append(dict(params))
        return self.pages.pop(0)

    async def watch_meta(
        self, plural: str, namespace: str | None, params: Mapping[str, str], seconds: float
    ) -> AsyncIterator[dict[str, Any]]:
        script = self.watches.pop(0) if self.watches else []
        if isinstance(script, BaseException):
            raise script
        for event in script:
            yield event
        await asyncio.Event().wait()  # then hang, like an idle watch


def meta(name: str, rv: str) -> dict[str, Any]:
    return {"namespace": "ns", "name": name, "resourceVersion": rv}


async def test_pages_then_events_and_it_survives_anything() -> None:
    pages = [
        {"items": [{"metadata": meta("a", "1")}], "metadata": {"continue": "t1"}},
        {"items": [{"metadata": meta("b", "2")}], "metadata": {"resourceVersion": "5"}},
        {"items": [{"metadata": meta("b", "9")}], "metadata": {"resourceVersion": "9"}},
    ]
    watches: list[Any] = [
        RuntimeError("a connection broken in a way nobody listed"),
        [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}],  # -> list again
        [{"type": "DELETED", "object": {"metadata": meta("a", "10")}}],
    ]
    api = Scripted(pages, watches)
    seen: list[tuple[str, bool]] = []
    listed: list[set[tuple[str, str]]] = []
    done = asyncio.Event()

    def on_event(m: Mapping[str, Any], deleted: bool) -> None:
        seen.append((str(m["name"]), deleted))
        if deleted:
            done.set()

    watch = MetaWatch(
        api,  # type: ignore[arg-type]
        "secrets",
        ["ns"],
        on_event,
        on_listed=lambda ns, names: listed.append(names),
        page=1,
    )
    watch._retry_max = 0.01
    task = asyncio.create_task(watch.run())
    try:
        async with asyncio.timeout(10):
            await done.wait()
    finally:
        task.cancel()
    assert seen == [("a", False), ("b", False), ("b", False), ("a", True)]
    assert listed == [{("ns", "a"), ("ns", "b")}, {("ns", "b")}]
    assert api.params[0] == {"limit": "1"}
    assert api.params[1] == {"limit": "1", "continue": "t1"}
    assert watch.listed.is_set()
