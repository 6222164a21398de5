"""``sideproxy serve --workers 2``: two processes share the port (SO_REUSEPORT), both answer,
and SIGTERM stops them all with exit code 0."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp

from sideproxy.fake_provider import FakeProvider
from tests.proxy.conftest import SECRETS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def test_two_workers_share_the_port_and_stop_on_sigterm() -> None:
    port = _free_port()
    async with FakeProvider(SECRETS) as fake:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDE_", "KUBECONFIG"))}
        env.update(
            SIDE_POOL_KEYS=",".join(SECRETS[:2]),
            SIDE_POOL_PROVIDER="custom",
            SIDE_POOL_BASE_URL=fake.base_url,
            SIDE_PROXY_VIRTUAL_KEYS="vk-workers",
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "sideproxy", "serve", "--port", str(port), "--workers", "2",
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/readyz")).status == 200:
                            break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                workers = _children(process.pid)
                assert len(workers) == 2
                # Fresh connections: the kernel spreads them over both listening workers.
                for _ in range(20):
                    async with aiohttp.ClientSession() as one:
                        resp = await one.post(
                            f"http://127.0.0.1:{port}/v1/chat/completions",
                            json={"model": "m", "messages": []},
                            headers={"Authorization": "Bearer vk-workers"},
                        )
                        assert resp.status == 200
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
            assert not any(_alive(pid) for pid in workers)
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
