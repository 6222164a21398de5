"""How the proxy and the operator reach the API server: one credential loader for both.

In a pod (``KUBERNETES_SERVICE_HOST`` set) and without an explicit kubeconfig: the mounted
service account. Otherwise the kubeconfig file (``$KUBECONFIG`` / ``~/.kube/config`` when
``kubeconfig`` is None). The result is a ``kubernetes_asyncio`` ``Configuration`` of our own,
never the library's process-wide default, so two clients in one process cannot step on each
other.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration

__all__ = ["api_client", "load_configuration"]


async def load_configuration(kubeconfig: str | None = None) -> Configuration:
    """In-cluster credentials when running in a pod (and no kubeconfig given), else the file."""
    configuration = Configuration()
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kube_config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await kube_config.load_kube_config(
            config_file=kubeconfig, client_configuration=configuration
        )
    return configuration


@contextlib.asynccontextmanager
async def api_client(kubeconfig: str | None = None) -> AsyncIterator[ApiClient]:
    """An ``ApiClient`` on :func:`load_configuration`'s credentials, closed on exit."""
    api = ApiClient(await load_configuration(kubeconfig))
    try:
        yield api
    finally:
        await api.close()
