"""The one-node cluster of the pod tests (tests/kube/node.py), once for tests/pods, then removed.

It needs the eight Kubernetes binaries of ``make k8s`` (built after collection by
tests/kube/fixtures.py), the image of this tree (``app_image``, likewise) and the pause image;
containerd, runc and the CNI plugins come from Debian's packages, installed when missing.
A failed build or start-up fails the tests loudly, with the daemons' log tails.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from tests.kube.harness import HarnessError, build_binaries
from tests.kube.images import Image, build_pause_image
from tests.kube.node import PodCluster

_NODE = pytest.StashKey[PodCluster]()


# Package scope: the node (about 1.5 GiB and some CPU) goes away as soon as tests/pods is done,
# instead of weighing on the rest of the suite.
@pytest.fixture(scope="package")
def pod_cluster(request: pytest.FixtureRequest, app_image: Image) -> Iterator[PodCluster]:
    error = ""
    cluster: PodCluster | None = None
    try:
        cluster = PodCluster(build_binaries(), pause=build_pause_image(), images=[app_image])
        cluster.start()
    except HarnessError as exc:
        error = f"the pod test cluster did not start: {exc}"
    if error or cluster is None:
        pytest.fail(error, pytrace=False)
    request.config.stash[_NODE] = cluster
    try:
        yield cluster
    finally:
        del request.config.stash[_NODE]
        cluster.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    cluster = item.config.stash.get(_NODE, None)
    if report.failed and cluster is not None:
        hint = "(SIDEPROXY_KUBE_KEEP=1 keeps the daemons' logs in the temp dir)\n"
        report.sections.append(("pod cluster logs", hint + cluster.node_logs()))
    return report
