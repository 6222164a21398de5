"""The chart's pods, for real: helm install on a one-node cluster, and backends calling the Service.

One release for the module (namespace ``sp``, release and pool ``team-a``, upstream: the fake
provider as a Deployment), in the order a user lives it: install, serve, a 429, an upgrade, a
pod lost under load, the operator lost, uninstall. Each test needs only what the ``serving``
fixture re-establishes, so any one of them also runs alone (``-k``).

Everything runs inside the node's network namespace: the pods, kubectl and helm, and the backends
(the official openai SDK, tests/pods/client.py, under nsenter). Nothing leaves the machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.kube.images import Image
from tests.kube.node import PodCluster
from tests.pods.client import MODEL
from tests.pods.release import (
    CHART,
    FAKE,
    KEYS,
    OPERATOR,
    POOL,
    PROXY,
    RELEASE,
    Release,
    names,
    wait,
)

pytestmark = [pytest.mark.kube, pytest.mark.pods, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def release(
    pod_cluster: PodCluster, app_image: Image, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Release]:
    """The chart installed with this tree's image, and the fake provider; no pool yet."""
    rel = Release(pod_cluster, app_image, tmp_path_factory.mktemp("release"))
    rel.install()
    rel.deploy_fake()
    try:
        yield rel
    finally:
        pod_cluster.helm("uninstall", RELEASE, "-n", rel.ns, "--wait=false", check=False)
        pod_cluster.delete_namespace(rel.ns, wait=False)


def _serve(release: Release) -> Release:
    """The pool applied, the operator and both proxies Ready (re-applied if a test removed it)."""
    if not release.kubectl("get", "deployment", PROXY, "--ignore-not-found").stdout:
        release.install()
    release.apply_pool()
    release.wait_available(OPERATOR)
    release.wait_available(PROXY)
    release.fake("/_fake/reset", {})
    return release


@pytest.fixture
def serving(release: Release) -> Release:
    return _serve(release)


def _proxy_pods_ready(rel: Release) -> list[dict[str, Any]]:
    pods = rel.pods("proxy")
    return pods if len(pods) == 2 and all(rel.ready(p) for p in pods) else []


def test_install_pods_become_ready_through_their_own_probes(release: Release) -> None:
    rel = release
    rel.kubectl("delete", "creditpool", POOL, "--ignore-not-found", "--wait=true")
    rel.wait_available(OPERATOR)
    operator = rel.pods("operator")
    assert len(operator) == 1
    assert rel.ready(operator[0])

    # No pool yet: the proxies run (their liveness probe passes) but /readyz says no routing
    # table, so they stay out of the Service. That is the probe at work, not a fixed delay.
    def running() -> list[dict[str, Any]]:
        pods = rel.pods("proxy")
        started = [p for p in pods if all(
            s.get("started") for s in p.get("status", {}).get("containerStatuses", [])
        )]  # fmt: skip
        return started if len(pods) == 2 and len(started) == 2 else []

    for pod in wait(running, message="two proxy containers started"):
        assert not rel.ready(pod), f"{pod['metadata']['name']} Ready without a pool"
    slices = rel.get("endpointslices", "-l", f"kubernetes.io/service-name={PROXY}")["items"]
    serving = [e for s in slices for e in s.get("endpoints") or [] if e["conditions"].get("ready")]
    assert not serving, "the Service routes to proxies that have no routing table"

    rel.apply_pool()
    pods = wait(lambda: _proxy_pods_ready(rel), message="both proxies Ready")
    for pod in pods:
        container = pod["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert pod["spec"]["securityContext"]["runAsUser"] == 10001
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
        # The token came from the ServiceAccount admission plugin: in-cluster config is real.
        volumes = [v["name"] for v in pod["spec"]["volumes"]]
        assert any(v.startswith("kube-api-access-") for v in volumes), volumes


def test_openai_sdk_through_the_proxy_service_gets_200s(serving: Release) -> None:
    rel = serving
    result = rel.run_client("chat", "--base-url", rel.service_url, "20")
    assert result == {"ok": 20, "errors": []}
    served = rel.fake("/_fake/stats")  # {fingerprint: requests}
    assert sum(served.values()) >= 20, served
    # Nothing a key's value: the stats name keys by fingerprint only.
    assert not any(value in str(served) for value in KEYS.values())


def test_a_429_seen_by_a_proxy_pod_shows_in_kubectl_get_poolkeys(serving: Release) -> None:
    rel = serving
    before = rel.poolkeys_table()
    assert before["key-1"]["429S"] in ("", "<none>", "0"), before
    # key-1's next request upstream gets a 429 (with a retry-after, so it cools for a while).
    rel.fake("/_fake/config", {"faults": {KEYS["key-1"]: [
        {"action": "status", "status": 429, "retry_after": 60}
    ]}})  # fmt: skip

    def saw_429() -> bool:
        result = rel.run_client("chat", "--base-url", rel.service_url, "4")
        # The proxy retries the 429 on key-2: the backend never sees it.
        assert result["errors"] == [], result
        statuses = rel.fake("/_fake/stats/status")
        return any("429" in counts for counts in statuses.values())

    wait(saw_429, timeout=60, message="the fake provider answered key-1 with a 429")

    def shown() -> dict[str, str]:
        # A 429 counts in 429S; the key rests either for every model (STATE CoolingDown) or for
        # the model asked (STATE stays Ready, COOLING names the model): both are what a user sees.
        row = rel.poolkeys_table()["key-1"]
        counted = row["429S"] not in ("", "<none>", "0")
        cooling = row["STATE"] == "CoolingDown" or MODEL in row.get("COOLING", "")
        return row if counted and cooling else {}

    row = wait(shown, timeout=90, message="kubectl get poolkeys shows key-1's 429 and cool-down")
    assert int(row["429S"]) >= 1
    key_2 = rel.poolkeys_table()["key-2"]
    assert key_2["STATE"] == "Ready", key_2
    assert key_2.get("COOLING", "") in ("", "<none>"), key_2


def test_helm_upgrade_rolls_the_proxies_with_no_failed_request(serving: Release) -> None:
    rel = serving
    old = names(rel.pods("proxy"))
    load = rel.start_client("load", "--base-url", rel.service_url, "--workers", "4")
    try:
        rel.helm("upgrade", str(CHART), "--reuse-values", "--set", "proxy.logLevel=DEBUG")
        rel.wait_available(PROXY)
        time.sleep(2)  # traffic on the new pods alone, after the last old one has gone
    finally:
        result = rel.finish_client(load)
    new = rel.pods("proxy")
    assert len(new) == 2
    assert not names(new) & old, "the proxies were not replaced"
    for pod in new:
        assert "--log-level=DEBUG" in pod["spec"]["containers"][0]["args"]
    assert result["errors"] == [], result["errors"][:5]
    assert result["ok"] > 20, result
    pdb = rel.get("pdb", PROXY)
    assert pdb["spec"]["minAvailable"] == 1


@dataclass(frozen=True)
class PodLoss:
    """What the backends saw while one proxy pod was deleted: the load through the Service, and
    3 long streams opened straight to each pod (so each stream's pod is known)."""

    load: dict[str, Any]
    cut: list[dict[str, Any]]  # the deleted pod's streams
    kept: list[dict[str, Any]]  # the other pod's streams


@pytest.fixture(scope="module")
def pod_deleted_under_load(release: Release) -> PodLoss:
    rel = _serve(release)
    victim, survivor = sorted(rel.pods("proxy"), key=lambda p: p["metadata"]["name"])
    victim_name = victim["metadata"]["name"]
    victim_url = f"http://{victim['status']['podIP']}:8080/v1"
    survivor_url = f"http://{survivor['status']['podIP']}:8080/v1"
    # Streams of 60 chunks, 0.5 s apart: ~30 s, longer than the victim's grace (5 s preStop +
    # 10 s shutdown-timeout), so its streams are cut; the survivor's run to the end.
    rel.fake("/_fake/config", {"stream_chunks": 60, "stream_interval_ms": 500})
    try:
        streams = rel.start_client(
            "streams", "--url", victim_url, "--url", survivor_url, "--per", "3"
        )
        load = rel.start_client("load", "--base-url", rel.service_url, "--workers", "2")
        try:
            rel.kubectl("delete", "pod", victim_name, "--wait=false")
            wait(
                lambda: victim_name not in names(_proxy_pods_ready(rel)) and _proxy_pods_ready(rel),
                message="a replacement proxy Ready",
            )
        finally:
            result = rel.finish_client(load)
        outcome = rel.finish_client(streams, timeout=180)["streams"]
    finally:
        rel.fake("/_fake/config", {"stream_chunks": 5, "stream_interval_ms": 0})
    return PodLoss(
        load=result,
        cut=[s for s in outcome if s["url"] == victim_url],
        kept=[s for s in outcome if s["url"] == survivor_url],
    )


def test_a_proxy_pod_deleted_under_load_loses_only_its_in_flight_streams(
    pod_deleted_under_load: PodLoss,
) -> None:
    loss = pod_deleted_under_load
    assert loss.load["errors"] == [], loss.load["errors"][:5]  # new requests: all served
    assert loss.load["ok"] > 0
    assert [s["outcome"] for s in loss.kept] == ["done"] * 3, loss.kept
    # The deleted pod's streams ended (none hung) part-way, after its grace period.
    assert len(loss.cut) == 3
    assert all(s["outcome"] != "done" and 0 < s["chunks"] < 60 for s in loss.cut), loss.cut


def test_each_stream_cut_by_a_deleted_proxy_pod_ends_with_an_error_event(
    pod_deleted_under_load: PodLoss,
) -> None:
    """Never a silent truncation a client could take for a whole answer: the SDK raises APIError
    from an error event, not a connection error."""
    assert [s["outcome"] for s in pod_deleted_under_load.cut] == ["error_event"] * 3, (
        pod_deleted_under_load.cut
    )


def test_the_operator_pod_killed_a_new_one_takes_the_lease_and_converges(
    serving: Release,
) -> None:
    rel = serving
    (old,) = rel.pods("operator")
    old_name = old["metadata"]["name"]

    def holder() -> str:
        # The holder identity is the pod's name plus a per-process suffix.
        value: str = rel.get("lease", OPERATOR)["spec"].get("holderIdentity") or ""
        return value

    assert holder().startswith(f"{old_name}-")
    rel.kubectl("delete", "pod", old_name, "--grace-period=0", "--force")

    def new_holder() -> str:
        value = holder()
        return value if value and not value.startswith(f"{old_name}-") else ""

    taken = wait(new_holder, message="a new operator holds the Lease")
    assert any(taken.startswith(f"{name}-") for name in names(rel.pods("operator"))), taken

    # Converges: a key added now gets its status and reaches the proxies' routing table.
    rel.cluster.apply({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late-key"},
        "type": "Opaque", "stringData": {"value": "fk-CANARY-pods-late-xxxxxxxxxxxxxxxx"},
    }, rel.ns)  # fmt: skip
    rel.cluster.apply({
        "apiVersion": "sideproxy.dev/v1alpha1", "kind": "PoolKey", "metadata": {"name": "key-late"},
        "spec": {"pool": POOL, "provider": "custom",
                 "secretRef": {"name": "late-key", "key": "value"}},
    }, rel.ns)  # fmt: skip
    try:
        # Ready, not just any status: a first pass may see the key before its Secret
        # (SecretNotResolved), and only a usable key is in the table.
        def ready() -> bool:
            return rel.poolkeys_table().get("key-late", {}).get("STATE") == "Ready"

        wait(ready, message="the new operator made key-late Ready")

        def in_table() -> bool:
            routing = rel.get("configmap", f"{POOL}-routing")
            return "key-late" in str(routing.get("data"))

        wait(in_table, message="key-late reached the routing table")
    finally:
        rel.kubectl("delete", "poolkey", "key-late", "--ignore-not-found")
        rel.kubectl("delete", "secret", "late-key", "--ignore-not-found")


def test_helm_uninstall_leaves_the_crds_and_the_pools(serving: Release) -> None:
    rel = serving
    rel.cluster.helm("uninstall", RELEASE, "-n", rel.ns, "--wait", "--timeout=120s", timeout=180)
    assert not rel.kubectl("get", "deployments", "-l", "app.kubernetes.io/name=sideproxy",
                           "-o", "name").stdout.strip()  # fmt: skip
    for crd in ("creditpools.sideproxy.dev", "poolkeys.sideproxy.dev"):
        assert rel.cluster.kubectl("get", "crd", crd, "-o", "name").stdout.strip()
    assert rel.kubectl("get", "creditpool", POOL, "-o", "name").stdout.strip()
    assert set(rel.poolkeys_table()) >= set(KEYS)
    # The upstream is the user's and stays too.
    assert rel.pods(FAKE)


def test_nothing_in_the_node_namespace_routes_out(pod_cluster: PodCluster) -> None:
    """The premise of the whole module: pods and clients reach only each other."""
    routes = pod_cluster.in_net(lambda: Path("/proc/thread-self/net/route").read_text())
    destinations = [line.split()[1] for line in routes.splitlines()[1:]]
    assert "00000000" not in destinations, routes  # no default route
    dev = pod_cluster.in_net(lambda: Path("/proc/thread-self/net/dev").read_text())
    links = {line.split(":")[0].strip() for line in dev.splitlines()[2:]}
    # Loopback, the pod bridge and the pods' veth ends: no interface that leads anywhere else.
    assert {link for link in links if not link.startswith("veth")} == {"lo", "cni0"}, links
