"""The control plane: a kopf operator that turns CreditPools, PoolKeys and Secrets into each
pool's routing ConfigMap (``<pool>-routing``, no key material) and key-material Secret
(``<pool>-keys``), and writes PoolKey / CreditPool status, conditions and Events.

Module map (all private but :func:`run`)::

    _runner     run(), credentials, kopf settings, environment           (process)
    _handlers   kopf indices + on.event triggers; nothing else           (kopf)
    _reports    proxy report Events -> status fields; the report book    (reports)
    _reconcile  one pool: indices -> translate() -> writes               (level-triggered)
    _debounce   a task per pool: batch triggers, wake at cool-down ends  (timing)
    _tables     write_table(): <pool>-keys then <pool>-routing           (outputs)
    _status     status_of(), conditions, events: pure                    (status)
    _secrets    referenced Secret values, in memory only                 (values)
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
    "" (core)           configmaps                             get, create, update
    "" (core)           events                                 create, list, watch, patch
                                                               (list/watch: proxy reports, by
                                                                label; patch: mark consumed)
    coordination.k8s.io leases (in the Lease namespace only)   get, create, update

No finalizers, no patches of specs or of metadata users own (the one label it patches is
``sideproxy.dev/consumed`` on a proxy's report Event), no deletes: removal is the garbage
collector's job through ownerReferences. Discovery (``/apis``) is allowed to every
authenticated user by default.
"""

from sideproxy.operator._runner import run

__all__ = ["run"]
