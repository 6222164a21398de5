"""``LLMClient``: pooled chat completions in-process, for a backend that wants no proxy.

The seed's client, grown up. Where its keys come from, first match wins:

1. ``GROQ_API_KEY`` — one key, no pooling (the seed's original behaviour);
2. ``SIDE_POOL_KEYS="k1,k2,..."`` — an in-process :class:`~sideproxy.pool.ManagedCreditPool`
   with the proxy's own selection, cool-down and retry rules (``SIDE_POOL_PROVIDER``,
   ``SIDE_POOL_BASE_URL`` as for ``sideproxy serve``);
3. ``SIDE_PROXY_URL`` — a Side Proxy (``http://sideproxy.ns.svc/v1``), with
   ``SIDE_PROXY_VIRTUAL_KEY`` if it asks for one.

    async with LLMClient.from_env() as llm:
        reply = await llm.chat([{"role": "user", "content": "hi"}], model="llama-3.1-8b-instant")
        async for chunk in llm.stream_chat(messages, model=...):
            ...

Errors are :class:`LLMError` with the HTTP status and the provider's message; a key value is
never part of one.

What an answer means is the proxy's own rule (:func:`sideproxy.pool.classify`): a 429 cools
the key for that model only; out of quota (``insufficient_quota``, billing, 402, daily limits)
takes the key out until a token-free probe (``GET /models``, run before the next call once the
back-off has passed) says it is back; a 403 is asked of one other key and, with no other key to
ask, goes to the caller without counting against the key.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import aiohttp

from sideproxy.models import DEFAULT_BASE_URLS, Provider
from sideproxy.pool import (
    Key,
    KeyConfig,
    ManagedCreditPool,
    Outcome,
    PoolPolicy,
    classify,
    retry_delay,
)

Mode = Literal["single", "pool", "proxy"]
_PROBE_TIMEOUT = 10.0  # seconds for one token-free probe (GET /models)


class LLMError(Exception):
    """A chat call that did not succeed. ``status`` is 0 when no HTTP answer came back."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class LLMClient:
    def __init__(
        self,
        *,
        api_key: str | None = None,
        keys: Sequence[str] = (),
        proxy_url: str | None = None,
        virtual_key: str | None = None,
        provider: Provider | str = Provider.GROQ,
        base_url: str | None = None,
        max_attempts: int = 4,
        timeout: float = 120.0,
        policy: PoolPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        provider = Provider(provider)
        self.mode: Mode
        if api_key:
            keys, self.mode = [api_key], "single"
        elif keys:
            self.mode = "pool"
        elif proxy_url:
            self.mode = "proxy"
        else:
            raise ValueError("LLMClient needs GROQ_API_KEY, SIDE_POOL_KEYS or SIDE_PROXY_URL")
        if self.mode == "proxy":
            assert proxy_url is not None
            self._base_url = proxy_url.rstrip("/")
            provider_keys = [virtual_key or "none"]
        else:
            if provider is Provider.CUSTOM and not base_url:
                raise ValueError("a custom provider needs base_url (SIDE_POOL_BASE_URL)")
            self._base_url = (base_url or DEFAULT_BASE_URLS[provider]).rstrip("/")
            provider_keys = [k.strip() for k in keys if k.strip()]
        self._provider = provider.value
        self.pool = ManagedCreditPool(
            [
                KeyConfig(f"key-{i}", self._provider, value)
                for i, value in enumerate(provider_keys, 1)
            ],
            policy,
        )
        self._anthropic = provider is Provider.ANTHROPIC and self.mode != "proxy"
        self._max_attempts = 1 if self.mode == "proxy" else max_attempts
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **kwargs: Any) -> LLMClient:
        env = os.environ if env is None else env
        return cls(
            api_key=env.get("GROQ_API_KEY") or None,
            keys=[k for k in env.get("SIDE_POOL_KEYS", "").split(",") if k.strip()],
            proxy_url=env.get("SIDE_PROXY_URL") or None,
            virtual_key=env.get("SIDE_PROXY_VIRTUAL_KEY") or None,
            provider=env.get("SIDE_POOL_PROVIDER") or Provider.GROQ,
            base_url=env.get("SIDE_POOL_BASE_URL") or None,
            **kwargs,
        )

    async def __aenter__(self) -> LLMClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    # ------------------------------------------------------------------ calls

    async def chat(
        self, messages: Sequence[Mapping[str, Any]], model: str, **params: Any
    ) -> dict[str, Any]:
        """One chat completion (OpenAI response shape), retried over the pool's keys."""
        async with self._attempt(messages, model, params, stream=False) as response:
            result: dict[str, Any] = await response.json(content_type=None)
            return result

    async def stream_chat(
        self, messages: Sequence[Mapping[str, Any]], model: str, **params: Any
    ) -> AsyncIterator[dict[str, Any]]:
        """Streamed chunks (parsed SSE ``data:`` frames). Retried only before the first one."""
        async with self._attempt(messages, model, params, stream=True) as response:
            async for line in response.content:
                text = line.decode().strip()
                if not text.startswith("data:"):
                    continue
                data = text[5:].strip()
                if data == "[DONE]":
                    return
                yield json.loads(data)

    def _attempt(
        self,
        messages: Sequence[Mapping[str, Any]],
        model: str,
        params: dict[str, Any],
        stream: bool,
    ) -> _Attempt:
        body = {"model": model, "messages": list(messages), **params}
        if stream:
            body["stream"] = True
        path = "/messages" if self._anthropic else "/chat/completions"
        if self._anthropic:
            body.setdefault("max_tokens", 1024)
        return _Attempt(self, self._base_url + path, json.dumps(body).encode(), model)

    def _headers(self, key: Key) -> dict[str, str]:
        if self._anthropic:
            return {
                "x-api-key": key.secret,
                "anthropic-version": "2023-06-01",
                "content-type": "application/json",
            }
        return {"authorization": f"Bearer {key.secret}", "content-type": "application/json"}

    async def _probe(self, key: Key) -> None:
        """Ask the provider whether an exhausted or revoked key is back (costs no tokens)."""
        ok = False
        try:
            async with self._http().get(
                self._base_url + "/models",
                headers=self._headers(key),
                timeout=aiohttp.ClientTimeout(total=_PROBE_TIMEOUT),
            ) as response:
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            pass
        self.pool.probe_result(key, ok, self._clock())

    async def _run_probes(self) -> None:
        due = self.pool.probes_due(self._clock())
        if due:
            await asyncio.gather(*(self._probe(key) for key in due))


class _Attempt:
    """Try keys until one answers 2xx; the caller reads that response inside ``async with``."""

    def __init__(self, client: LLMClient, url: str, body: bytes, model: str) -> None:
        self._client = client
        self._url = url
        self._body = body
        self._model = model
        self._key: Key | None = None
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        client, pool, model = self._client, self._client.pool, self._model
        clock = client._clock
        if client.mode != "proxy":
            await client._run_probes()
        tried: set[str] = set()
        last: LLMError | None = None
        held: Key | None = None  # a key that answered 403, until another key has spoken
        for _ in range(client._max_attempts):
            key = pool.acquire(client._provider, clock(), tried, model)
            if key is None:
                break
            tried.add(key.name)
            try:
                response = await client._http().post(
                    self._url, data=self._body, headers=client._headers(key)
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                pool.release(key, _error_outcome(exc), clock())
                last = LLMError(0, f"{key.name}: {type(exc).__name__}")
                continue
            if response.status < 300:
                if held is not None:  # another key served it: the 403 was about that key
                    pool.release(held, Outcome.FORBIDDEN, clock())
                self._key, self._response = key, response
                return response
            payload = await response.read()
            response.release()
            verdict = classify(response.status, response.headers, payload)
            # Providers echo (parts of) a rejected key in their messages; never pass that on.
            message = _message(payload.decode(errors="replace")).replace(
                key.secret, f"<{key.name}>"
            )
            last = LLMError(response.status, message, retry_delay(response.headers, clock()))
            if verdict.held:
                if held is not None:
                    # Two keys refused the same request: the request is at fault, not a key.
                    pool.release(held, Outcome.OK, clock())
                    pool.release(key, Outcome.OK, clock())
                    raise last
                held = key
                continue
            outcome, per_model = verdict.outcome, verdict.per_model
            if client.mode == "proxy" and outcome is Outcome.EXHAUSTED:
                # The proxy owns the pool: its out-of-quota answer is waited out (its
                # Retry-After), never a reason to take the one connection out until a probe.
                outcome, per_model = Outcome.RATE_LIMITED, False
            pool.release(key, outcome, clock(), response.headers, model if per_model else None)
            if not verdict.retry:
                break
        if held is not None:
            # Nobody else could answer (one key, or the rest out): the key learns nothing.
            pool.release(held, Outcome.OK, clock())
        if last is not None:
            raise last
        now = clock()
        recovery = pool.next_recovery(client._provider, now, model)
        wait = None if recovery is None else max(0.0, recovery - now)
        raise LLMError(429, "every key in the pool is cooling down or revoked", wait)

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._key is not None
        assert self._response is not None
        outcome = Outcome.OK
        if isinstance(e, asyncio.CancelledError | GeneratorExit):
            outcome = Outcome.CANCELLED
        elif isinstance(e, aiohttp.ClientError | TimeoutError):
            outcome = _error_outcome(e)
        self._response.release()
        self._client.pool.release(
            self._key, outcome, self._client._clock(), self._response.headers, self._model
        )


def _error_outcome(exc: BaseException) -> Outcome:
    return Outcome.TIMEOUT if isinstance(exc, TimeoutError) else Outcome.CONNECT_ERROR


def _message(text: str) -> str:
    try:
        error = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:200]
    if isinstance(error, dict):
        return str(error.get("message", ""))[:500]
    return str(error)[:500]
