"""One ReplicaReport channel per replica (``sideproxy/proxy/_channel.py``): one writer and one
watch for both parts of the report, health (``_replicas.HealthPart``) and virtual-key usage
(``_vkshare.UsagePart``).

The parts alone, without a cluster (fast); then the channel in this process against the real
API server, with every request it makes counted at the client.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes_asyncio.client import ApiClient
from prometheus_client import CollectorRegistry

from sideproxy.kubeclient import api_client
from sideproxy.pool import KeyConfig, ManagedCreditPool
from sideproxy.proxy._admit import ACTIVE_HEARTBEAT, Admission
from sideproxy.proxy._auth import Identity
from sideproxy.proxy._channel import ReportChannel
from sideproxy.proxy._replicas import HealthPart
from sideproxy.proxy._vkshare import PUBLISH_INTERVAL, UsagePart
from sideproxy.wire import HEARTBEAT_SECONDS, PLURAL, report_name
from tests.e2e.cluster import GROUP, VERSION
from tests.kube.harness import KubeCluster

NOW = 1_800_000_000.0
VK = Identity("batch", b"digest")


def admission(configured: bool = True) -> Admission:
    adm = Admission(CollectorRegistry(), window=60.0, clock=lambda: NOW)
    if configured:
        adm.configure({"batch": None}, ["m"])
    return adm


# ---------------------------------------------------------------------------- the parts, pure


def test_usage_part_asks_for_nothing_without_virtual_keys_or_while_idle() -> None:
    adm = admission(configured=False)
    part = UsagePart("p", "r-1", adm, clock=lambda: NOW)
    assert part.due(10.0) is None  # a table without VirtualKeys: no write for them, ever
    adm.configure({"batch": None}, ["m"])
    assert part.due(10.0) is not None
    assert part.take(NOW, 10.0) is None  # nothing used yet: an idle replica stays invisible
    assert part.due(10.0) is None


def test_usage_part_claims_count_only_after_a_write_and_keep_their_pace() -> None:
    adm = admission()
    published: list[Any] = []
    real = adm.published
    adm.published = lambda entries: (published.append(list(entries)), real(entries))[1]  # type: ignore[method-assign]
    part = UsagePart("p", "r-1", adm, clock=lambda: NOW)
    adm.admit(VK, "m").close()
    fields = part.take(NOW, 10.0)
    assert fields is not None
    assert [e["name"] for e in fields["virtualKeys"]] == ["batch"]
    assert fields["usageHeartbeat"] == NOW
    part.failed()  # the write failed: not published, and due again
    assert published == []
    fields = part.take(NOW, 10.0)
    assert fields is not None
    part.written(fields, 10.0)
    assert published == [fields["virtualKeys"]]
    adm.admit(VK, "m").close()  # news: at most every PUBLISH_INTERVAL
    assert part.due(10.0) == pytest.approx(10.0 + PUBLISH_INTERVAL)
    part.written(part.take(NOW, 10.1) or {}, 10.1)
    assert part.due(10.1) == pytest.approx(10.1 + ACTIVE_HEARTBEAT)  # active: a heartbeat


def test_health_part_is_due_at_once_on_news_and_on_its_heartbeat_otherwise() -> None:
    part = HealthPart("p", "r-1", clock=lambda: NOW)
    assert part.take(NOW, 5.0) is None  # no pool yet: nothing to say
    assert part.due(5.0) == 5.0 + HEARTBEAT_SECONDS
    part.attach(ManagedCreditPool([KeyConfig("key-1", "custom", "sk-CANARY-channel-1")]))
    assert part.due(6.0) == 6.0
    fields = part.take(NOW, 6.0)
    assert fields is not None
    assert (fields["pool"], fields["replica"], fields["heartbeat"]) == ("p", "r-1", NOW)
    assert "virtualKeys" not in fields  # a merge patch of health never erases the claims
    part.failed()
    assert part.due(7.0) == 7.0
    fields = part.take(NOW, 7.0)
    assert fields is not None
    part.written(fields, 7.0)
    assert part.due(7.0) == 7.0 + HEARTBEAT_SECONDS


# ---------------------------------------------------------------------------- on the API server


class Counted:
    """Every request the channel's API client makes: how many, and how many writes at once."""

    def __init__(self, api: ApiClient) -> None:
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.writing = 0
        self.most_writing = 0
        inner: Callable[..., Awaitable[Any]] = api.request

        async def request(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            query = dict(kwargs.get("query_params") or (args[0] if args else None) or ())
            self.requests.append((method, url, query))
            write = method in ("PATCH", "POST", "PUT")
            self.writing += write
            self.most_writing = max(self.most_writing, self.writing)
            try:
                return await inner(method, url, *args, **kwargs)
            finally:
                self.writing -= write

        api.request = request  # type: ignore[method-assign]

    def reports(self, *, watch: bool) -> int:
        return sum(
            1
            for method, url, query in self.requests
            if method == "GET"
            and url.endswith(f"/{PLURAL}")
            and str(query.get("watch", "")).lower() in (("true",) if watch else ("", "false"))
        )


async def wait_for(predicate: Callable[[], object], what: str) -> None:
    """Poll a condition (not a wait for a gap of time) for at most 30 s."""
    async with asyncio.timeout(30):
        while not predicate():  # noqa: ASYNC110 - the channel has no event for each of these
            await asyncio.sleep(0.02)
    assert predicate(), what


@pytest.mark.kube
async def test_one_replica_holds_one_watch_and_one_writer_for_both_parts(
    kube: KubeCluster, crds: None, namespace: str
) -> None:
    async with api_client(str(kube.kubeconfig)) as api:
        counted = Counted(api)
        channel = ReportChannel(api, namespace, "p", "r-1")
        health = HealthPart("p", "r-1", poke=channel.poke)
        adm = Admission(CollectorRegistry(), window=60.0)
        adm.configure({"batch": None}, ["m"])
        usage = UsagePart("p", "r-1", adm, poke=channel.poke)
        channel.add(health)
        channel.add(usage)
        pool = ManagedCreditPool([KeyConfig("key-1", "custom", "sk-CANARY-channel-1")])
        health.attach(pool)
        task = asyncio.create_task(channel.run())
        try:
            await wait_for(channel.listed.is_set, "the listing")
            for _ in range(20):  # both parts have news, over and over
                adm.admit(VK, "m").close()
                health.attach(pool)  # health news: due at once
                await asyncio.sleep(0)
            await wait_for(lambda: channel.writes >= 3, "a few writes")

            def report() -> dict[str, Any]:
                return dict(
                    kube_custom(kube).get_namespaced_custom_object(
                        GROUP, VERSION, namespace, PLURAL, report_name("p", "r-1")
                    )["spec"]
                )

            await wait_for(lambda: report().get("virtualKeys"), "the usage written")
            spec = report()
            assert spec["incarnation"] == channel.incarnation
            assert [e["name"] for e in spec["virtualKeys"]] == ["batch"]
            assert spec["heartbeat"] > 0
            # One watch of the pool's reports (its list may be retried: a young API server
            # can answer 429), and never two writes at once.
            assert counted.reports(watch=True) == 1
            assert counted.reports(watch=False) >= 1
            assert counted.most_writing == 1
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@pytest.mark.kube
async def test_a_replica_without_virtual_keys_writes_none(
    kube: KubeCluster, crds: None, namespace: str
) -> None:
    async with api_client(str(kube.kubeconfig)) as api:
        channel = ReportChannel(api, namespace, "p", "r-2")
        health = HealthPart("p", "r-2", poke=channel.poke)
        channel.add(health)
        channel.add(UsagePart("p", "r-2", admission(configured=False), poke=channel.poke))
        health.attach(ManagedCreditPool([KeyConfig("key-1", "custom", "sk-CANARY-channel-2")]))
        task = asyncio.create_task(channel.run())
        try:
            await wait_for(lambda: channel.writes >= 1, "the first write")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    spec = kube_custom(kube).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, report_name("p", "r-2")
    )["spec"]
    assert spec["incarnation"] == channel.incarnation
    assert not {"virtualKeys", "usageHeartbeat", "windowSeconds"} & set(spec)


def kube_custom(kube: KubeCluster) -> Any:
    return k8s.CustomObjectsApi(kube.api_client())
