"""A real Kubernetes control plane for the test suite (see harness.py and fixtures.py)."""

from tests.kube.harness import CommandError, HarnessError, KubeCluster, build_binaries, wait_for

__all__ = ["CommandError", "HarnessError", "KubeCluster", "build_binaries", "wait_for"]
