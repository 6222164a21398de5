"""Fixtures of the end-to-end tests: CRDs once per session, and a running loop per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import Loop, install_crds, values
from tests.kube.harness import KubeCluster


@pytest.fixture(scope="session")
def crds(kube: KubeCluster) -> None:
    install_crds(kube)


@pytest.fixture
def loop(kube: KubeCluster, crds: None, namespace: str, tmp_path: Path) -> Iterator[Loop]:
    """Pool ``p`` with keys key-1..3, the operator and proxies ``a`` and ``b``, all serving."""
    lp = Loop(kube, namespace, tmp_path)
    try:
        lp.start_fake()
        lp.apply_pool(values(3))
        lp.start_operator()
        proxies = lp.start_proxies(["a", "b"], lp.proxy_kubeconfig())
        for proxy in proxies:
            proxy.wait_ready(timeout=60)
        yield lp
    finally:
        lp.stop()


@pytest.fixture
def bare_loop(kube: KubeCluster, crds: None, namespace: str, tmp_path: Path) -> Iterator[Loop]:
    """A namespace with the fake provider running and nothing else: the test builds the rest."""
    lp = Loop(kube, namespace, tmp_path)
    try:
        lp.start_fake()
        yield lp
    finally:
        lp.stop()
