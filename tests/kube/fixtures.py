"""Pytest fixtures over tests/kube/harness.py; loaded via ``pytest_plugins`` in tests/conftest.py.

- ``kube`` (session): a running :class:`KubeCluster`, shared by every test in the session.
- ``namespace`` (function): a fresh ``t-xxxxxxxx`` namespace, deleted (without waiting) after.
- ``kubectl`` / ``helm`` (function): ``kube.kubectl`` / ``kube.helm``.

The binaries are built (or found in the cache) once, right after collection and only when a
selected test uses ``kube``, so a cold ~20 minute build never counts against a test's timeout.
A failed build or start-up fails the tests loudly, with log tails; nothing is ever skipped.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.kube.harness import (
    BUILD_SCRIPT,
    HarnessError,
    KubeCluster,
    binaries_cached,
    build_binaries,
    cached_bin_dir,
)

Runner = Callable[..., subprocess.CompletedProcess[str]]

_BIN_DIR = pytest.StashKey[Path]()
_BUILD_ERROR = pytest.StashKey[str]()
_CLUSTER = pytest.StashKey[KubeCluster]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kube: runs against the real etcd + kube-apiserver + kube-controller-manager of tests/kube",
    )


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    wanted = any("kube" in getattr(item, "fixturenames", ()) for item in session.items)
    if config.option.collectonly or not wanted:
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if not binaries_cached() and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"tests/kube: building the Kubernetes test binaries with {BUILD_SCRIPT} "
                f"into {cached_bin_dir().parent} (cold: ~20-30 min on 2 cores, then cached)"
            )
    try:
        config.stash[_BIN_DIR] = build_binaries()
    except HarnessError as exc:
        config.stash[_BUILD_ERROR] = str(exc)


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    config = request.config
    if _BUILD_ERROR in config.stash:
        pytest.fail(config.stash[_BUILD_ERROR], pytrace=False)
    try:
        bin_dir = config.stash[_BIN_DIR]
    except KeyError:  # collected in a way that skipped our hook (e.g. requested dynamically)
        try:
            bin_dir = build_binaries()
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
    cluster = KubeCluster(bin_dir)
    try:
        cluster.start()
    except HarnessError as exc:
        pytest.fail(
            f"Kubernetes test control plane did not start (logs kept in {cluster.workdir}): {exc}",
            pytrace=False,
        )
    config.stash[_CLUSTER] = cluster
    try:
        yield cluster
    finally:
        del config.stash[_CLUSTER]
        cluster.stop()


@pytest.fixture
def namespace(kube: KubeCluster) -> Iterator[str]:
    kube.ensure_running()  # a previous test may have left the apiserver stopped
    name = kube.create_namespace()
    yield name
    kube.ensure_running()
    kube.delete_namespace(name, wait=False)


@pytest.fixture
def kubectl(kube: KubeCluster) -> Runner:
    return kube.kubectl


@pytest.fixture
def helm(kube: KubeCluster) -> Runner:
    return kube.helm


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    cluster = item.config.stash.get(_CLUSTER, None)
    if report.failed and cluster is not None and "kube" in getattr(item, "fixturenames", ()):
        report.sections.append(("kube control plane logs", cluster.log_tails()))
    return report
