"""A proxy with VirtualKeys in front of the fake provider; the official SDKs as clients."""

from __future__ import annotations

from typing import Any

import pytest

from sideproxy.fake_provider import FakeProvider
from tests.proxy.conftest import (  # noqa: F401 - fixtures, re-exported for this folder
    API,
    SECRETS,
    K,
    Proxy,
    StartProxy,
    fake,
    http,
    manifests,
    snapshot,
    start_proxy,
)

# Distinctive values: tests grep logs, metrics, bodies and statuses for them.
VK_VALUES = {
    "batch": "vk-CANARY-batch-0123456789abcdef0123",
    "web": "vk-CANARY-web-0123456789abcdef01234",
    "free": "vk-CANARY-free-0123456789abcdef0123",
}
ANONYMOUS = "vk-CANARY-anonymous-0123456789abcdef"


class Clock:
    """Unix time the test moves by hand: a window never rolls over mid-test."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def vk_docs(provider: FakeProvider, **specs: dict[str, Any]) -> list[dict[str, Any]]:
    """Pool ``test`` (two keys of the fake) + one VirtualKey per kwarg (name -> spec extras),
    values in Secret ``clients``; ``clientAuth`` adds the anonymous key."""
    docs = manifests(
        {"custom": provider.base_url}, [K("key-1", SECRETS[0]), K("key-2", SECRETS[1])]
    )
    docs[0]["spec"]["clientAuth"] = {"secretRef": {"name": "clients", "key": "anonymous"}}
    docs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "clients"},
            "stringData": {**VK_VALUES, "anonymous": ANONYMOUS},
        }
    )
    for name, extra in specs.items():
        docs.append(
            {
                "apiVersion": API,
                "kind": "VirtualKey",
                "metadata": {"name": name},
                "spec": {"pool": "test", "secretRef": {"name": "clients", "key": name}, **extra},
            }
        )
    return docs


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def start_vk_proxy(
    fake: FakeProvider,  # noqa: F811 - the fixture
    start_proxy: StartProxy,  # noqa: F811 - the fixture
    clock: Clock,
) -> Any:
    async def start(**specs: dict[str, Any]) -> Proxy:
        return await start_proxy(snapshot(vk_docs(fake, **specs)), clock=clock)

    return start
