"""Which provider a request goes to, and the only way an upstream URL is built.

The routing rule::

    /v1/<rest>               -> the table's default provider:  <base_url>/<rest>
    /<provider>/v1/<rest>    -> that provider, if the pool serves it: <base_url>/<rest>
    /<anything else>/v1/...  -> 404 unknown_provider
    anything else            -> 404 unknown_route

``<base_url>`` is the configured URL *including* its ``/v1`` (``https://api.groq.com/openai/v1``),
so ``/v1/chat/completions`` becomes ``https://api.groq.com/openai/v1/chat/completions``. The query
string passes through unchanged.

The client's path is checked in its raw, still percent-encoded form and rejected with 400 when it
holds anything that could change what the upstream URL points at: ``.`` or ``..`` segments, an
empty segment (``//``), a backslash, a fragment, encoded dots, slashes or backslashes (``%2e``,
``%2f``, ``%5c``, also double-encoded), control characters, spaces, non-ASCII bytes, or a request
target that does not start with ``/`` (absolute-form ``http://host/...``). What remains is appended
verbatim to the base URL, so no request can reach a host, port or path prefix the config does not
name.
"""

from __future__ import annotations

import re

from sideproxy.proxy._errors import BadRequest, NotFound

__all__ = ["parse_path", "parse_target"]

_UNSAFE = re.compile(
    r"""
      [^\x21-\x7e]                     # control characters, space, DEL, non-ASCII
    | %(?:25)?(?:2[eEfF]|5[cC])        # encoded (or double-encoded) dot, slash, backslash
    | %(?:[01][0-9a-fA-F]|7[fF])       # encoded control characters
    | //                               # empty segment
    | [\\\#]                           # backslash, fragment
    | /\.\.?(?:/|$)                    # dot segments
    """,
    re.VERBOSE,
)


# The query passes through verbatim; it only must not smuggle in bytes a request line can't hold.
_UNSAFE_QUERY = re.compile(r"[^\x21-\x7e]|#")


def parse_target(raw: str) -> tuple[str | None, str, str]:
    """Split a raw request target into ``(provider prefix or None, rest after /v1, query)``.

    ``rest`` is ``""`` or starts with ``/``; ``query`` is the raw query string without ``?``.
    Raises :class:`BadRequest` for an unsafe path and :class:`NotFound` for a path outside
    ``[/<provider>]/v1``.
    """
    path, _, query = raw.partition("?")
    return parse_path(path, query)


# Paths that passed, and what they parse to: a fleet sends a handful of paths over and over, and
# the check is a regex over the whole path. Bounded: emptied when full, so a client sending
# endless distinct paths costs a miss each, never memory.
_PASSED: dict[str, tuple[str | None, str]] = {}
_PASSED_MAX = 1024


def parse_path(path: str, query: str) -> tuple[str | None, str, str]:
    """:func:`parse_target` for a target already split at its ``?``."""
    passed = _PASSED.get(path)
    if passed is None:
        passed = _parse(path)
        if len(_PASSED) >= _PASSED_MAX:
            _PASSED.clear()
        _PASSED[path] = passed
    if query and _UNSAFE_QUERY.search(query) is not None:
        raise BadRequest("request query string is not allowed", code="invalid_path")
    return passed[0], passed[1], query


def _parse(path: str) -> tuple[str | None, str]:
    if not path.startswith("/") or _UNSAFE.search(path) is not None:
        raise BadRequest("request path is not allowed", code="invalid_path")
    if path.startswith("/v1/") or path == "/v1":
        return None, path[3:]
    second = path.find("/", 1)
    if second > 0:
        tail = path[second:]
        if tail.startswith("/v1/") or tail == "/v1":
            return path[1:second], tail[3:]
    raise NotFound(
        f"no route for {path[:200]}: use /v1/... or /<provider>/v1/...", code="unknown_route"
    )
