"""What the provider receives: the key's credentials, never the client's, nor its org choice."""

import aiohttp

from sideproxy.fake_provider import FakeProvider
from tests.proxy.conftest import Proxy

BODY = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


async def test_client_credentials_and_billing_scope_stay_behind(
    proxy: Proxy, fake: FakeProvider, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Authorization": "Bearer client-virtual-key",
        "api-key": "client-azure-style-key",
        "OpenAI-Organization": "org-someone-else",
        "OpenAI-Project": "proj-someone-else",
        "X-Request-Id": "trace-123",
    }
    async with http.post(f"{proxy.base_url}/chat/completions", json=BODY, headers=headers) as r:
        assert r.status == 200
    _, _, arrived = fake.recent[-1]
    names = {name.lower(): value for name, value in arrived}
    assert "openai-organization" not in names
    assert "openai-project" not in names
    assert "api-key" not in names
    assert names["authorization"] != "Bearer client-virtual-key"
    assert names["x-request-id"] == "trace-123"  # everything else passes through
