"""Stage 3, attempt: one key's turn at a request, released exactly once.

An :class:`Attempt` is made when the pool hands out a key and is released exactly once: by the
stage that learnt the outcome, or, if none did (the client left, a bug raised), by the request's
``finally`` as ``CANCELLED``. ``release`` is idempotent, so "exactly once" does not depend on
every path remembering it.

What an answer means is the pool's ``classify`` (one policy for the proxy and LLMClient); the
caller adds its own rule: after a 5xx, a timeout or a broken body only a replayable request
goes to the next key (``_route``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from sideproxy.pool import Key, Outcome

__all__ = ["Attempt", "Learn"]

# (key, outcome, the provider's headers, the metric label, the model it is about or None)
Learn = Callable[[Key, Outcome, Mapping[str, str] | None, str, str | None], None]


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
