"""The control plane: a kopf operator that turns CreditPools, PoolKeys and Secrets into each
pool's routing ConfigMap (``<pool>-routing``, no key material) and key-material Secret
(``<pool>-keys``), and writes PoolKey / CreditPool status, conditions and Events.

Module map (all private but :func:`run`)::

    _runner     run(), credentials, kopf settings, environment           (process)
    _handlers   kopf indices + on.event triggers; nothing else           (kopf)
    _fold       ReplicaReports -> exact counts and health of one key    (health, pure)
    _replicas   which report entries count; Accepted, stale deletions   (health, I/O)
    _reconcile  one pool: indices -> translate() -> writes               (level-triggered)
    _debounce   a task per pool: batch triggers, wake at cool-down ends  (timing)
    _tables     write_table(): <pool>-keys then <pool>-routing           (outputs)
    _status     status_of(), conditions, events: pure                    (status)
    _secrets    referenced Secret values, read by name, in memory only   (values)
    _watch      metadata-only list/watch of Secrets and our ConfigMaps   (watch)
    _records    what the indices hold; never a Secret value              (records)
    _leader     Lease leader election                                    (HA)
    _kube       the few raw API calls, with write counters               (I/O)
    _vkeys      VirtualKeys: records, Ready, usage from ReplicaReports   (issue 12)

RBAC: exactly what the handlers use, per watched namespace (Role) or cluster-wide
(ClusterRole when ``run([])``)::

    sideproxy.dev       creditpools, poolkeys                  list, watch
    sideproxy.dev       creditpools/status, poolkeys/status    patch
    sideproxy.dev       virtualkeys, replicareports            list, watch
    sideproxy.dev       virtualkeys/status                     patch
    sideproxy.dev       creditpools/finalizers                 update   (ownerReferences with
                                                                         blockOwnerDeletion, where
                                                                         OwnerReferencesPermission-
                                                                         Enforcement is enabled)
    "" (core)           secrets                                list, watch, get, create, update
                                                               (list/watch: metadata only, in
                                                                pages; get: referenced ones)
    "" (core)           configmaps                             list, watch, get, create, update
                                                               (list/watch: ours, by label)
    "" (core)           events                                 create
    sideproxy.dev       replicareports                         list, watch, get, delete
                                                               (delete: stale ones, by uid)
    sideproxy.dev       replicareports/status                  patch    (Accepted condition)
    coordination.k8s.io leases (in the Lease namespace only)   get, create, update

No finalizers, no patches of specs or metadata. The one delete is of a ReplicaReport whose
replica stopped renewing it (heartbeat older than ``wire.STALE_AFTER_SECONDS``); everything else
is the garbage collector's job through ownerReferences. core/v1 Events are only ever created,
never read: health comes from ReplicaReports, which only the proxies' ServiceAccount may write.
Discovery (``/apis``) is allowed to every authenticated user by default.
"""

from sideproxy.operator._runner import run

__all__ = ["run"]
