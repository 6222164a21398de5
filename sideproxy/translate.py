"""Pure translation: CreditPool + PoolKeys + Secrets -> routing table + key material.

The operator runs this on cluster objects; ``sideproxy serve --file`` runs it on the same
manifests read from YAML, so standalone and cluster modes cannot disagree about what a pool means.
No I/O and no clock: ``now`` is an argument.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from sideproxy.models import (
    API_GROUP,
    TABLE_SIZE_LIMIT,
    VIRTUAL_KEYS_DATA_KEY,
    CreditPoolSpec,
    KeyPhase,
    KeyState,
    ModelRoute,
    PoolKeySpec,
    PoolKeyStatus,
    Provider,
    RoutingTable,
    TableKey,
    TableRoute,
    TableSettings,
    TableTarget,
    TableVirtualKey,
    VirtualKeySpec,
    digest,
    fingerprint,
)

# The pool's own glob matcher, so a route is checked exactly as the pool will select keys.
from sideproxy.pool._models import Matcher, compile_patterns, serves

SecretData = Mapping[str, Mapping[str, str]]  # Secret name -> decoded data


@dataclass(frozen=True, slots=True)
class VirtualKeyInput:
    name: str
    spec: VirtualKeySpec
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class PoolInput:
    name: str
    namespace: str
    spec: CreditPoolSpec
    # The VirtualKeys that name this pool (others are ignored): client identities with limits.
    virtual_keys: tuple[VirtualKeyInput, ...] = ()


@dataclass(frozen=True, slots=True)
class KeyInput:
    name: str
    spec: PoolKeySpec
    status: PoolKeyStatus | None = None
    generation: int | None = None


@dataclass(frozen=True, slots=True)
class KeyVerdict:
    """What the operator writes to one PoolKey's status."""

    phase: KeyPhase
    reason: str
    message: str
    fingerprint: str | None = None
    cooldown_until: float | None = None


@dataclass(frozen=True, slots=True)
class VirtualKeyVerdict:
    """What the operator writes to one VirtualKey's Ready condition (and an Event when not)."""

    ready: bool
    reason: str
    message: str  # names objects and fields, never a value
    fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class Translation:
    table: RoutingTable  # unsealed: version 0, no hash
    material: dict[str, str] = field(repr=False)  # Secret data key -> value; never log this
    verdicts: dict[str, KeyVerdict]
    problems: list[str]  # pool-level: each one a sentence for a condition message
    virtual_verdicts: dict[str, VirtualKeyVerdict] = field(default_factory=dict)

    @property
    def usable_keys(self) -> int:
        return sum(
            1
            for key in self.table.keys
            if self.verdicts[key.name].phase is KeyPhase.READY and key.weight > 0
        )


def translate(
    pool: PoolInput, keys: Iterable[KeyInput], secrets: SecretData, now: float
) -> Translation:
    spec = pool.spec
    served = {endpoint.name for endpoint in spec.providers}
    mine = [key for key in keys if key.spec.pool == pool.name]
    _check_routes(pool, mine)
    material: dict[str, str] = {}
    verdicts: dict[str, KeyVerdict] = {}
    table_keys: list[TableKey] = []
    problems: list[str] = []
    owner_of_value: dict[str, str] = {}

    for key in sorted(mine, key=lambda k: k.name):
        if key.name == VIRTUAL_KEYS_DATA_KEY:
            # The CRD refuses this name; pool files never meet the API server.
            verdicts[key.name] = _invalid(
                "ReservedName",
                f"the name {VIRTUAL_KEYS_DATA_KEY!r} is reserved for the pool's virtual keys",
            )
            continue
        if key.spec.disabled:
            verdicts[key.name] = KeyVerdict(KeyPhase.DISABLED, "Disabled", "spec.disabled is true")
            continue
        if key.spec.provider not in served:
            verdicts[key.name] = _invalid(
                "ProviderNotServed",
                f"provider {key.spec.provider!r} is not in CreditPool {pool.name!r} spec.providers",
            )
            continue
        value, problem = _resolve(secrets, key.spec.secret_ref.name, key.spec.secret_ref.key)
        if value is None:
            verdicts[key.name] = _invalid("SecretNotResolved", problem)
            continue
        print_ = fingerprint(value)
        if value in owner_of_value:
            verdicts[key.name] = _invalid(
                "DuplicateKey",
                f"holds the same key value as PoolKey {owner_of_value[value]!r}",
                print_,
            )
            continue
        owner_of_value[value] = key.name
        material[key.name] = value

        state, until = _health(key, print_, now)
        if state is KeyState.REVOKED:
            verdict = KeyVerdict(
                KeyPhase.REVOKED,
                "Unauthorized",
                "the provider rejected this key (401/403); change the Secret or spec to retry",
                print_,
            )
        elif state is KeyState.COOLING:
            verdict = KeyVerdict(
                KeyPhase.COOLING_DOWN, "RateLimited", "cooling down after a 429", print_, until
            )
        else:
            verdict = KeyVerdict(KeyPhase.READY, "Ready", "in rotation", print_)
        verdicts[key.name] = verdict
        table_keys.append(
            TableKey(
                name=key.name,
                provider=key.spec.provider,
                tier=key.spec.tier,
                weight=key.spec.weight,
                fingerprint=print_,
                quota_scope=key.spec.quota_scope,
                models=key.spec.models,
            )
        )

    identities, virtual_verdicts = _virtual_keys(pool, secrets)
    auth = spec.client_auth
    _anonymous_keys(spec, secrets, material, problems)

    table = RoutingTable(
        pool=pool.name,
        namespace=pool.namespace,
        settings=TableSettings(
            default_provider=spec.default_provider,
            base_urls={endpoint.name: endpoint.url for endpoint in spec.providers},
            types={p.name: p.kind for p in spec.providers if p.name != p.kind.value} or None,
            strategy=spec.strategy,
            cooldown=spec.cooldown,
            quota=spec.quota,
            retry=spec.retry,
            timeouts=spec.timeouts,
            breaker=spec.breaker,
            # A VirtualKey's limits would mean nothing if a client could send no key at all.
            client_auth_required=not auth.disabled or bool(virtual_verdicts),
        ),
        keys=table_keys,
        routes=[_table_route(route) for route in spec.routes] or None,
        virtual_keys=identities or None,
    )
    size = len(table.sealed(1).to_json())
    if size > TABLE_SIZE_LIMIT:
        problems.append(
            f"routing table is {size} bytes, over the {TABLE_SIZE_LIMIT}-byte ConfigMap limit; "
            "split the pool"
        )
    # Health reaches the proxies on their own channel (ReplicaReports), never in the table;
    # the verdicts (PoolKey status) still say which keys rest.
    if not any(verdicts[k.name].phase is KeyPhase.READY and k.weight > 0 for k in table_keys):
        problems.append("no usable key: every PoolKey is missing, invalid, disabled or resting")
    return Translation(table, material, verdicts, problems, virtual_verdicts)


def _anonymous_keys(
    spec: CreditPoolSpec, secrets: SecretData, material: dict[str, str], problems: list[str]
) -> None:
    """``clientAuth.secretRef``: keys without a name or limits, into ``material``."""
    auth = spec.client_auth
    if not auth.disabled and auth.secret_ref is not None:
        virtual, problem = _resolve(secrets, auth.secret_ref.name, auth.secret_ref.key)
        if virtual is None:
            problems.append(f"clientAuth: {problem}; every client will be refused")
        else:
            material[VIRTUAL_KEYS_DATA_KEY] = virtual


def _virtual_keys(
    pool: PoolInput, secrets: SecretData
) -> tuple[list[TableVirtualKey], dict[str, VirtualKeyVerdict]]:
    """The pool's VirtualKeys as table entries (digests only) and one verdict each.

    A key whose Secret is missing or empty, or whose value another key (first by name) already
    holds, authenticates nothing: two identities behind one value would make limits ambiguous.
    """
    entries: list[TableVirtualKey] = []
    verdicts: dict[str, VirtualKeyVerdict] = {}
    owner: dict[str, str] = {}  # digest -> VirtualKey name
    for vk in sorted(pool.virtual_keys, key=lambda v: v.name):
        if vk.spec.pool != pool.name:
            continue
        if vk.spec.disabled:
            verdicts[vk.name] = VirtualKeyVerdict(False, "Disabled", "spec.disabled is true")
            continue
        ref = vk.spec.secret_ref
        value, problem = _resolve(secrets, ref.name, ref.key)
        if value is None:
            verdicts[vk.name] = VirtualKeyVerdict(
                False, "SecretNotResolved", f"{problem}; this key authenticates nothing"
            )
            continue
        hexdigest, print_ = digest(value), fingerprint(value)
        if hexdigest in owner:
            verdicts[vk.name] = VirtualKeyVerdict(
                False,
                "DuplicateValue",
                f"holds the same value as VirtualKey {owner[hexdigest]!r}; this key "
                "authenticates nothing",
                print_,
            )
            continue
        owner[hexdigest] = vk.name
        limits = vk.spec.limits
        has_limits = limits.model_dump(exclude_none=True) != {}
        entries.append(
            TableVirtualKey(
                name=vk.name,
                digest=hexdigest,
                models=list(vk.spec.models) or None,
                limits=limits if has_limits else None,
            )
        )
        verdicts[vk.name] = VirtualKeyVerdict(True, "Ready", "authenticates clients", print_)
    return entries, verdicts


class RouteError(ValueError):
    """Routes that cannot be served: the table is refused whole (the last good one stays)."""


def routes_refused(spec: CreditPoolSpec, keys: Iterable[PoolKeySpec | None]) -> str:
    """``route_problems`` as one message ("" when the routes are fine), over the specs of the
    pool's PoolKeys (None: one that does not parse, skipped): the operator's condition."""
    return "; ".join(route_problems(spec, [k for k in keys if k is not None]))


def route_problems(spec: CreditPoolSpec, keys: Iterable[PoolKeySpec]) -> list[str]:
    """Why the pool's routes cannot be served, one sentence per route target at fault.

    What the CRD's CEL can check (a target's provider is one of spec.providers) is checked by
    the spec model too; what needs the PoolKeys is checked here: some key of the target's
    provider may serve its model (PoolKey.spec.models, whatever the key's health, so a key
    that is resting or disabled for a while never invalidates a route).
    """
    matchers: dict[str, list[Matcher]] = {}
    for key in keys:
        matchers.setdefault(key.provider, []).append(compile_patterns(key.models))
    problems = []
    for route in spec.routes:
        for target in route.targets:
            if spec.endpoint(target.provider) is None:
                problems.append(
                    f"route {route.model}: provider {target.provider!r} is not in spec.providers"
                )
            elif not any(serves(m, target.model) for m in matchers.get(target.provider, ())):
                problems.append(
                    f"route {route.model}: no PoolKey of provider {target.provider!r} may serve "
                    f"model {target.model!r} (spec.models)"
                )
    return problems


def _check_routes(pool: PoolInput, keys: list[KeyInput]) -> None:
    refused = route_problems(pool.spec, [k.spec for k in keys])
    if refused:
        raise RouteError(f"CreditPool {pool.name!r}: {'; '.join(refused)}")


def _table_route(route: ModelRoute) -> TableRoute:
    return TableRoute(
        model=route.model,
        targets=[
            TableTarget(provider=t.provider, model=t.model, order=order, weight=t.weight)
            for t, order in zip(route.targets, route.orders(), strict=True)
        ],
    )


def _invalid(reason: str, message: str, print_: str | None = None) -> KeyVerdict:
    return KeyVerdict(KeyPhase.INVALID, reason, message, print_)


def _resolve(secrets: SecretData, name: str, key: str) -> tuple[str | None, str]:
    data = secrets.get(name)
    if data is None:
        return None, f"Secret {name!r} not found"
    if key not in data:
        return None, f"Secret {name!r} has no key {key!r}"
    value = data[key].strip()
    if not value:
        return None, f"Secret {name!r} key {key!r} is empty"
    return value, ""


def _health(key: KeyInput, print_: str, now: float) -> tuple[KeyState, float | None]:
    """Proxy-reported health from PoolKey status, for the key's verdict (status only).

    A revocation holds while the key is exactly as it was when revoked (same value, same
    generation); editing the Secret or the spec gives the key a fresh chance.
    """
    status = key.status
    if status is None:
        return KeyState.READY, None
    if (
        status.phase is KeyPhase.REVOKED
        and status.fingerprint == print_
        and status.observed_generation == key.generation
    ):
        return KeyState.REVOKED, None
    until = parse_time(status.cooldown_until)
    if until is not None and until > now:
        return KeyState.COOLING, until
    return KeyState.READY, None


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


# --------------------------------------------------------------------------- manifests


class ManifestError(ValueError):
    """A pool file (or set of manifests) that cannot become a routing table."""


def from_manifests(
    documents: Iterable[Mapping[str, Any] | None], pool_name: str | None = None
) -> tuple[PoolInput, list[KeyInput], dict[str, dict[str, str]]]:
    """Split ``kubectl apply``-style manifests into translate()'s inputs.

    Raises ManifestError with a message naming the object and field at fault.
    """
    pools: list[PoolInput] = []
    keys: list[KeyInput] = []
    virtual: list[VirtualKeyInput] = []
    secrets: dict[str, dict[str, str]] = {}
    for doc in documents:
        if not doc:
            continue
        kind = doc.get("kind")
        meta = doc.get("metadata") or {}
        if not isinstance(meta, Mapping):
            raise ManifestError(f"a {kind or 'document'}'s metadata is not a mapping")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            raise ManifestError(f"a {kind or 'document'} has no metadata.name")
        where = f"{kind} {name!r}"
        api_version = str(doc.get("apiVersion", ""))
        try:
            if kind == "Secret":
                secrets[name] = _secret_data(doc, where)
            elif kind == "CreditPool" and api_version.startswith(API_GROUP + "/"):
                spec = CreditPoolSpec.model_validate(doc.get("spec") or {})
                pools.append(PoolInput(name, str(meta.get("namespace", "")), spec))
            elif kind == "PoolKey" and api_version.startswith(API_GROUP + "/"):
                keys.append(KeyInput(name, PoolKeySpec.model_validate(doc.get("spec") or {})))
            elif kind == "VirtualKey" and api_version.startswith(API_GROUP + "/"):
                spec_ = VirtualKeySpec.model_validate(doc.get("spec") or {})
                virtual.append(VirtualKeyInput(name, spec_))
            else:
                raise ManifestError(f"{where}: unsupported apiVersion/kind {api_version}/{kind}")
        except ValidationError as exc:
            raise ManifestError(f"{where}: {explain_spec_error(exc)}") from None
    if pool_name is not None:
        pools = [p for p in pools if p.name == pool_name]
    if len(pools) != 1:
        wanted = f" named {pool_name!r}" if pool_name else ""
        raise ManifestError(f"expected exactly one CreditPool{wanted}, found {len(pools)}")
    names = [vk.name for vk in virtual]
    if len(names) != len(set(names)):
        raise ManifestError("two VirtualKeys have the same metadata.name")
    pool = pools[0]
    mine = tuple(vk for vk in virtual if vk.spec.pool == pool.name)
    return PoolInput(pool.name, pool.namespace, pool.spec, mine), keys, secrets


def _secret_data(doc: Mapping[str, Any], where: str) -> dict[str, str]:
    for field_name in ("data", "stringData"):
        if not isinstance(doc.get(field_name) or {}, Mapping):
            raise ManifestError(f"{where}: {field_name} is not a mapping")
    data: dict[str, str] = {}
    for key, value in (doc.get("data") or {}).items():
        try:
            data[str(key)] = base64.b64decode(str(value), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            raise ManifestError(f"{where}: data.{key} is not base64 of UTF-8 text") from None
    for key, value in (doc.get("stringData") or {}).items():
        data[str(key)] = str(value)
    return data


def explain_spec_error(exc: ValidationError) -> str:
    """A spec validation error as one line naming each field at fault (no input values)."""
    parts = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in error["loc"])
        parts.append(f"spec.{loc}: {error['msg']}" if loc else error["msg"])
    return "; ".join(parts)


def from_env_keys(
    values: Iterable[str],
    provider: Provider = Provider.GROQ,
    base_url: str | None = None,
) -> Translation:
    """The seed's ``SIDE_POOL_KEYS="k1,k2"``: one tier, equal weights, keys named key-1..N.

    Client auth is enforced by the proxy's own settings in this mode, so the table says none.
    """
    try:
        spec = CreditPoolSpec.model_validate(
            {
                "defaultProvider": provider,
                "providers": [{"name": provider, "baseURL": base_url}],
                "clientAuth": {"disabled": True},
            }
        )
    except ValidationError as exc:
        problem = explain_spec_error(exc)
        raise ManifestError(f"SIDE_POOL_PROVIDER / SIDE_POOL_BASE_URL: {problem}") from None
    secret = {f"key-{i}": v for i, v in enumerate((v.strip() for v in values if v.strip()), 1)}
    keys = [
        KeyInput(
            name,
            PoolKeySpec.model_validate(
                {"pool": "env", "provider": provider, "secretRef": {"name": "env", "key": name}}
            ),
        )
        for name in secret
    ]
    return translate(PoolInput("env", "", spec), keys, {"env": secret}, now=0.0)
