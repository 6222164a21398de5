"""The harness itself, against the real control plane: the things the operator tests rely on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
import urllib3
from kubernetes import client as k8s_client
from kubernetes import watch as k8s_watch
from kubernetes.client.exceptions import ApiException

from tests.kube.harness import CommandError, KubeCluster, read_versions

pytestmark = pytest.mark.kube

GROUP = "harness.test.sideproxy.dev"
CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"widgets.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                            "status": {
                                "type": "object",
                                "properties": {"phase": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_watch_status_and_printer_column(kube: KubeCluster, namespace: str) -> None:
    kube.apply(CRD)
    kube.kubectl("wait", "--for=condition=Established", f"crd/widgets.{GROUP}", "--timeout=60s")
    api = k8s_client.CustomObjectsApi(kube.api_client())
    listing = (GROUP, "v1", namespace, "widgets")

    # The CRD's REST endpoint can lag Established by a moment; list until it answers.
    def list_rv() -> str:
        listed = cast(dict[str, Any], api.list_namespaced_custom_object(*listing))
        return str(listed["metadata"]["resourceVersion"])

    rv = kube.wait_for(list_rv, ignore=(ApiException,), message="widgets endpoint")

    body = {"apiVersion": f"{GROUP}/v1", "kind": "Widget",
            "metadata": {"name": "w1"}, "spec": {"size": 3}}  # fmt: skip
    api.create_namespaced_custom_object(*listing, body)

    # Watching from the list's resourceVersion must deliver the create as a real ADDED event.
    seen = None
    w = k8s_watch.Watch()  # type: ignore[no-untyped-call]
    for event in w.stream(  # type: ignore[no-untyped-call]
        api.list_namespaced_custom_object, *listing, resource_version=rv, timeout_seconds=30
    ):
        if event["type"] == "ADDED" and event["object"]["metadata"]["name"] == "w1":
            seen = event["object"]
            w.stop()  # type: ignore[no-untyped-call]
    assert seen is not None, "no ADDED event for w1 within 30s"
    assert seen["spec"] == {"size": 3}

    api.patch_namespaced_custom_object_status(
        GROUP, "v1", namespace, "widgets", "w1", {"status": {"phase": "Cooling"}}
    )
    table = kube.kubectl("get", f"widgets.{GROUP}", "w1", "-n", namespace).stdout.splitlines()
    header, row = table[0].split(), table[1].split()
    assert header[:2] == ["NAME", "PHASE"]
    assert row[:2] == ["w1", "Cooling"]


def test_service_account_rbac(kube: KubeCluster, namespace: str) -> None:
    kube.kubectl("create", "secret", "generic", "x", "-n", namespace, "--from-literal=k=v")
    sa_config = kube.service_account_kubeconfig(namespace, "reader")

    denied = kube.kubectl("get", "secret", "x", "-n", namespace, kubeconfig=sa_config, check=False)
    assert denied.returncode != 0
    assert "Forbidden" in denied.stderr
    assert f"system:serviceaccount:{namespace}:reader" in denied.stderr

    kube.apply(
        [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": "secret-reader"},
             "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": "secret-reader"},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                         "name": "secret-reader"},
             "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}]},
        ],
        namespace=namespace,
    )  # fmt: skip
    # The RBAC authorizer reads through an informer: the grant lands a moment after the write.
    got = kube.wait_for(
        lambda: kube.kubectl("get", "secret", "x", "-n", namespace, "-o", "name",
                             kubeconfig=sa_config),
        ignore=(CommandError,),
        message="RoleBinding to take effect",
    )  # fmt: skip
    assert got.stdout.strip() == "secret/x"
    # Still only what was granted.
    listed = kube.kubectl("get", "secrets", "-n", namespace, kubeconfig=sa_config, check=False)
    assert listed.returncode != 0
    assert "Forbidden" in listed.stderr


def test_aggregated_cluster_roles(kube: KubeCluster, namespace: str) -> None:
    # `view` has only an aggregationRule; its rules exist only if the aggregation controller runs.
    sa_config = kube.service_account_kubeconfig(namespace, "viewer")
    kube.kubectl(
        "create", "rolebinding", "viewer", "-n", namespace,
        "--clusterrole=view", f"--serviceaccount={namespace}:viewer",
    )  # fmt: skip
    kube.wait_for(
        lambda: kube.kubectl("get", "configmaps", "-n", namespace, kubeconfig=sa_config),
        ignore=(CommandError,),
        message="the view ClusterRole to grant list on configmaps",
    )


def test_owner_reference_garbage_collection(kube: KubeCluster, namespace: str) -> None:
    core = k8s_client.CoreV1Api(kube.api_client())
    owner = core.create_namespaced_config_map(
        namespace, k8s_client.V1ConfigMap(metadata=k8s_client.V1ObjectMeta(name="owner"))
    )
    assert owner.metadata is not None
    ref = k8s_client.V1OwnerReference(
        api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid
    )
    owned_meta = k8s_client.V1ObjectMeta(name="owned", owner_references=[ref])
    core.create_namespaced_config_map(namespace, k8s_client.V1ConfigMap(metadata=owned_meta))
    kube.kubectl("delete", "configmap", "owner", "-n", namespace)

    def owned_gone() -> bool:
        try:
            core.read_namespaced_config_map("owned", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    kube.wait_for(owned_gone, timeout=60, interval=0.5, message="GC of the owned ConfigMap")


def test_versions(kube: KubeCluster) -> None:
    pinned = read_versions()
    info = k8s_client.VersionApi(kube.api_client()).get_code()
    assert info.git_version == pinned["K8S_VERSION"]

    client = json.loads(kube.kubectl("version", "--client", "-o", "json").stdout)
    assert client["clientVersion"]["gitVersion"] == pinned["K8S_VERSION"]

    assert kube.helm("version", "--short").stdout.startswith(pinned["HELM_VERSION"])


def test_helm_template_and_install(kube: KubeCluster, namespace: str, tmp_path: Path) -> None:
    major, minor = read_versions()["K8S_VERSION"].lstrip("v").split(".")[:2]
    chart = tmp_path / "caps"
    (chart / "templates").mkdir(parents=True)
    (chart / "Chart.yaml").write_text("apiVersion: v2\nname: caps\nversion: 0.1.0\n")
    caps = "{{ .Capabilities.KubeVersion.Major }}.{{ .Capabilities.KubeVersion.Minor }}"
    (chart / "templates" / "cm.yaml").write_text(
        f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: caps}}\ndata: {{kube: '{caps}'}}\n"
    )
    # Offline rendering uses helm's built-in default, which the build pins to the cluster's.
    rendered = kube.helm("template", "caps", str(chart)).stdout
    assert f"kube: '{major}.{minor}'" in rendered

    kube.helm("install", "caps", str(chart), "-n", namespace, "--wait", "--timeout=60s")
    got = kube.kubectl("get", "configmap", "caps", "-n", namespace, "-o", "jsonpath={.data.kube}")
    assert got.stdout == f"{major}.{minor}"
    assert "caps" in kube.helm("list", "-n", namespace, "-q").stdout.split()


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_apiserver_restart(kube: KubeCluster, namespace: str, crash: bool) -> None:
    core = k8s_client.CoreV1Api(kube.api_client())
    survivor = k8s_client.V1ConfigMap(metadata=k8s_client.V1ObjectMeta(name="survivor"))
    core.create_namespaced_config_map(namespace, survivor)

    with kube.apiserver_down(crash=crash):
        down = kube.kubectl("get", "namespaces", "--request-timeout=5s", check=False)
        assert down.returncode != 0
        with pytest.raises(urllib3.exceptions.HTTPError):
            core.list_namespace(_request_timeout=5)

    # Same port, same etcd: the old client reconnects and the data is still there.
    cm = core.read_namespaced_config_map("survivor", namespace)
    assert cm.metadata is not None
    assert cm.metadata.name == "survivor"
    kube.kubectl("get", "namespace", namespace)
