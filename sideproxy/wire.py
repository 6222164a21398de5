"""The proxy <-> operator wire contract: the ``ReplicaReport`` health channel and its names.

Both sides import this module and nothing of each other. It imports only pydantic, the standard
library and :mod:`sideproxy.models` (``lint-imports`` checks that), so it is tied to no
Kubernetes client: the clients live in :mod:`sideproxy.kubeclient`.

**The health channel.** Every proxy replica owns one ``ReplicaReport`` (group ``sideproxy.dev``,
``v1alpha1``, namespaced, plural ``replicareports``) named ``<pool>-<replica>``
(:func:`report_name`), labelled ``sideproxy.dev/pool=<pool>`` and, when the pod's name and uid
are known (downward API ``POD_NAME``/``POD_UID``), owned by the replica's Pod so that it goes
away with it. Its ``spec`` is what that replica knows *now* (which keys cool for which model
until when, exhausted, revoked, breaker open) plus cumulative counters since it started::

    spec:
      pool: team-a
      replica: team-a-proxy-7d9f-abc12-1
      incarnation: 6f1c0e…             # the writing process (uuid4 hex), fixed for its life
      heartbeat: 1790000000.0          # renewed every HEARTBEAT_SECONDS
      keysReported: 1                  # len(keys), for the printer column
      keys:
        - name: key-1
          fingerprint: ab12cd34
          cooling: [{model: big, until: 1790000060.5}]   # model "" = every model
          exhaustedUntil: null
          revoked: false
          breakerOpenUntil: null
          counts: {requests: 120, rateLimited: 3, exhausted: 0, unauthorized: 0}

Every replica watches the reports of its pool (label selector :func:`pool_selector`) and applies
the others' entries to its live pool as deltas; the operator folds them into ``PoolKey.status``
and writes rejections into the report's ``status.conditions`` (type :data:`ACCEPTED`).

**Incarnations.** ``spec.incarnation`` names the process that writes the report, chosen once
when it starts. The counters are cumulative *per incarnation*: a new incarnation under the same
name (a restarted process) starts again from 0, while the same incarnation re-creating a report
that was deleted under it (the operator removed it as stale while the replica was cut off)
carries on from where it was. The operator's fold tells the two apart by it
(``sideproxy/operator/_fold.py``). A report without one (a proxy older than the field) is
folded as before.

**Who may write.** RBAC lets only the proxy ServiceAccount ``create``/``update``/``patch``
``replicareports`` (chart: ``templates/proxy/rbac.yaml``); nobody else, so whoever may create
Events (or anything else) cannot forge health. The operator needs ``get``/``list``/``watch``
and ``delete`` (stale reports, :data:`STALE_AFTER_SECONDS`) on ``replicareports`` and
``patch`` on ``replicareports/status`` (its rejection conditions). Inside that grant a
replica could still lie about another pool; :func:`parse_report` refuses a report whose
``spec.pool`` does not match its label and name, on both sides.

Reading never trusts the object: :func:`parse_report` returns a :class:`ReplicaReport` or an
:class:`InvalidReport` (with a reason safe to log), never raises.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from sideproxy.models import API_GROUP, API_VERSION, POOL_LABEL, Condition

__all__ = [
    "ACCEPTED",
    "HEARTBEAT_SECONDS",
    "KIND",
    "PLURAL",
    "POOL_LABEL",
    "REPORT_API_VERSION",
    "SERVICE_ACCOUNT_NAMESPACE",
    "STALE_AFTER_SECONDS",
    "Cooling",
    "InvalidReport",
    "KeyCounts",
    "KeyReport",
    "PodRef",
    "ReplicaReport",
    "ReplicaReportSpec",
    "ReplicaReportStatus",
    "VirtualKeyUsage",
    "default_namespace",
    "parse_report",
    "pool_selector",
    "replica_name",
    "report_body",
    "report_name",
]

KIND = "ReplicaReport"
PLURAL = "replicareports"
REPORT_API_VERSION = f"{API_GROUP}/{API_VERSION}"
# A replica renews its report this often even when nothing changed; a report whose heartbeat is
# older than STALE_AFTER_SECONDS belongs to a replica that is gone (the operator deletes it).
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 3 * HEARTBEAT_SECONDS
# status.conditions type the operator sets False (with a reason) on a report it refuses.
ACCEPTED = "Accepted"
# The pod's namespace, mounted with its service-account token.
SERVICE_ACCOUNT_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

_NAME_PART = re.compile(r"[^a-z0-9-]+")


def default_namespace() -> str:
    """The pod's own namespace (service-account mount), else ``default``."""
    try:
        with open(SERVICE_ACCOUNT_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def replica_name(base: str, process: int) -> str:
    """A replica's name: the pod (or host) name and the process id, as a DNS label part.

    The pid keeps ``--workers`` processes of one pod (and proxies on one test host) apart; in a
    container a restarted process usually gets the same pid, so it takes its report back.
    """
    clean = _NAME_PART.sub("-", base.lower()).strip("-") or "replica"
    return f"{clean[:180]}-{process}"


def report_name(pool: str, replica: str) -> str:
    """The ``ReplicaReport`` a replica owns: ``<pool>-<replica>``."""
    return f"{pool}-{replica}"


def pool_selector(pool: str) -> str:
    """The label selector of a pool's reports."""
    return f"{POOL_LABEL}={pool}"


class _Wire(BaseModel):
    # Unlike the CR specs (extra="forbid": a typo must fail), a report is read by the other side
    # of a rolling upgrade: a field added by a newer proxy is ignored, not an error.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    def dump(self) -> dict[str, Any]:
        """The Kubernetes (camelCase) form, without unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


_Deadline = Annotated[float, Field(ge=0, description="Unix seconds.", allow_inf_nan=False)]


class Cooling(_Wire):
    model: Annotated[
        str,
        Field(
            default="",
            max_length=256,
            description='The model this cool-down is for; "" means every model of the key.',
        ),
    ]
    until: Annotated[
        float,
        Field(ge=0, allow_inf_nan=False, description="End of the cool-down (unix seconds)."),
    ]


class KeyCounts(_Wire):
    requests: Annotated[int, Field(default=0, ge=0, description="Upstream attempts with the key.")]
    rate_limited: Annotated[int, Field(default=0, ge=0, description="429 answers (rate limits).")]
    exhausted: Annotated[int, Field(default=0, ge=0, description="Out-of-quota answers.")]
    unauthorized: Annotated[int, Field(default=0, ge=0, description="401/403 answers.")]
    # Tokens of the answers this key served, as the provider's 'usage' reported them (additive:
    # the operator's fold sums them into PoolKey.status like the other counters).
    prompt_tokens: Annotated[int, Field(default=0, ge=0, description="Prompt tokens served.")]
    completion_tokens: Annotated[
        int, Field(default=0, ge=0, description="Completion tokens served.")
    ]


class KeyReport(_Wire):
    name: Annotated[str, Field(min_length=1, max_length=253, description="The PoolKey.")]
    fingerprint: Annotated[
        str,
        Field(
            max_length=64,
            description="Fingerprint of the key value this entry is about (a rotated-away "
            "value's entry changes nothing).",
        ),
    ]
    cooling: Annotated[
        list[Cooling],
        Field(default_factory=list, max_length=1024, description="Cool-downs now in force."),
    ]
    exhausted_until: Annotated[
        float | None,
        Field(
            default=None,
            ge=0,
            allow_inf_nan=False,
            description="Out of quota until (unix seconds): every model; back only by a probe.",
        ),
    ]
    revoked: Annotated[bool, Field(default=False, description="The key answered 401.")]
    breaker_open_until: Annotated[
        float | None,
        Field(
            default=None,
            ge=0,
            allow_inf_nan=False,
            description="Circuit breaker open until (unix seconds).",
        ),
    ]
    counts: Annotated[
        KeyCounts,
        Field(default_factory=KeyCounts, description="Cumulative since the replica started."),
    ]


class VirtualKeyUsage(_Wire):
    """One VirtualKey on one replica: its usage and its claim in the current window (see
    ``sideproxy/proxy/_admit.py``), and cumulative counts since the replica started."""

    name: Annotated[str, Field(min_length=1, max_length=253, description="The VirtualKey.")]
    window_start: Annotated[
        float,
        Field(ge=0, allow_inf_nan=False, description="Start of the window (unix seconds)."),
    ]
    requests: Annotated[int, Field(default=0, ge=0, description="Admitted in the window.")]
    prompt_tokens: Annotated[int, Field(default=0, ge=0, description="In the window.")]
    completion_tokens: Annotated[int, Field(default=0, ge=0, description="In the window.")]
    refused: Annotated[
        int, Field(default=0, ge=0, description="Refused in the window (over a limit).")
    ]
    claimed_requests: Annotated[
        float,
        Field(
            default=0.0,
            ge=0,
            allow_inf_nan=False,
            description="Requests of the window this replica may admit (0: no such limit).",
        ),
    ]
    claimed_tokens: Annotated[
        float,
        Field(
            default=0.0,
            ge=0,
            allow_inf_nan=False,
            description="Tokens of the window this replica may use (0: no such limit).",
        ),
    ]
    inflight: Annotated[int, Field(default=0, ge=0, description="Requests in flight now.")]
    total_requests: Annotated[int, Field(default=0, ge=0, description="Cumulative.")]
    total_prompt_tokens: Annotated[int, Field(default=0, ge=0, description="Cumulative.")]
    total_completion_tokens: Annotated[int, Field(default=0, ge=0, description="Cumulative.")]
    last_used: Annotated[
        float,
        Field(default=0.0, ge=0, allow_inf_nan=False, description="Last request (unix seconds)."),
    ]


class ReplicaReportSpec(_Wire):
    pool: Annotated[str, Field(min_length=1, max_length=63, description="The CreditPool.")]
    # 63 (pool) + "-" + 189 = 253, the longest object name: the report's name is never cut.
    replica: Annotated[
        str, Field(min_length=1, max_length=189, description="The reporting proxy replica.")
    ]
    heartbeat: Annotated[
        float,
        Field(ge=0, allow_inf_nan=False, description="Last renewal by the replica (unix seconds)."),
    ]
    # Optional: a proxy older than the field writes none (rolling upgrades), and the operator
    # then folds its counts by report name and uid alone.
    incarnation: Annotated[
        str | None,
        Field(
            default=None,
            min_length=1,
            max_length=64,
            pattern=r"^[0-9a-zA-Z-]+$",
            description="The writing process, fixed for its life: counts are cumulative per "
            "incarnation (a new one starts from 0).",
        ),
    ]
    keys_reported: Annotated[
        int, Field(default=0, ge=0, description="len(keys), for kubectl's printer column.")
    ]
    keys: Annotated[
        list[KeyReport],
        Field(
            default_factory=list,
            max_length=20_000,
            description="What the replica knows of each key it has something to say about.",
        ),
    ]
    # Virtual keys (issue 12): the usage part of the replica's channel (proxy/_vkshare.py)
    # writes these three fields, the health part the ones above; a write carries only the
    # parts that are due, as a merge patch, so neither ever erases the other.
    usage_heartbeat: Annotated[
        float | None,
        Field(
            default=None,
            ge=0,
            allow_inf_nan=False,
            description="Last write of virtualKeys (unix seconds); renewed about every second "
            "while the replica serves virtual keys. Older than a few seconds: the replica's "
            "unused claims are free.",
        ),
    ]
    window_seconds: Annotated[
        float | None,
        Field(
            default=None,
            gt=0,
            allow_inf_nan=False,
            description="Length of the limit window (60: a calendar minute).",
        ),
    ]
    # None, not []: the health part's merge patch (spec.dump(), unset fields left out) must
    # never carry this field, or each of its writes would erase the replica's claims.
    virtual_keys: Annotated[
        list[VirtualKeyUsage] | None,
        Field(
            default=None,
            max_length=20_000,
            description="Virtual keys used in the current window or in flight.",
        ),
    ]


class ReplicaReportStatus(_Wire):
    conditions: Annotated[
        list[Condition],
        Field(
            default_factory=list,
            description="Written by the operator: Accepted=False with the reason it refused "
            "the report.",
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        ),
    ]


@dataclass(frozen=True, slots=True)
class PodRef:
    """The replica's Pod, for the report's ownerReference (garbage collected with the pod)."""

    name: str
    uid: str


@dataclass(frozen=True, slots=True)
class ReplicaReport:
    """A report as read from the API: whose it is and what it says."""

    namespace: str
    name: str
    resource_version: str
    spec: ReplicaReportSpec


@dataclass(frozen=True, slots=True)
class InvalidReport:
    """A report object that must not be applied. ``reason`` is CamelCase; ``message`` names
    fields and objects only."""

    namespace: str
    name: str
    reason: str
    message: str


def report_body(
    namespace: str, spec: ReplicaReportSpec, owner: PodRef | None = None
) -> dict[str, Any]:
    """The whole ``ReplicaReport`` object for a create or an update."""
    metadata: dict[str, Any] = {
        "name": report_name(spec.pool, spec.replica),
        "namespace": namespace,
        "labels": {POOL_LABEL: spec.pool},
    }
    if owner is not None:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": owner.name, "uid": owner.uid}
        ]
    return {
        "apiVersion": REPORT_API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": spec.dump(),
    }


def parse_report(body: Mapping[str, Any]) -> ReplicaReport | InvalidReport:
    """Read a ``ReplicaReport`` object; refuse one that is malformed or that claims a pool its
    label and name do not (a replica speaking for another pool)."""
    meta = body.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    namespace, name = str(meta.get("namespace") or ""), str(meta.get("name") or "")
    labels = meta.get("labels")
    labels = labels if isinstance(labels, Mapping) else {}
    try:
        spec = ReplicaReportSpec.model_validate(body.get("spec"))
    except ValidationError as exc:
        # The first error's location and type only: a message could quote the input.
        errors = exc.errors(include_input=False, include_url=False)
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        kind = errors[0]["type"] if errors else "invalid"
        return InvalidReport(
            namespace, name, "Malformed", f"spec{'.' if where else ''}{where}: {kind}"
        )
    if labels.get(POOL_LABEL) != spec.pool:
        return InvalidReport(
            namespace,
            name,
            "PoolMismatch",
            f"spec.pool {spec.pool!r} is not its label {POOL_LABEL}={labels.get(POOL_LABEL)!r}",
        )
    if name != report_name(spec.pool, spec.replica):
        return InvalidReport(
            namespace,
            name,
            "NameMismatch",
            f"a report of pool {spec.pool!r}, replica {spec.replica!r} must be named "
            f"{report_name(spec.pool, spec.replica)!r}",
        )
    return ReplicaReport(namespace, name, str(meta.get("resourceVersion") or ""), spec)
