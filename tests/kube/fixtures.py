"""Pytest fixtures over tests/kube/harness.py; loaded via ``pytest_plugins`` in tests/conftest.py.

- ``kube`` (session): a running :class:`KubeCluster`, shared by every test in the session.
- ``namespace`` (function): a fresh ``t-xxxxxxxx`` namespace, deleted (without waiting) after.
- ``kubectl`` / ``helm`` (function): ``kube.kubectl`` / ``kube.helm``.
- ``app_image`` (session): the Side Proxy image of this tree, built by ``scripts/build-image.sh``
  (podman + the Dockerfile; cached in ~/.cache/sideproxy-image). Tests using it are marked
  ``pods``; so are the pod tests of tests/pods (their cluster fixture lives there).

The binaries are built (or found in the cache) once, right after collection and only when a
selected test uses ``kube`` (the image likewise, when one uses ``app_image``), so a cold build
never counts against a test's timeout.
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
from tests.kube.images import Image, build_app_image

Runner = Callable[..., subprocess.CompletedProcess[str]]

_BIN_DIR = pytest.StashKey[Path]()
_BUILD_ERROR = pytest.StashKey[str]()
_CLUSTER = pytest.StashKey[KubeCluster]()
_IMAGE = pytest.StashKey[Image]()
_IMAGE_ERROR = pytest.StashKey[str]()
# Fixtures that build the image or run pods: their tests get the `pods` marker.
POD_FIXTURES = ("app_image", "pod_cluster")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "kube: runs against the real etcd + kube-apiserver + kube-controller-manager of tests/kube",
    )
    config.addinivalue_line(
        "markers",
        "pods: builds the image (podman) or runs real pods on a one-node cluster in a network "
        "namespace (needs root; tests/kube/node.py)",
    )


def _uses(item: pytest.Item, names: tuple[str, ...]) -> bool:
    return any(name in getattr(item, "fixturenames", ()) for name in names)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselection looks at the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Anything that touches the cluster is `kube`, so `-m "not kube"` is the fast suite.
    for item in items:
        if "kube" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kube)
        if _uses(item, POD_FIXTURES):
            item.add_marker(pytest.mark.pods)


def _say(config: pytest.Config, line: str) -> None:
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)


def pytest_collection_finish(session: pytest.Session) -> None:
    config = session.config
    if config.option.collectonly:
        return
    if any(_uses(item, POD_FIXTURES) for item in session.items):
        _say(config, "tests/kube: building the image with scripts/build-image.sh (cached by input "
                     "hash; cold: ~3 min on 2 cores)")  # fmt: skip
        try:
            config.stash[_IMAGE] = build_app_image()
        except HarnessError as exc:
            config.stash[_IMAGE_ERROR] = str(exc)
    wanted = any(_uses(item, ("kube", *POD_FIXTURES)) for item in session.items)
    if not wanted:
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if not binaries_cached() and reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"tests/kube: building the Kubernetes test binaries with {BUILD_SCRIPT} "
                f"into {cached_bin_dir().parent} (cold: ~11 min on 2 cores, then cached)"
            )
    try:
        config.stash[_BIN_DIR] = build_binaries()
    except HarnessError as exc:
        config.stash[_BUILD_ERROR] = str(exc)


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest) -> Iterator[KubeCluster]:
    config = request.config
    # pytest.fail outside the except blocks: the harness message already says everything, and
    # "During handling of the above exception" would print it twice.
    error = config.stash.get(_BUILD_ERROR, None)
    bin_dir = config.stash.get(_BIN_DIR, None)
    if error is None and bin_dir is None:  # requested dynamically, after our collection hook
        try:
            bin_dir = build_binaries()
        except HarnessError as exc:
            error = str(exc)
    if error is not None or bin_dir is None:
        pytest.fail(error or "no Kubernetes binaries", pytrace=False)
    cluster = KubeCluster(bin_dir)
    try:
        cluster.start()
    except HarnessError as exc:
        error = (
            f"Kubernetes test control plane did not start (logs kept in {cluster.workdir}): {exc}"
        )
    if error is not None:
        pytest.fail(error, pytrace=False)
    config.stash[_CLUSTER] = cluster
    try:
        yield cluster
    finally:
        del config.stash[_CLUSTER]
        cluster.stop()


@pytest.fixture(scope="session")
def app_image(request: pytest.FixtureRequest) -> Image:
    """The image of this tree, built (or found cached) right after collection."""
    config = request.config
    error = config.stash.get(_IMAGE_ERROR, None)
    image = config.stash.get(_IMAGE, None)
    if error is None and image is None:  # requested dynamically, after our collection hook
        try:
            image = config.stash[_IMAGE] = build_app_image()
        except HarnessError as exc:
            error = str(exc)
    if error is not None or image is None:
        pytest.fail(error or "no image", pytrace=False)
    return image


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
        hint = "(the temp dir is removed at exit; SIDEPROXY_KUBE_KEEP=1 keeps it)\n"
        report.sections.append(("kube control plane logs", hint + cluster.log_tails()))
    return report
