"""A snapshot from a config source, checked and compiled into the runtime ``Compiled`` object.

``Compiled`` is immutable; the app swaps it in with one attribute assignment, so a request sees
either the old table or the new one, never a mix. Compilation is all-or-nothing: anything wrong
raises :class:`CompileError` (a message without key material) before the pool is touched.
A key whose material is missing or does not match the table's fingerprint is held back (left
out of the pool, listed in the status endpoint) rather than failing the whole table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from yarl import URL

from sideproxy.models import (
    DEFAULT_BASE_URLS,
    VIRTUAL_KEYS_DATA_KEY,
    Provider,
    TableRoute,
    fingerprint,
)
from sideproxy.pool import KeyConfig, PoolPolicy
from sideproxy.proxy._auth import VirtualKeys, parse_virtual_keys
from sideproxy.proxy._headers import AUTHORIZATION, X_API_KEY
from sideproxy.proxy._settings import ProxySettings
from sideproxy.proxy._targets import Routes, TargetError, compile_routes
from sideproxy.proxy.sources import Snapshot

__all__ = ["CompileError", "Compiled", "Upstream", "compile_snapshot"]


class CompileError(ValueError):
    """A snapshot the proxy refuses to serve."""


@dataclass(frozen=True, slots=True)
class Upstream:
    provider: str
    base: str  # scheme://host[:port]/path, no trailing slash, no userinfo
    auth_name: bytes  # Authorization, or x-api-key for Anthropic
    auth_prefix: bytes  # b"Bearer " or b""
    anthropic: bool  # Anthropic's error/event shapes


@dataclass(frozen=True, slots=True)
class Compiled:
    snapshot: Snapshot = field(repr=False)
    default: Upstream | None
    upstreams: Mapping[str, Upstream]
    virtual_keys: VirtualKeys
    policy: PoolPolicy
    keys: tuple[KeyConfig, ...] = field(repr=False)
    held_back: tuple[str, ...]  # in the table, but no (matching) key material
    max_attempts: int
    retry_budget: float
    first_byte: float
    idle_stream: float
    connect: float
    total: float
    loaded_at: float
    routes: Routes  # route model -> its targets (issue 13); empty: no routes

    @property
    def version(self) -> int:
        return self.snapshot.table.version


def _upstream(provider: str, url: str, kind: Provider) -> Upstream:
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise CompileError(f"base URL of provider {provider!r} is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise CompileError(f"base URL of provider {provider!r} must be http(s)://host/...")
    if parsed.user is not None or parsed.password is not None:
        raise CompileError(f"base URL of provider {provider!r} must not carry credentials")
    if parsed.query_string or parsed.fragment:
        raise CompileError(f"base URL of provider {provider!r} must not have a query or fragment")
    anthropic = kind is Provider.ANTHROPIC
    return Upstream(
        provider=provider,
        base=str(parsed).rstrip("/"),
        auth_name=X_API_KEY if anthropic else AUTHORIZATION,
        auth_prefix=b"" if anthropic else b"Bearer ",
        anthropic=anthropic,
    )


def _kind(types: Mapping[str, Provider], name: str) -> Provider:
    """An endpoint's provider type: named in the table, or the name itself when it is one."""
    kind = types.get(name)
    if kind is not None:
        return kind
    return Provider(name) if name in _TYPES else Provider.CUSTOM


_TYPES = frozenset(p.value for p in Provider)


def compile_snapshot(snapshot: Snapshot, settings: ProxySettings, now: float) -> Compiled:
    table = snapshot.table
    material = snapshot.material
    ts = table.settings

    base_urls = dict(ts.base_urls)  # endpoint name -> URL; a name that is a type may omit it
    for provider in (ts.default_provider, *(key.provider for key in table.keys)):
        if provider not in base_urls:
            default = DEFAULT_BASE_URLS.get(_kind(ts.types or {}, provider))
            if default is None:
                raise CompileError(f"provider {provider!r} has no base URL")
            base_urls[provider] = default
    upstreams = {p: _upstream(p, url, _kind(ts.types or {}, p)) for p, url in base_urls.items()}

    configs: list[KeyConfig] = []
    held_back: list[str] = []
    for key in table.keys:
        secret = material.get(key.name)
        if not secret or fingerprint(secret) != key.fingerprint:
            # A Secret mid-rotation, or a table newer than its material: this key sits out
            # until both agree; the rest of the table is served.
            held_back.append(key.name)
            continue
        configs.append(
            KeyConfig(
                name=key.name,
                provider=key.provider,
                secret=secret,
                tier=key.tier,
                weight=key.weight,
                quota_scope=key.quota_scope,
                models=tuple(key.models),
            )
        )

    required = ts.client_auth_required or bool(settings.virtual_keys)
    accepted = list(settings.virtual_keys)
    if ts.client_auth_required:
        accepted += parse_virtual_keys(material.get(VIRTUAL_KEYS_DATA_KEY))
    virtual = VirtualKeys(accepted, required=required, named=table.virtual_keys or ())

    timeouts = ts.timeouts
    return Compiled(
        snapshot=snapshot,
        default=upstreams.get(ts.default_provider),
        upstreams=upstreams,
        virtual_keys=virtual,
        policy=PoolPolicy.from_settings(ts),
        keys=tuple(configs),
        held_back=tuple(held_back),
        max_attempts=ts.retry.max_attempts,
        retry_budget=ts.retry.total_timeout_seconds,
        first_byte=timeouts.first_byte_seconds,
        idle_stream=timeouts.idle_stream_seconds,
        connect=timeouts.connect_seconds,
        total=timeouts.total_seconds,
        loaded_at=now,
        routes=_routes(table.routes or (), upstreams),
    )


def _routes(routes: Iterable[TableRoute], upstreams: Mapping[str, Upstream]) -> Routes:
    try:
        return compile_routes(routes, upstreams)
    except TargetError as exc:
        raise CompileError(str(exc)) from None
