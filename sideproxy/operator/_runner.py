"""Starting the operator: credentials, kopf settings, leader election, and ``run()``.

Environment (all optional; the Helm chart sets the first three):

=====================================  =========================================================
``POD_NAME``                           this replica's name, for the Lease holder and Events
``POD_NAMESPACE``                      where the Lease lives (else the service account's namespace,
                                       else the first watched namespace, else ``default``)
``SIDEPROXY_LEASE_NAME``               Lease name (default ``sideproxy-operator``); give each
                                       operator installation its own
``SIDEPROXY_LEADER_ELECTION``          ``false`` to switch it off (one replica only, then)
``SIDEPROXY_LEASE_SECONDS``            Lease duration (default 15; renew deadline 2/3 of it)
``SIDEPROXY_DEBOUNCE_SECONDS``         quiet period that batches triggers (default 0.15)
``SIDEPROXY_MAX_DELAY_SECONDS``        longest a trigger waits under constant churn (default 2)
``SIDEPROXY_RESYNC_SECONDS``           full re-check of every pool (default 300)
``SIDEPROXY_SHUTDOWN_GRACE_SECONDS``   on SIGTERM, how long running reconciles may take to
                                       finish before the Lease is released (default 10)
=====================================  =========================================================
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import config as kube_config
from kubernetes_asyncio.client import ApiClient, Configuration

from sideproxy.kubeclient import load_configuration
from sideproxy.models import API_GROUP, API_VERSION
from sideproxy.operator._handlers import build_registry
from sideproxy.operator._kube import KubeApi
from sideproxy.operator._leader import AlwaysLeader, Leadership, LeaseElector
from sideproxy.operator._reconcile import Indices, Options, Reconciler
from sideproxy.operator._tables import MANAGED_BY
from sideproxy.operator._watch import MetaWatch
from sideproxy.wire import SERVICE_ACCOUNT_NAMESPACE

log = logging.getLogger("sideproxy.operator")

# Secrets per list page. A page is metadata only, but ``kubectl apply`` copies a Secret's data
# into an annotation that metadata includes: 50 such 1 MB Secrets are a 50 MB page at worst.
SECRET_PAGE = 50


class StartupError(RuntimeError):
    """The operator cannot work in this cluster (e.g. the CRDs are not installed)."""


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        return float(raw) if raw else default
    except ValueError:
        raise StartupError(f"{name}={raw!r} is not a number") from None


@dataclass(frozen=True, slots=True)
class Settings:
    namespaces: tuple[str, ...]
    identity: str
    leader_election: bool = True
    lease_name: str = "sideproxy-operator"
    lease_namespace: str = "default"
    lease_seconds: float = 15.0
    shutdown_grace_seconds: float = 10.0
    reconcile: Options = field(default_factory=Options)

    @classmethod
    def from_env(cls, namespaces: Sequence[str]) -> Settings:
        pod = os.environ.get("POD_NAME") or socket.gethostname()
        lease_ns = os.environ.get("POD_NAMESPACE", "").strip()
        if not lease_ns:
            with contextlib.suppress(OSError):
                lease_ns = Path(SERVICE_ACCOUNT_NAMESPACE).read_text().strip()
        if not lease_ns:
            lease_ns = namespaces[0] if namespaces else "default"
        election = os.environ.get("SIDEPROXY_LEADER_ELECTION", "true").strip().lower()
        return cls(
            namespaces=tuple(namespaces),
            identity=f"{pod}-{uuid.uuid4().hex[:6]}",
            leader_election=election not in {"0", "false", "no", "off"},
            lease_name=os.environ.get("SIDEPROXY_LEASE_NAME", "").strip() or "sideproxy-operator",
            lease_namespace=lease_ns,
            lease_seconds=_env_float("SIDEPROXY_LEASE_SECONDS", 15.0),
            shutdown_grace_seconds=_env_float("SIDEPROXY_SHUTDOWN_GRACE_SECONDS", 10.0),
            reconcile=Options(
                quiet_seconds=_env_float("SIDEPROXY_DEBOUNCE_SECONDS", 0.15),
                max_delay_seconds=_env_float("SIDEPROXY_MAX_DELAY_SECONDS", 2.0),
                resync_seconds=_env_float("SIDEPROXY_RESYNC_SECONDS", 300.0),
            ),
        )


async def connection_info(configuration: Configuration) -> kopf.ConnectionInfo:
    """kopf's credentials from the same configuration our own client uses."""
    header: Any = configuration.get_api_key_with_prefix("BearerToken")
    if inspect.isawaitable(header):
        header = await header
    parts = str(header).split(" ", 1) if header else []
    scheme, token = (
        (None, None) if not parts else (None, parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    )
    return kopf.ConnectionInfo(
        server=str(configuration.host),
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        proxy_url=configuration.proxy,
    )


def kopf_settings() -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # Leader election is ours (a Lease): every replica watches, only the holder writes.
    settings.peering.standalone = True
    # No list/watch on Namespaces or CRDs needed: exact namespaces, CRDs installed beforehand
    # (start-up checks that they are served and fails otherwise).
    settings.scanning.disabled = True
    # We post our own Events, deliberately, and only on transitions.
    settings.posting.enabled = False
    # Lists in pages: a page, not the whole kind, is what sits in memory at a time.
    settings.watching.chunk_size = 500
    # A watch that the API server silently drops must not stall us forever.
    settings.watching.server_timeout = 120
    settings.watching.client_timeout = 150
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 60
    return settings


class Runtime:
    """The operator's process-wide parts, shared by the kopf handlers."""

    def __init__(self, settings: Settings, kubeconfig: str | None) -> None:
        self.settings = settings
        self._kubeconfig = kubeconfig
        self.api: KubeApi | None = None
        self.reconciler: Reconciler | None = None
        self.leadership: Leadership = AlwaysLeader()
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        configuration = await load_configuration(self._kubeconfig)
        self.api = KubeApi(ApiClient(configuration))
        self.api.instance = self.settings.identity

    async def connection_info(self) -> kopf.ConnectionInfo:
        # Re-read on every (re-)login: a service-account token is rotated on disk.
        return await connection_info(await load_configuration(self._kubeconfig))

    async def start(self, indices: Indices) -> None:
        api = self.api
        if api is None:
            raise StartupError("Runtime.open() was not called")
        served = await api.api_resources(API_GROUP, API_VERSION)
        names = {r.get("name") for r in (served or {}).get("resources") or []}
        missing = {"creditpools", "poolkeys", "replicareports"} - names
        if missing:
            raise kopf.PermanentError(
                f"the API server does not serve {API_GROUP}/{API_VERSION} "
                f"{', '.join(sorted(missing))}: install the CRDs (kubectl apply -f crds/)"
            )
        if self.settings.leader_election:
            elector = LeaseElector(
                api,
                self.settings.lease_namespace,
                self.settings.lease_name,
                self.settings.identity,
                lease_seconds=self.settings.lease_seconds,
                on_change=self._leadership_changed,
            )
            self.leadership = elector
        self.reconciler = Reconciler(
            api, indices, leadership=self.leadership, options=self.settings.reconcile
        )
        if isinstance(self.leadership, LeaseElector):
            self._tasks.append(asyncio.create_task(self.leadership.run(), name="lease"))
        for watch in self._watches(api, self.reconciler):
            self._tasks.append(asyncio.create_task(watch.run(), name=f"watch {watch.plural}"))
        scope = ", ".join(self.settings.namespaces) or "all namespaces"
        election = (
            f"Lease {self.settings.lease_namespace}/{self.settings.lease_name}"
            if self.settings.leader_election
            else "no leader election"
        )
        log.info("operator %s watching %s (%s)", self.settings.identity, scope, election)

    def _watches(self, api: KubeApi, reconciler: Reconciler) -> list[MetaWatch]:
        """Secrets (metadata only, in pages: values are read by name when referenced) and the
        ConfigMaps we write (by our label), so a deleted or edited one is repaired at once."""
        namespaces = self.settings.namespaces
        return [
            MetaWatch(
                api,
                "secrets",
                namespaces,
                reconciler.secret_event,
                on_listed=reconciler.secrets_listed,
                page=SECRET_PAGE,
            ),
            MetaWatch(
                api,
                "configmaps",
                namespaces,
                reconciler.configmap_event,
                label_selector=f"app.kubernetes.io/managed-by={MANAGED_BY}",
            ),
        ]

    def _leadership_changed(self, leading: bool) -> None:
        if leading and self.reconciler is not None:
            self.reconciler.resync()

    async def stop(self) -> None:
        if self.reconciler is not None:
            # In-flight reconciles finish first; only then is the Lease released (below).
            await self.reconciler.close(self.settings.shutdown_grace_seconds)
            if self.api is not None:
                log.info("API writes: %s", json.dumps(dict(sorted(self.api.writes.items()))))
            self.reconciler = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def close(self) -> None:
        await self.stop()
        if self.api is not None:
            await self.api.close()

    def probe(self) -> dict[str, Any]:
        return {
            "leader": self.leadership.leading,
            "pools": len(self.reconciler.workers.keys()) if self.reconciler else 0,
            "writes": dict(self.api.writes) if self.api else {},
        }


def configure_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    # Neither ever logs at INFO what we would not want, but their DEBUG output holds bodies.
    logging.getLogger("kubernetes_asyncio").setLevel(logging.WARNING)
    logging.getLogger("aiohttp").setLevel(logging.WARNING)
    # One line per watch event ("Handler 'poolkey_changed' succeeded.") and per liveness probe
    # is noise at 1,000 keys; failures are still logged.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    logging.getLogger("kopf.activities.probe").setLevel(logging.WARNING)


async def operate(
    namespaces: Sequence[str],
    liveness: str | None,
    kubeconfig: str | None,
    stop_flag: asyncio.Event | None = None,
) -> int:
    """Run until SIGINT/SIGTERM (or ``stop_flag``); the exit code of :func:`run`."""
    settings = Settings.from_env(namespaces)
    runtime = Runtime(settings, kubeconfig)
    await runtime.open()
    try:
        await kopf.operator(
            registry=build_registry(runtime),
            settings=kopf_settings(),
            namespaces=list(settings.namespaces),
            clusterwide=not settings.namespaces,
            liveness_endpoint=liveness,
            standalone=True,
            stop_flag=stop_flag,
        )
    finally:
        await runtime.close()
    return 0


def run(namespaces: list[str], liveness: str | None, kubeconfig: str | None) -> int:
    """Run the operator in this process until SIGINT/SIGTERM; returns the exit code.

    ``namespaces``: the namespaces to watch; ``[]`` watches the whole cluster.
    ``liveness``: kopf's liveness endpoint, e.g. ``http://0.0.0.0:8080/healthz``, or None.
    ``kubeconfig``: a kubeconfig file; None uses the pod's service account in a cluster,
    else ``$KUBECONFIG`` / ``~/.kube/config``.
    """
    configure_logging()
    try:
        return asyncio.run(operate(namespaces, liveness, kubeconfig))
    except KeyboardInterrupt:
        return 130
    except (StartupError, kube_config.ConfigException) as exc:
        log.error("%s", exc)
        return 2
    except Exception as exc:  # the last word before the process dies; no secret ever in it
        log.error("operator stopped: %s: %s", type(exc).__name__, str(exc)[:500])
        return 1
