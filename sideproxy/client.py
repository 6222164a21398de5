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
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal

import aiohttp

from sideproxy.models import DEFAULT_BASE_URLS, Provider
from sideproxy.pool import Key, KeyConfig, ManagedCreditPool, Outcome, PoolPolicy

Mode = Literal["single", "pool", "proxy"]
_RETRYABLE = frozenset(
    {Outcome.RATE_LIMITED, Outcome.SERVER_ERROR, Outcome.UNAUTHORIZED, Outcome.FORBIDDEN}
)


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
        return _Attempt(self, self._base_url + path, json.dumps(body).encode())

    def _headers(self, key: Key) -> dict[str, str]:
        if self._anthropic:
            return {
                "x-api-key": key.secret,
                "anthropic-version": "2023-06-01",
                "content-type": "application/json",
            }
        return {"authorization": f"Bearer {key.secret}", "content-type": "application/json"}


class _Attempt:
    """Try keys until one answers 2xx; the caller reads that response inside ``async with``."""

    def __init__(self, client: LLMClient, url: str, body: bytes) -> None:
        self._client = client
        self._url = url
        self._body = body
        self._key: Key | None = None
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        client, pool = self._client, self._client.pool
        tried: set[str] = set()
        last: LLMError | None = None
        forbidden: Key | None = None  # the key that answered 403, until another key has spoken
        for _ in range(client._max_attempts):
            now = time.time()
            key = pool.acquire(client._provider, now, exclude=tried)
            if key is None:
                break
            tried.add(key.name)
            try:
                response = await client._http().post(
                    self._url, data=self._body, headers=client._headers(key)
                )
            except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                pool.release(key, _error_outcome(exc), time.time())
                last = LLMError(0, f"{key.name}: {type(exc).__name__}")
                continue
            outcome = Outcome.from_status(response.status)
            if response.status == 403:
                outcome = Outcome.FORBIDDEN
            if response.status < 300:
                if forbidden is not None:  # another key served it: the 403 was that key's
                    pool.release(forbidden, Outcome.FORBIDDEN, time.time())
                self._key, self._response = key, response
                return response
            text = await response.text()
            response.release()
            # Providers echo (parts of) a rejected key in their messages; never pass that on.
            message = _message(text).replace(key.secret, f"<{key.name}>")
            last = LLMError(response.status, message, _retry_after(response.headers))
            if outcome is Outcome.FORBIDDEN:
                # Usually about the request (model, region), not the key: never revoke on it.
                # Ask one other key; a second 403 is the answer and teaches neither key anything.
                if forbidden is not None:
                    pool.release(forbidden, Outcome.OK, time.time())
                    pool.release(key, Outcome.OK, time.time())
                    raise last
                forbidden = key
                continue
            pool.release(key, outcome, time.time(), response.headers)
            if outcome not in _RETRYABLE:
                if forbidden is not None:
                    pool.release(forbidden, Outcome.FORBIDDEN, time.time())
                raise last
        if forbidden is not None:
            pool.release(forbidden, Outcome.FORBIDDEN, time.time())
        if last is not None:
            raise last
        recovery = pool.next_recovery(client._provider, time.time())
        wait = None if recovery is None else max(0.0, recovery - time.time())
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
        self._client.pool.release(self._key, outcome, time.time(), self._response.headers)


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


def _retry_after(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("retry-after")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None
