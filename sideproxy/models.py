"""The shared contract: CRD spec/status models and the routing table.

Both the operator (which writes the routing table) and the proxy (which reads it) import this
module, and nothing else of each other. The CRD YAML in ``crds/`` is generated from these models
(``python -m sideproxy.crds --write``), so the three forms of the schema cannot drift.

Field descriptions here are the ones ``kubectl explain`` prints: keep them useful.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

API_GROUP = "sideproxy.dev"
API_VERSION = "v1alpha1"
TABLE_FORMAT = 1
# A ConfigMap holds at most 1 MiB (etcd's object limit); leave room for metadata.
TABLE_SIZE_LIMIT = 1_000_000
TABLE_DATA_KEY = "table.json"
# Data key in the key-material Secret that holds the pool's virtual keys, one per line.
VIRTUAL_KEYS_DATA_KEY = "virtual-keys"
# Label on everything the operator writes for a pool; its value is the CreditPool's name.
POOL_LABEL = "sideproxy.dev/pool"
# A model name or a glob of one (``*`` only) in PoolKey.spec.models: provider model ids such as
# "meta-llama/llama-4-scout-17b-16e-instruct", "llama3.1:8b", "gpt-4o-2024-08-06", "gpt-4o*".
MODEL_PATTERN = r"^[A-Za-z0-9._:/@+*-]{1,256}$"
MAX_KEY_MODELS = 64
# An exact model name (no glob): what a route answers to and what its targets send upstream.
EXACT_MODEL_PATTERN = r"^[A-Za-z0-9._:/@+-]{1,256}$"
# A provider endpoint's name: a DNS label, since it is also a path prefix (/<name>/v1/...).
ENDPOINT_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
MAX_ROUTES = 64
MAX_ROUTE_TARGETS = 16
# PoolKey.status.coolingModels lists at most this many models; the rest are counted.
COOLING_MODELS_SHOWN = 5


def routing_configmap_name(pool: str) -> str:
    """The ConfigMap holding a pool's routing table under ``TABLE_DATA_KEY``."""
    return f"{pool}-routing"


def key_secret_name(pool: str) -> str:
    """The Secret holding a pool's key material: one data key per PoolKey name, plus
    ``VIRTUAL_KEYS_DATA_KEY``."""
    return f"{pool}-keys"


class Provider(StrEnum):
    """The providers Side Proxy knows how to authenticate against."""

    GROQ = "groq"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    TOGETHER = "together"
    MISTRAL = "mistral"
    DEEPSEEK = "deepseek"
    OPENROUTER = "openrouter"
    FIREWORKS = "fireworks"
    CUSTOM = "custom"


_PROVIDER_VALUES = tuple(p.value for p in Provider)


# Default upstream base URLs. The proxy appends the client's path after ``/v1`` to these.
DEFAULT_BASE_URLS: dict[Provider, str] = {
    Provider.GROQ: "https://api.groq.com/openai/v1",
    Provider.OPENAI: "https://api.openai.com/v1",
    Provider.ANTHROPIC: "https://api.anthropic.com/v1",
    Provider.TOGETHER: "https://api.together.xyz/v1",
    Provider.MISTRAL: "https://api.mistral.ai/v1",
    Provider.DEEPSEEK: "https://api.deepseek.com/v1",
    Provider.OPENROUTER: "https://openrouter.ai/api/v1",
    Provider.FIREWORKS: "https://api.fireworks.ai/inference/v1",
}


class KeyPhase(StrEnum):
    """What ``kubectl get poolkeys`` shows in the STATE column."""

    READY = "Ready"  # in rotation (it may still be cooling for some models: coolingModels)
    COOLING_DOWN = "CoolingDown"  # rate-limited for every model
    EXHAUSTED = "Exhausted"  # out of quota / billing: out for every model until a probe passes
    REVOKED = "Revoked"
    INVALID = "Invalid"
    DISABLED = "Disabled"


class CooldownScope(StrEnum):
    MODEL = "model"
    KEY = "key"


class Strategy(StrEnum):
    WEIGHTED = "weighted"
    ROUND_ROBIN = "round-robin"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def dump(self) -> dict[str, Any]:
        """The Kubernetes (camelCase) form, without unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --------------------------------------------------------------------------- CreditPool spec


class SecretKeyRef(_Model):
    name: Annotated[
        str,
        Field(min_length=1, max_length=253, description="Name of a Secret in the same namespace."),
    ]
    key: Annotated[
        str,
        Field(min_length=1, max_length=253, description="Data key inside that Secret."),
    ]


_PROVIDER_TYPES = ", ".join(f"'{p.value}'" for p in Provider)


class ProviderEndpoint(_Model):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        {
            # A name that is not a provider type says nothing about auth or API shape.
            "rule": f"has(self.type) || self.name in [{_PROVIDER_TYPES}]",
            "message": "a provider whose name is not a provider type needs a type",
        },
        {
            # A custom provider has no built-in URL, so it must name one.
            "rule": "(has(self.type) ? self.type : self.name) != 'custom' || has(self.baseURL)",
            "message": "a custom provider needs a baseURL",
        },
    ]

    name: Annotated[
        str,
        Field(
            pattern=ENDPOINT_PATTERN,
            max_length=63,
            description="Name of this endpoint: PoolKeys and route targets name it, and "
            "/<name>/v1/... selects it. Either a provider type (groq, openai, anthropic, ...: "
            "then type defaults to it) or any name with type set, e.g. 'vllm-a', so that two "
            "endpoints of one type serve one pool.",
        ),
    ]
    type: Annotated[
        Provider | None,
        Field(
            default=None,
            description="Provider served by this endpoint (how keys authenticate, which API "
            "shape it speaks). Defaults to name.",
        ),
    ]
    base_url: Annotated[
        str | None,
        Field(
            default=None,
            alias="baseURL",
            pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$",
            max_length=2048,
            description=(
                "Upstream base URL up to and including the API version, e.g. "
                "https://api.groq.com/openai/v1. Defaults to the provider's public endpoint; "
                "required for 'custom'."
            ),
        ),
    ]

    @model_validator(mode="after")
    def _typed(self) -> ProviderEndpoint:
        if self.type is None and self.name not in _PROVIDER_VALUES:
            raise ValueError(
                f"provider {self.name!r} is not a provider type: set its type (one of "
                f"{', '.join(_PROVIDER_VALUES)})"
            )
        if self.kind is Provider.CUSTOM and not self.base_url:
            raise ValueError("a custom provider needs a baseURL")
        return self

    @property
    def kind(self) -> Provider:
        """The provider type: ``type``, or the name when it is one."""
        return self.type if self.type is not None else Provider(self.name)

    @property
    def url(self) -> str:
        return self.base_url or DEFAULT_BASE_URLS[self.kind]


class RouteTarget(_Model):
    provider: Annotated[
        str,
        Field(
            pattern=ENDPOINT_PATTERN,
            max_length=63,
            description="One of spec.providers[].name.",
        ),
    ]
    model: Annotated[
        str,
        Field(
            pattern=EXACT_MODEL_PATTERN,
            max_length=256,
            description="The model name this provider knows; it replaces the client's in the "
            "request body. Some PoolKey of this provider must serve it (spec.models).",
        ),
    ]
    order: Annotated[
        int | None,
        Field(
            default=None,
            ge=0,
            le=15,
            description="Lower first. Targets with the same order share load by weight; a "
            "higher order takes a request only when no target of the lower orders can serve "
            "it. Unset: the target's position. Set it on every target of a route or on none.",
        ),
    ]
    weight: Annotated[
        int,
        Field(
            default=1,
            ge=1,
            le=1000,
            description="Share of the load among the targets of the same order.",
        ),
    ]


class ModelRoute(_Model):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "self.targets.all(t, has(t.order)) || self.targets.all(t, !has(t.order))",
            "message": "set order on every target or on none",  # if the expression fails
            "messageExpression": "'route ' + self.model + ': set order on every target or on none'",
        },
    ]

    model: Annotated[
        str,
        Field(
            pattern=EXACT_MODEL_PATTERN,
            max_length=256,
            description="The model name clients ask for, e.g. 'fast'. The client's name never "
            "reaches a provider: each attempt sends its target's model.",
        ),
    ]
    targets: Annotated[
        list[RouteTarget],
        Field(
            min_length=1,
            max_length=MAX_ROUTE_TARGETS,
            description="Where requests for this model go, in order (see order and weight).",
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["provider", "model"],
            },
        ),
    ]

    @model_validator(mode="after")
    def _consistent(self) -> ModelRoute:
        where = f"route {self.model}"
        given = {t.order is not None for t in self.targets}
        if len(given) > 1:
            raise ValueError(f"{where}: set order on every target or on none")
        pairs = [(t.provider, t.model) for t in self.targets]
        if len(pairs) != len(set(pairs)):
            raise ValueError(f"{where}: a target (provider, model) appears twice")
        return self

    def orders(self) -> list[int]:
        """Each target's effective order: its own, or its position."""
        return [i if t.order is None else t.order for i, t in enumerate(self.targets)]


class CooldownPolicy(_Model):
    default_seconds: Annotated[
        float,
        Field(
            default=60.0,
            ge=0.1,
            le=86400,
            description="Cool-down after a 429 whose response carries no rate-limit reset header.",
        ),
    ]
    max_seconds: Annotated[
        float,
        Field(
            default=3600.0,
            ge=1,
            le=86400,
            description="Upper bound on any cool-down, whatever the provider's headers say.",
        ),
    ]
    scope: Annotated[
        CooldownScope,
        Field(
            default=CooldownScope.MODEL,
            description="What a 429 about a model cools: 'model' (only that key and model; the "
            "key keeps serving other models) or 'key' (the key, for every model: for providers "
            "whose limits are per organisation rather than per model).",
        ),
    ]


class QuotaPolicy(_Model):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "self.maxBackoffSeconds >= self.backoffSeconds",
            "message": "quota.maxBackoffSeconds must be at least quota.backoffSeconds",
        }
    ]

    backoff_seconds: Annotated[
        float,
        Field(
            default=300.0,
            ge=1,
            le=86400,
            description="How long an exhausted key (out of quota, billing, daily limit) waits "
            "before its first token-free probe (GET <baseURL>/models). Doubles on each failed "
            "probe.",
        ),
    ]
    max_backoff_seconds: Annotated[
        float,
        Field(
            default=21600.0,
            ge=1,
            le=604800,
            description="Cap on the doubled back-off; a revoked key (401) is probed this often.",
        ),
    ]

    @model_validator(mode="after")
    def _ordered(self) -> QuotaPolicy:
        if self.max_backoff_seconds < self.backoff_seconds:
            raise ValueError("quota.maxBackoffSeconds must be at least quota.backoffSeconds")
        return self


class RetryPolicy(_Model):
    max_attempts: Annotated[
        int,
        Field(
            default=4,
            ge=1,
            le=20,
            description="Upstream attempts per client request (first try included).",
        ),
    ]
    total_timeout_seconds: Annotated[
        float,
        Field(
            default=120.0,
            gt=0,
            le=3600,
            description="Deadline for all attempts of one request before its first byte is sent.",
        ),
    ]


class Timeouts(_Model):
    connect_seconds: Annotated[
        float, Field(default=5.0, gt=0, le=300, description="TCP + TLS connect to a provider.")
    ]
    first_byte_seconds: Annotated[
        float,
        Field(
            default=120.0,
            gt=0,
            le=3600,
            description="From request sent to response headers (models can think for a while).",
        ),
    ]
    idle_stream_seconds: Annotated[
        float,
        Field(
            default=120.0,
            gt=0,
            le=3600,
            description="Longest silence between two chunks of a streamed response.",
        ),
    ]
    total_seconds: Annotated[
        float,
        Field(default=900.0, gt=0, le=86400, description="Whole request, stream included."),
    ]


class BreakerPolicy(_Model):
    failure_threshold: Annotated[
        int,
        Field(
            default=5,
            ge=1,
            le=1000,
            description="Consecutive 5xx, connect errors or timeouts that open a key's breaker.",
        ),
    ]
    backoff_seconds: Annotated[
        float,
        Field(
            default=10.0,
            gt=0,
            le=3600,
            description="Open time before the first half-open probe; doubles on each failed probe.",
        ),
    ]
    max_backoff_seconds: Annotated[
        float,
        Field(default=300.0, gt=0, le=86400, description="Cap on the doubled back-off."),
    ]


class ClientAuth(_Model):
    secret_ref: Annotated[
        SecretKeyRef | None,
        Field(
            default=None,
            description=(
                "Secret data key holding the virtual keys that clients present, one per line "
                "(or comma-separated). Clients send one as 'Authorization: Bearer <key>' or "
                "'x-api-key'."
            ),
        ),
    ]
    disabled: Annotated[
        bool,
        Field(
            default=False,
            description="Accept clients without a virtual key. Only for trusted networks.",
        ),
    ]


class CreditPoolSpec(_Model):
    cel_rules: ClassVar[list[dict[str, str]]] = [
        {
            "rule": "self.providers.exists(p, p.name == self.defaultProvider)",
            "message": "defaultProvider must be one of providers[].name",
        },
        {
            "rule": "self.providers.all(p, self.providers.exists_one(q, q.name == p.name))",
            "message": "each provider may appear once in providers",
        },
        {
            "rule": "self.routes.all(r, r.targets.all(t, "
            "self.providers.exists(p, p.name == t.provider)))",
            # No messageExpression naming the route: its estimated cost is over the API
            # server's budget. The spec model (operator, pool files) names it.
            "message": "a route target names a provider this pool does not serve "
            "(routes[].targets[].provider must be one of providers[].name)",
        },
        {
            "rule": "self.clientAuth.disabled || has(self.clientAuth.secretRef)",
            "message": "clientAuth needs a secretRef unless clientAuth.disabled is true",
        },
    ]

    default_provider: Annotated[
        str,
        Field(
            default=Provider.GROQ.value,
            pattern=ENDPOINT_PATTERN,
            max_length=63,
            description="Provider (a providers[].name) for requests under /v1/... that carry "
            "no provider prefix.",
        ),
    ]
    providers: Annotated[
        list[ProviderEndpoint],
        Field(
            default_factory=lambda: [ProviderEndpoint(name=Provider.GROQ)],
            min_length=1,
            max_length=16,
            description="Providers this pool serves; /<provider>/v1/... selects one explicitly.",
        ),
    ]
    routes: Annotated[
        list[ModelRoute],
        Field(
            default_factory=list,
            max_length=MAX_ROUTES,
            description="Model names served across providers: a request for routes[].model "
            "goes to its targets in order, each with that provider's model name.",
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["model"],
            },
        ),
    ]
    strategy: Annotated[
        Strategy,
        Field(
            default=Strategy.WEIGHTED,
            description="Selection inside a tier: 'weighted' (smooth weighted round-robin) or "
            "'round-robin' (weights ignored).",
        ),
    ]
    cooldown: Annotated[
        CooldownPolicy,
        Field(default_factory=CooldownPolicy, description="How long a rate-limited key rests."),
    ]
    quota: Annotated[
        QuotaPolicy,
        Field(
            default_factory=QuotaPolicy,
            description="How long an exhausted (out of quota) key stays out.",
        ),
    ]
    retry: Annotated[
        RetryPolicy,
        Field(default_factory=RetryPolicy, description="Retry budget on 429, 5xx and errors."),
    ]
    timeouts: Annotated[Timeouts, Field(default_factory=Timeouts, description="Upstream timeouts.")]
    breaker: Annotated[
        BreakerPolicy,
        Field(default_factory=BreakerPolicy, description="Per-key circuit breaker."),
    ]
    client_auth: Annotated[
        ClientAuth,
        Field(
            default_factory=lambda: ClientAuth(disabled=True),
            description="Virtual keys that clients of the proxy must present.",
        ),
    ]

    # The same rules as cel_rules, for pool files that never meet an API server.
    @model_validator(mode="after")
    def _consistent(self) -> CreditPoolSpec:
        names = [p.name for p in self.providers]
        if self.default_provider not in names:
            raise ValueError("defaultProvider must be one of providers[].name")
        if len(names) != len(set(names)):
            raise ValueError("each provider may appear once in providers")
        if not self.client_auth.disabled and self.client_auth.secret_ref is None:
            raise ValueError("clientAuth needs a secretRef unless clientAuth.disabled is true")
        routes = [r.model for r in self.routes]
        if len(routes) != len(set(routes)):
            raise ValueError("each route model may appear once in routes")
        for route in self.routes:
            for target in route.targets:
                if target.provider not in names:
                    raise ValueError(
                        f"route {route.model}: a target names a provider this pool does not "
                        "serve (spec.providers)"
                    )
        return self

    def endpoint(self, name: str) -> ProviderEndpoint | None:
        return next((p for p in self.providers if p.name == name), None)


# --------------------------------------------------------------------------- PoolKey spec


class PoolKeySpec(_Model):
    pool: Annotated[
        str,
        Field(
            min_length=1,
            max_length=253,
            description="Name of the CreditPool (same namespace) this key belongs to.",
        ),
    ]
    provider: Annotated[
        str,
        Field(
            default=Provider.GROQ.value,
            pattern=ENDPOINT_PATTERN,
            max_length=63,
            description="The pool's provider (a CreditPool spec.providers[].name) this key "
            "authenticates against.",
        ),
    ]
    secret_ref: Annotated[
        SecretKeyRef, Field(description="Where the API key value lives. Never inline it.")
    ]
    tier: Annotated[
        int,
        Field(
            default=0,
            ge=0,
            le=9,
            description="0 is first choice; higher tiers take traffic only when every key of "
            "the lower tiers is unavailable.",
        ),
    ]
    weight: Annotated[
        int,
        Field(
            default=1,
            ge=0,
            le=1000,
            description="Share of the tier's traffic; 0 keeps the key configured but idle.",
        ),
    ]
    quota_scope: Annotated[
        str | None,
        Field(
            default=None,
            max_length=253,
            description="Keys with the same scope share one provider quota (one organisation) "
            "and cool down together.",
        ),
    ]
    models: Annotated[
        list[Annotated[str, Field(pattern=MODEL_PATTERN, max_length=256)]],
        Field(
            default_factory=list,
            max_length=MAX_KEY_MODELS,
            description="Models this key may serve: exact names and '*' globs (e.g. "
            "'llama-3.1-8b-instant', 'gpt-4o*'). Empty: every model. A request for a model no "
            "key of the pool serves gets 404 model_not_found without an upstream attempt.",
        ),
    ]
    disabled: Annotated[bool, Field(default=False, description="Take the key out of rotation.")]


# --------------------------------------------------------------------------- status


class Condition(_Model):
    type: Annotated[str, Field(description="Condition type, e.g. Ready.")]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True/False/Unknown.")]
    reason: Annotated[str, Field(description="CamelCase reason for the last transition.")]
    message: Annotated[str, Field(default="", description="Human-readable detail.")]
    last_transition_time: Annotated[str, Field(description="When status last changed (RFC 3339).")]
    observed_generation: Annotated[
        int | None, Field(default=None, description="metadata.generation this was computed for.")
    ]


_CONDITIONS_FIELD: Any = Field(
    default_factory=list,
    description="Current conditions, keyed by type.",
    json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
)


class ModelCooldown(_Model):
    model: Annotated[str, Field(description="The model this key is cooling for.")]
    until: Annotated[str, Field(description="End of that cool-down (RFC 3339).")]


class ReportCounts(_Model):
    """Cumulative counts from proxy replicas' ReplicaReports (the operator's fold)."""

    rate_limited: Annotated[int, Field(default=0, ge=0, description="429 answers.")]
    exhausted: Annotated[int, Field(default=0, ge=0, description="Out-of-quota answers.")]
    prompt_tokens: Annotated[int, Field(default=0, ge=0, description="Prompt tokens served.")]
    completion_tokens: Annotated[
        int, Field(default=0, ge=0, description="Completion tokens served.")
    ]


class AppliedReport(ReportCounts):
    """The highest cumulative counts of one ReplicaReport already added to this key's totals,
    so applying the same report twice changes nothing."""

    report: Annotated[str, Field(description="The ReplicaReport's name.")]
    uid: Annotated[str, Field(description="The ReplicaReport's uid (another object, other marks).")]
    incarnation: Annotated[
        str | None,
        Field(
            default=None,
            description="The report's spec.incarnation (the writing process): the same one "
            "continues this mark even from a re-created object, another one starts from 0.",
        ),
    ]
    gone_since: Annotated[
        str | None,
        Field(
            default=None,
            description="When the report was found gone (RFC 3339): the mark waits for its "
            "process to re-create it for a while, then moves into reportsBase.",
        ),
    ]


class PoolKeyStatus(_Model):
    phase: Annotated[
        KeyPhase | None,
        Field(
            default=None,
            description="Ready, CoolingDown (every model), Exhausted, Revoked, Invalid or "
            "Disabled.",
        ),
    ]
    cooldown_until: Annotated[
        str | None,
        Field(default=None, description="End of the current key-wide cool-down (RFC 3339)."),
    ]
    cooling_models: Annotated[
        list[ModelCooldown],
        Field(
            default_factory=list,
            max_length=COOLING_MODELS_SHOWN,
            description=f"Models this key is cooling for now (at most {COOLING_MODELS_SHOWN}, "
            "earliest deadline first; coolingMoreModels counts the rest).",
        ),
    ]
    cooling_more_models: Annotated[
        int,
        Field(default=0, ge=0, description="Models cooling beyond those in coolingModels."),
    ]
    cooling: Annotated[
        str | None,
        Field(
            default=None,
            description="What the key is cooling for, for the printer column: 'all models', "
            "or the models ('big, small and 3 more').",
        ),
    ]
    exhausted_until: Annotated[
        str | None,
        Field(
            default=None,
            description="While Exhausted: when the next token-free probe is due (RFC 3339).",
        ),
    ]
    exhausted_count: Annotated[
        int,
        Field(default=0, ge=0, description="Out-of-quota answers reported since creation."),
    ]
    applied_reports: Annotated[
        list[AppliedReport],
        Field(
            default_factory=list,
            description="Per ReplicaReport (live, or gone a short while), the counts already in "
            "the totals (operator's).",
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["report"],
            },
        ),
    ]
    reports_base: Annotated[
        ReportCounts | None,
        Field(
            default=None,
            description="Counts of ReplicaReports that are gone, folded out of appliedReports.",
        ),
    ]
    last_rate_limited: Annotated[
        str | None,
        Field(default=None, description="When a proxy last reported a 429 (RFC 3339)."),
    ]
    rate_limited_count: Annotated[
        int, Field(default=0, ge=0, description="429s reported by proxies since creation.")
    ]
    prompt_tokens: Annotated[
        int,
        Field(
            default=0,
            ge=0,
            description="Prompt tokens of the answers this key served since creation, as the "
            "provider's 'usage' reported them (summed from proxies' reports).",
        ),
    ]
    completion_tokens: Annotated[
        int,
        Field(
            default=0,
            ge=0,
            description="Completion tokens of the answers this key served since creation.",
        ),
    ]
    fingerprint: Annotated[
        str | None,
        Field(default=None, description="First 8 hex digits of the key's SHA-256."),
    ]
    message: Annotated[str | None, Field(default=None, description="Why the key is not Ready.")]
    observed_generation: Annotated[
        int | None, Field(default=None, description="metadata.generation last reconciled.")
    ]
    conditions: Annotated[list[Condition], _CONDITIONS_FIELD]


class CreditPoolStatus(_Model):
    ready: Annotated[
        Literal["True", "False"] | None,
        Field(default=None, description="Whether the pool has at least one usable key."),
    ]
    keys_ready: Annotated[int, Field(default=0, ge=0, description="Keys in rotation.")]
    keys_total: Annotated[int, Field(default=0, ge=0, description="Keys that name this pool.")]
    keys_cooling: Annotated[int, Field(default=0, ge=0, description="Keys cooling down.")]
    keys_invalid: Annotated[
        int, Field(default=0, ge=0, description="Keys that are Invalid or Revoked.")
    ]
    keys_summary: Annotated[
        str | None, Field(default=None, description="'ready/total', for the printer column.")
    ]
    table_version: Annotated[
        int | None, Field(default=None, description="Version of the routing table last written.")
    ]
    table_hash: Annotated[
        str | None, Field(default=None, description="Content hash of that routing table.")
    ]
    observed_generation: Annotated[
        int | None, Field(default=None, description="metadata.generation last reconciled.")
    ]
    conditions: Annotated[list[Condition], _CONDITIONS_FIELD]


# --------------------------------------------------------------------------- VirtualKey


class VirtualKeyLimits(_Model):
    requests_per_minute: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            le=100_000_000,
            description="Requests admitted per calendar minute (UTC), across every proxy "
            "replica together. Unset: no limit.",
        ),
    ]
    tokens_per_minute: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            le=10_000_000_000,
            description="Prompt + completion tokens per calendar minute, as the provider's "
            "'usage' reports them, across every replica. A request is refused once the minute's "
            "tokens reached the limit (the request that crosses it is not cut off). Unset: no "
            "limit.",
        ),
    ]
    max_concurrent: Annotated[
        int | None,
        Field(
            default=None,
            ge=1,
            le=1_000_000,
            description="Requests in flight at once, across every replica. Unset: no limit.",
        ),
    ]


class VirtualKeySpec(_Model):
    pool: Annotated[
        str,
        Field(
            min_length=1,
            max_length=63,
            description="Name of the CreditPool (same namespace) this client may use.",
        ),
    ]
    secret_ref: Annotated[
        SecretKeyRef,
        Field(
            description="Where the value this client sends lives ('Authorization: Bearer <value>' "
            "or 'x-api-key'). Only its SHA-256 digest leaves the Secret."
        ),
    ]
    models: Annotated[
        list[Annotated[str, Field(pattern=MODEL_PATTERN, max_length=256)]],
        Field(
            default_factory=list,
            max_length=MAX_KEY_MODELS,
            description="Models this client may ask for: exact names and '*' globs. Empty: every "
            "model. Any other model gets 403 model_not_allowed without an upstream attempt.",
        ),
    ]
    limits: Annotated[
        VirtualKeyLimits,
        Field(
            default_factory=VirtualKeyLimits,
            description="Per-minute and concurrency limits; over one, 429 virtual_key_limit.",
        ),
    ]
    disabled: Annotated[
        bool, Field(default=False, description="Refuse this client (401) without deleting it.")
    ]


class VirtualKeyUsage(_Model):
    requests: Annotated[int, Field(default=0, ge=0, description="Requests admitted.")]
    prompt_tokens: Annotated[
        int, Field(default=0, ge=0, description="Prompt (input) tokens the provider reported.")
    ]
    completion_tokens: Annotated[
        int,
        Field(default=0, ge=0, description="Completion (output) tokens the provider reported."),
    ]
    tokens: Annotated[int, Field(default=0, ge=0, description="promptTokens + completionTokens.")]


class VirtualKeyStatus(_Model):
    minute: Annotated[
        str | None,
        Field(default=None, description="Start of the minute 'currentMinute' counts (RFC 3339)."),
    ]
    current_minute: Annotated[
        VirtualKeyUsage,
        Field(
            default_factory=VirtualKeyUsage,
            description="Usage in that minute, summed over every replica's report.",
        ),
    ]
    total: Annotated[
        VirtualKeyUsage,
        Field(default_factory=VirtualKeyUsage, description="Usage since the key was created."),
    ]
    last_used: Annotated[
        str | None, Field(default=None, description="When a request last used it (RFC 3339).")
    ]
    fingerprint: Annotated[
        str | None,
        Field(default=None, description="First 8 hex digits of the value's SHA-256."),
    ]
    observed_generation: Annotated[
        int | None, Field(default=None, description="metadata.generation last reconciled.")
    ]
    conditions: Annotated[list[Condition], _CONDITIONS_FIELD]


# --------------------------------------------------------------------------- routing table


class KeyState(StrEnum):
    """A key's state as the routing table carries it to every proxy replica."""

    READY = "ready"
    COOLING = "cooling"
    REVOKED = "revoked"


class TableKey(_Model):
    name: str = Field(min_length=1, description="PoolKey name; also its data key in the Secret.")
    provider: str  # an endpoint name (settings.base_urls)
    tier: int = Field(ge=0, le=9)
    weight: int = Field(ge=0, le=1000)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{8}$")
    quota_scope: str | None = None
    models: list[str] = Field(default_factory=list)
    # Deprecated, always "ready" / unset: health travels on ReplicaReports (sideproxy.wire), not
    # in the table, and proxies ignore these. Kept only until the operator stops reading them.
    state: KeyState = KeyState.READY
    cooldown_until: float | None = None


class TableVirtualKey(_Model):
    """A VirtualKey as every proxy replica needs it: its digest, never its value."""

    name: str = Field(min_length=1, description="VirtualKey name.")
    # SHA-256 of the value, hex. A digest is not key material (it cannot be sent as a key), but
    # it is a guess-checker for a weak value: VirtualKey values should be long random strings.
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    models: list[str] | None = None  # None: every model (and a shorter table)
    limits: VirtualKeyLimits | None = None  # None: no limit


class TableSettings(_Model):
    default_provider: str = Provider.GROQ.value
    base_urls: dict[str, str] = Field(default_factory=dict)  # endpoint name -> base URL
    # Endpoint name -> its provider type, for endpoints whose name is not their type.
    types: dict[str, Provider] | None = None
    strategy: Strategy = Strategy.WEIGHTED
    cooldown: CooldownPolicy = Field(default_factory=CooldownPolicy)
    quota: QuotaPolicy = Field(default_factory=QuotaPolicy)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    client_auth_required: bool = False


class TableTarget(_Model):
    provider: str  # an endpoint name
    model: str
    order: int = Field(ge=0)
    weight: int = Field(ge=1)


class TableRoute(_Model):
    model: str
    targets: list[TableTarget] = Field(min_length=1)


class RoutingTable(_Model):
    """What the operator writes to the pool's ConfigMap and every proxy replica serves from.

    Never carries key material: only names and fingerprints. ``hash`` covers everything but
    ``version`` and ``hash`` itself, so a writer can compare before writing.
    """

    format: int = TABLE_FORMAT
    pool: str
    namespace: str = ""
    version: int = Field(default=0, ge=0)
    hash: str = ""
    settings: TableSettings = Field(default_factory=TableSettings)
    keys: list[TableKey] = Field(default_factory=list)
    routes: list[TableRoute] | None = None
    # None (not []) when the pool has no VirtualKeys, so a table without them keeps the JSON
    # and the hash it had before VirtualKeys existed.
    virtual_keys: list[TableVirtualKey] | None = None

    def content_hash(self) -> str:
        body = self.model_dump(by_alias=True, mode="json", exclude={"version", "hash"})
        # Fields added later hash only when set, so a table written before they existed keeps
        # its hash (a proxy upgraded before its operator still loads it).
        if body["routes"] is None:
            del body["routes"]
        if body["settings"]["types"] is None:
            del body["settings"]["types"]
        if body["virtualKeys"] is None:
            del body["virtualKeys"]
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def sealed(self, version: int) -> RoutingTable:
        """This table with its version set and its hash computed."""
        return self.model_copy(update={"version": version, "hash": self.content_hash()})

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, exclude_none=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> RoutingTable:
        """Parse and verify a table; raises ``ValueError`` for anything a proxy must not load."""
        table = cls.model_validate_json(text)
        if table.format != TABLE_FORMAT:
            raise ValueError(f"routing table format {table.format} is not {TABLE_FORMAT}")
        if table.hash != table.content_hash():
            raise ValueError("routing table hash does not match its content")
        names = [key.name for key in table.keys]
        if len(names) != len(set(names)):
            raise ValueError("routing table names a key twice")
        virtual = table.virtual_keys or []
        if len({v.name for v in virtual}) != len(virtual):
            raise ValueError("routing table names a virtual key twice")
        if len({v.digest for v in virtual}) != len(virtual):
            raise ValueError("routing table holds one virtual key digest twice")
        return table


def cooling_summary(models: list[str], more: int, key_wide: bool) -> str | None:
    """The printer column: 'all models' for a key-wide cool-down, else the models cooling."""
    if key_wide:
        return "all models"
    if not models:
        return None
    text = ", ".join(models)
    return f"{text} and {more} more" if more else text


def compact_cooling(
    cooling: Iterable[tuple[str, float]],
    key_wide: bool,
    now: float,
    rfc3339: Callable[[float], str],
) -> dict[str, Any]:
    """PoolKey.status fields for a key's per-model cool-downs, compact whatever their number.

    ``cooling``: (model, until) pairs (a model may repeat: the latest deadline wins); those
    already over at ``now`` are left out. At most ``COOLING_MODELS_SHOWN`` are listed, earliest
    deadline first; the rest are counted. Returns the camelCase fields to merge into status.
    """
    latest: dict[str, float] = {}
    for model, until in cooling:
        if until > now and until > latest.get(model, 0.0):
            latest[model] = until
    ordered = sorted(latest.items(), key=lambda item: (item[1], item[0]))
    shown = ordered[:COOLING_MODELS_SHOWN]
    more = len(ordered) - len(shown)
    return {
        "coolingModels": [ModelCooldown(model=m, until=rfc3339(u)).dump() for m, u in shown],
        "coolingMoreModels": more,
        "cooling": cooling_summary([m for m, _ in shown], more, key_wide),
    }


def fingerprint(secret: str) -> str:
    """The short, non-reversible name of a key value that may appear anywhere."""
    return hashlib.sha256(secret.encode()).hexdigest()[:8]


def digest(secret: str) -> str:
    """A virtual key value's whole SHA-256 (hex): what the routing table carries for it."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()
