"""Virtual keys: what clients present instead of a provider key.

A client sends its virtual key as ``Authorization: Bearer <vk>`` (the OpenAI SDK) or
``x-api-key: <vk>`` (the Anthropic SDK). Only SHA-256 digests are kept; a presented key is hashed
and compared against every digest with :func:`hmac.compare_digest`, without stopping at the first
match, so timing tells nothing about which key (or how much of one) matched.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping

__all__ = ["VirtualKeys", "parse_virtual_keys"]


def parse_virtual_keys(text: str | None) -> list[str]:
    """Virtual keys from Secret data or an env var: one per line or comma-separated."""
    if not text:
        return []
    return [part.strip() for line in text.splitlines() for part in line.split(",") if part.strip()]


class VirtualKeys:
    __slots__ = ("_digests", "required")

    def __init__(self, keys: Iterable[str], *, required: bool) -> None:
        self._digests = tuple(sorted({hashlib.sha256(k.encode()).digest() for k in keys}))
        # Required with no keys at all means every client is refused: fail closed.
        self.required = required

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"VirtualKeys(count={len(self._digests)}, required={self.required})"

    def check(self, headers: Mapping[str, str]) -> bool:
        """``headers``: case-insensitive (``_exchange.Headers``, aiohttp's)."""
        if not self.required:
            return True
        presented = headers.get("Authorization")
        if presented is not None:
            scheme, _, token = presented.partition(" ")
            presented = token.strip() if scheme.lower() == "bearer" else None
        if not presented:
            presented = headers.get("x-api-key")
        if not presented:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for known in self._digests:
            ok |= hmac.compare_digest(digest, known)
        return ok
