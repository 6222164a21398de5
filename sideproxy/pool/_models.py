"""Which models a key may serve: exact names and ``*`` globs (``PoolKey.spec.models``).

Only ``*`` is special (any run of characters, ``/`` included); everything else matches itself.
A key is matched against a model once per (pool configuration, model), never per request.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sideproxy.models import MAX_KEY_MODELS as MAX_MODEL_PATTERNS
from sideproxy.models import MODEL_PATTERN

_VALID = re.compile(MODEL_PATTERN)

Matcher = re.Pattern[str] | None  # None: every model


def check_patterns(patterns: Sequence[str]) -> str | None:
    """Why a list of model patterns is invalid, or None when it is fine."""
    if len(patterns) > MAX_MODEL_PATTERNS:
        return f"at most {MAX_MODEL_PATTERNS} entries"
    for pattern in patterns:
        if not _VALID.match(pattern):
            return (
                f"{pattern!r} is not a model name or glob (letters, digits, . _ : / @ + - "
                "and * only, 1 to 256 characters)"
            )
    return None


def compile_patterns(patterns: Sequence[str]) -> Matcher:
    """One regex for all of a key's patterns; None when the key serves every model."""
    if not patterns:
        return None
    parts = (
        "(?:" + ".*".join(re.escape(p) for p in pattern.split("*")) + ")" for pattern in patterns
    )
    return re.compile("|".join(parts))


def serves(matcher: Matcher, model: str | None) -> bool:
    """Does a key with ``matcher`` serve ``model``? A request without a model (None): yes."""
    return matcher is None or model is None or matcher.fullmatch(model) is not None
