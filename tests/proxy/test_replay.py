"""Only requests that change nothing at the provider are sent again after an ambiguous failure.

A 5xx, a timeout or a reset may come after the provider acted on the request. Sending a chat
completion again only costs tokens; sending a batch or file upload again creates a second one.
"""

import aiohttp
import pytest

from sideproxy.fake_provider import FakeProvider
from sideproxy.models import fingerprint
from tests.proxy.conftest import SECRETS, Proxy

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
BATCH = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}


@pytest.mark.parametrize("fault", [500, 502, 503, 504])
async def test_a_batch_is_never_sent_twice(
    proxy: Proxy, fake: FakeProvider, http: aiohttp.ClientSession, fault: int
) -> None:
    for secret in SECRETS[:3]:
        fake.add_faults(secret, fault)
    async with http.post(f"{proxy.base_url}/batches", json=BATCH) as response:
        # The one provider answer, passed through: not a retry's, not the proxy's own.
        assert response.status == fault
        body = await response.json(content_type=None)
        assert body["error"]["message"] == f"fake fault: status {fault}"
    assert sum(fake.stats().values()) == 1


async def test_a_batch_moves_on_when_the_provider_cannot_have_acted(
    proxy: Proxy, fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    fake.add_faults(SECRETS[0], {"action": "status", "status": 429, "retry_after": 30})
    async with http.post(f"{proxy.base_url}/batches", json=BATCH) as response:
        assert response.status == 404  # the fake has no batches API: the second key's answer
    assert fake.status_counts()[fingerprint(SECRETS[1])] == {404: 1}
    assert sum(fake.stats().values()) == 2  # the 429 said "not done": the next key was asked


async def test_a_chat_completion_is_retried_on_the_next_key(
    proxy: Proxy, fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    fake.add_faults(SECRETS[0], 500)
    fake.add_faults(SECRETS[1], 500)
    fake.add_faults(SECRETS[2], 500)
    async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT) as response:
        assert response.status == 500
    assert sum(fake.stats().values()) == 3
    async with http.post(f"{proxy.base_url}/chat/completions", json=CHAT) as response:
        assert response.status == 200
