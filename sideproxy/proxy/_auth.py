"""Virtual keys: who a client is, from what it presents instead of a provider key.

A client sends its virtual key as ``Authorization: Bearer <vk>`` (the OpenAI SDK) or
``x-api-key: <vk>`` (the Anthropic SDK). Only SHA-256 digests are kept. Finding the key costs the
same at 10 or 10,000 keys (``bench/vkey_auth.py``): the presented value is hashed once, the
digest looked up in a dict, and the entry found is confirmed with one
:func:`hmac.compare_digest`.

Why a dict lookup on the digest leaks nothing useful: its timing can at most depend on how the
*digest* of a guess relates to a stored digest, and SHA-256 gives an attacker no way to steer a
digest towards one, so a near-miss digest says nothing about any value.

Two kinds of identity:

* a **VirtualKey** (``RoutingTable.virtual_keys``): a name, a model allow-list, limits;
* an **anonymous** key (``CreditPool.spec.clientAuth.secretRef``, ``--virtual-key``): no name,
  every model, no limit. A value that is both is the VirtualKey, so its limits cannot be
  dodged.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

from sideproxy.models import TableVirtualKey, VirtualKeyLimits
from sideproxy.pool._models import Matcher, compile_patterns, serves

__all__ = ["ANONYMOUS", "Identity", "VirtualKeys", "parse_virtual_keys", "presented_key"]


def parse_virtual_keys(text: str | None) -> list[str]:
    """Virtual keys from Secret data or an env var: one per line or comma-separated."""
    if not text:
        return []
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


class Identity:
    """Who a request is: a VirtualKey (``name`` set) or an anonymous key (``name`` None)."""

    __slots__ = ("digest", "limits", "matcher", "models", "name")

    def __init__(
        self,
        name: str | None,
        digest: bytes,
        models: tuple[str, ...] = (),
        limits: VirtualKeyLimits | None = None,
    ) -> None:
        self.name = name
        self.digest = digest
        self.models = models
        self.matcher: Matcher = compile_patterns(models)
        self.limits = limits

    def allows(self, model: str | None) -> bool:
        """May this identity ask for ``model``? A request that names none: yes."""
        return serves(self.matcher, model)

    def __repr__(self) -> str:  # the digest stays out of logs too
        return f"Identity(name={self.name!r}, models={len(self.models)})"


# Every client when the pool requires no key.
ANONYMOUS = Identity(None, b"")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The value a client presents (bearer token first, then ``x-api-key``), or None."""
    presented = headers.get("Authorization")
    if presented is not None:
        scheme, _, token = presented.partition(" ")
        presented = token.strip() if scheme.lower() == "bearer" else None
    if not presented:
        presented = headers.get("x-api-key")
    return presented or None


class VirtualKeys:
    """The accepted keys of one routing table: digest -> :class:`Identity`."""

    __slots__ = ("_by_digest", "limits", "named", "required")

    def __init__(
        self,
        keys: Iterable[str],
        *,
        required: bool,
        named: Iterable[TableVirtualKey] = (),
    ) -> None:
        by_digest: dict[bytes, Identity] = {}
        for key in keys:
            digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
            by_digest[digest] = Identity(None, digest)
        limits: dict[str, VirtualKeyLimits | None] = {}
        for entry in named:  # after the anonymous ones: a VirtualKey wins a shared value
            digest = bytes.fromhex(entry.digest)
            models = tuple(entry.models or ())
            by_digest[digest] = Identity(entry.name, digest, models, entry.limits)
            limits[entry.name] = entry.limits
        self._by_digest = by_digest
        # The VirtualKeys of this table and their limits (names: what metric labels may say).
        self.limits: Mapping[str, VirtualKeyLimits | None] = limits
        self.named = frozenset(limits)
        # Required with no keys at all means every client is refused: fail closed.
        self.required = required

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"VirtualKeys(count={len(self._by_digest)}, required={self.required})"

    def identify(self, headers: Mapping[str, str]) -> Identity | None:
        """Who presents these headers (``_exchange.Headers``, aiohttp's); None: nobody we know.

        When no key is required every client is :data:`ANONYMOUS`, except one presenting a
        VirtualKey, who gets that key's models and limits.
        """
        presented = presented_key(headers)
        if presented is None:
            return None if self.required else ANONYMOUS
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(digest, found.digest):
            return None if self.required else ANONYMOUS
        return found

    def check(self, headers: Mapping[str, str]) -> bool:
        """Does a client with these headers get in at all?"""
        return self.identify(headers) is not None
