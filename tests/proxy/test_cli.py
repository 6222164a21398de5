"""The ``sideproxy`` command, run as a real subprocess."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import openai
import pytest
import yaml

from sideproxy.cli import build_parser
from sideproxy.fake_provider import FakeProvider
from sideproxy.proxy import HealthPeer
from sideproxy.proxy.kube import KubeSource
from tests.proxy.conftest import SECRETS, VIRTUAL_KEY, Proxy, keys, manifests

ENV_VARS = (
    "SIDE_POOL_KEYS", "SIDE_POOL_PROVIDER", "SIDE_POOL_BASE_URL", "SIDE_POOL_FILE",
    "SIDE_POOL_FILE_POLL_SECONDS", "SIDE_POOL_NAME", "SIDE_POOL_NAMESPACE", "KUBECONFIG",
    "SIDE_PROXY_HOST", "SIDE_PROXY_PORT", "SIDE_PROXY_VIRTUAL_KEYS", "SIDE_PROXY_NO_AUTH",
    "SIDE_PROXY_MAX_BODY_BYTES", "SIDE_PROXY_MAX_HEADER_BYTES", "SIDE_PROXY_BUFFER_BYTES",
    "SIDE_PROXY_SHUTDOWN_TIMEOUT", "SIDE_PROXY_WORKERS", "SIDE_PROXY_UPSTREAM_CONNECTIONS",
    "SIDE_PROXY_LOG_FORMAT", "SIDE_PROXY_LOG_LEVEL", "SIDE_PROXY_ACCESS_LOG",
)  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDE_", "KUBECONFIG"))}
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sideproxy", *args],
        capture_output=True,
        text=True,
        env=_env(**env),
        timeout=60,
        check=False,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_help_lists_every_env_var_and_no_secret() -> None:
    result = _run("serve", "--help", SIDE_POOL_KEYS=SECRETS[0], SIDE_PROXY_VIRTUAL_KEYS=VIRTUAL_KEY)
    assert result.returncode == 0
    for name in ENV_VARS:
        assert name in result.stdout, name
    assert SECRETS[0] not in result.stdout
    assert VIRTUAL_KEY not in result.stdout
    # Every serve option names its environment variable.
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    for action in serve._actions:
        if action.option_strings and action.dest != "help":
            assert "(env " in (action.help or ""), action.option_strings


def test_serve_refuses_0_0_0_0_without_virtual_keys() -> None:
    result = _run("serve", "--host", "0.0.0.0", SIDE_POOL_KEYS="sk-a")
    assert result.returncode == 2
    assert "--no-auth" in result.stderr
    assert "SIDE_PROXY_VIRTUAL_KEYS" in result.stderr
    result = _run("serve", SIDE_POOL_KEYS="sk-a", SIDE_PROXY_HOST="::")
    assert result.returncode == 2


def test_serve_without_keys_or_with_a_bad_file_exits_2(tmp_path: Path) -> None:
    result = _run("serve")
    assert result.returncode == 2
    assert "SIDE_POOL_KEYS" in result.stderr
    bad = tmp_path / "pool.yaml"
    bad.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret"}))
    result = _run("serve", "--file", str(bad))
    assert result.returncode == 2
    assert "metadata.name" in result.stderr
    result = _run("serve", "--file", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr
    result = _run("serve", "--file", str(bad), SIDE_POOL_KEYS="sk-a")
    assert result.returncode == 2
    assert "choose one" in result.stderr


def test_the_kube_source_shares_health_and_drops_reports_before_it_runs() -> None:
    source = KubeSource("pool", "ns", None)
    assert isinstance(source, HealthPeer)
    source.report([])  # no API client yet: dropped, not an error


async def test_serve_end_to_end_with_graceful_shutdown(fake: FakeProvider, tmp_path: Path) -> None:
    port = _free_port()
    pool_file = tmp_path / "pool.yaml"
    pool_file.write_text(
        yaml.safe_dump_all(
            manifests({"custom": fake.base_url}, keys(2), virtual_keys=[VIRTUAL_KEY])
        )
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sideproxy", "serve", "--port", str(port), "--log-format", "json",
        "--host", "0.0.0.0",  # allowed: the pool file turns client auth on
        env=_env(SIDE_POOL_FILE=str(pool_file), SIDE_PROXY_SHUTDOWN_TIMEOUT="10"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    if (await http.get(url + "/readyz")).status == 200:
                        break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("proxy never became ready")
            async with openai.AsyncOpenAI(
                base_url=url + "/v1", api_key=VIRTUAL_KEY, max_retries=0
            ) as client:
                reply = await client.chat.completions.create(model="m", messages=[])
                assert reply.choices[0].message.content
                fake.configure(stream_chunks=6, stream_interval=0.15)
                stream = await client.chat.completions.create(model="m", messages=[], stream=True)
                chunks = [await stream.__anext__()]
                process.send_signal(signal.SIGTERM)  # mid-stream
                chunks += [chunk async for chunk in stream]
            assert len(chunks) == 7  # six content chunks and the finish chunk: nothing lost
            assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    _, stderr = await process.communicate()
    logs = stderr.decode()
    assert '"logger": "sideproxy.access"' in logs
    for secret in (*SECRETS, VIRTUAL_KEY):
        assert secret not in logs


def test_demo_runs_and_exits_0() -> None:
    result = _run("demo", "--seconds", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no errors" in result.stdout
    assert "sk-demo" not in result.stdout + result.stderr


async def test_diag_subcommand(proxy: Proxy) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sideproxy", "diag", proxy.url, "-n", "20", "-c", "5",
        env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    report = stdout.decode()
    assert "20 requests" in report
    assert "p99" in report
    assert "key-1" in report


async def test_diag_exits_non_zero_on_failures(fake: FakeProvider, proxy: Proxy) -> None:
    for secret in SECRETS:
        fake.revoke(secret)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sideproxy", "diag", proxy.url + "/v1", "-n", "3",
        env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    assert "401" in stdout.decode()
