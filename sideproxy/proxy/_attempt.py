"""Stage 3, attempt: one key's turn at a request, and the rules that say what its answer means.

An :class:`Attempt` is made when the pool hands out a key and is released exactly once: by the
stage that learnt the outcome, or, if none did (the client left, a bug raised), by the request's
``finally`` as ``CANCELLED``. ``release`` is idempotent, so "exactly once" does not depend on
every path remembering it.

What an answer means (``judge``)::

    429                        rate-limited: the next key at once (any request: not done)
    401                        the key is bad (revoked): the next key at once
    5xx                        a failure of the key: the next key only if the request is
                               replayable (it may have been acted on)
    403                        judged by the caller: a key-level code revokes; otherwise
                               another key is asked before anyone is blamed
    anything else              OK for the key; the answer goes to the client
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sideproxy.pool import Key, Outcome

__all__ = ["Attempt", "Learn", "judge"]

# (key, outcome, the provider's headers, the metric label, the model it is about or None)
Learn = Callable[[Key, Outcome, Mapping[str, str] | None, str, str | None], None]

_RETRY_OUTCOMES = frozenset({Outcome.RATE_LIMITED, Outcome.SERVER_ERROR})


def judge(status: int, replayable: bool) -> tuple[Outcome, bool]:
    """(what the key learns, whether the next key may be tried) for an HTTP status."""
    # A 403 is judged by the caller (a key-level code, or another key's answer).
    outcome = Outcome.from_status(status) if status != 403 else Outcome.OK
    retry = status == 401 or (outcome in _RETRY_OUTCOMES and (replayable or status == 429))
    return outcome, retry


class Attempt:
    """A key acquired for one request; ``release`` tells the pool what happened, once."""

    __slots__ = ("_learn", "key", "model", "released")

    def __init__(self, key: Key, learn: Learn, model: str | None = None) -> None:
        self.key = key
        self._learn = learn
        self.model = model  # the request's model: what a rate limit is about by default
        self.released = False

    def release(
        self,
        outcome: Outcome,
        label: str,
        headers: Mapping[str, str] | None = None,
        *,
        key_wide: bool = False,
    ) -> None:
        """``key_wide``: the answer is about the whole key (out of quota), not the model."""
        if self.released:
            return
        self.released = True
        self._learn(self.key, outcome, headers, label, None if key_wide else self.model)

    def abandon(self, label: str = "cancelled") -> None:
        """Nothing was learnt (the client left): free the key without judging it."""
        self.release(Outcome.CANCELLED, label)
