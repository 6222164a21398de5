"""Real processes for the end-to-end tests (and ``bench/cluster_propagation.py``).

Every process runs in its own session with its output in a file; ``stop()`` sends SIGTERM, then
SIGKILL. Clients talk to 127.0.0.1 only, through no proxy, without retries: a failed request is
recorded as failed, never hidden.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CHAT = json.dumps(
    {"model": "fake-model", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
).encode()


def environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's) without cluster hints, loopback never proxied."""
    env = {k: v for k, v in (base or os.environ).items() if not k.startswith("KUBERNETES_")}
    no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost"]))
    env.update({"NO_PROXY": no_proxy, "no_proxy": no_proxy, "PYTHONUNBUFFERED": "1"})
    return env


class Proc:
    """One child process, its output in ``log``."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> Proc:
        assert self.proc is None or self.proc.poll() is not None, f"{self.name} is running"
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts}: {' '.join(self.argv)}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(f"{self.name} exited {code}:\n{self.text()[-4000:]}")

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(10)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def http_json(
    port: int, method: str, path: str, body: Any = None, timeout: float = 5.0
) -> tuple[int, Any]:
    """One request to 127.0.0.1:``port``; (status, parsed JSON body or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, payload, headers)
        response = conn.getresponse()
        data = response.read()
        try:
            parsed = json.loads(data) if data else None
        except ValueError:
            parsed = None
        return response.status, parsed
    finally:
        conn.close()


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until truthy (returned); OSError counts as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- fake provider


class FakeProviderProc(Proc):
    """``python -m sideproxy.fake_provider`` on a free port, accepting any key."""

    def __init__(self, port: int, log: Path, env: Mapping[str, str] | None = None) -> None:
        argv = [sys.executable, "-m", "sideproxy.fake_provider", "--port", str(port)]
        super().__init__("fake provider", argv, environment(env), log)
        self.port = port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 20.0) -> None:
        def up() -> bool:
            self.check_alive()
            return http_json(self.port, "GET", "/_fake/stats")[0] == 200

        wait_until(up, timeout, "the fake provider")

    def configure(self, **body: Any) -> None:
        status, answer = http_json(self.port, "POST", "/_fake/config", body)
        assert status == 200, answer

    def stats(self) -> Counter[str]:
        """Requests per key fingerprint."""
        return Counter(http_json(self.port, "GET", "/_fake/stats")[1] or {})

    def statuses(self) -> dict[str, Counter[int]]:
        """Answers per key fingerprint, by status code."""
        raw = http_json(self.port, "GET", "/_fake/stats/status")[1] or {}
        return {fp: Counter({int(k): v for k, v in c.items()}) for fp, c in raw.items()}


# --------------------------------------------------------------------------- proxies


class ProxyProc(Proc):
    """``python -m sideproxy serve --pool ...`` in cluster mode on a free port."""

    def __init__(
        self,
        name: str,
        port: int,
        *,
        pool: str,
        namespace: str,
        kubeconfig: Path,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        argv = [
            sys.executable, "-m", "sideproxy", "serve",
            "--pool", pool, "--namespace", namespace, "--kubeconfig", str(kubeconfig),
            "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--no-auth",
        ]  # fmt: skip
        extra = {"POD_NAME": name, "SIDE_PROXY_SHUTDOWN_TIMEOUT": "2"}
        super().__init__(name, argv, {**environment(env), **extra}, log)
        self.port = port

    def readyz(self) -> int:
        try:
            return http_json(self.port, "GET", "/readyz", timeout=2)[0]
        except OSError:
            return 0

    def status(self) -> dict[str, Any]:
        code, body = http_json(self.port, "GET", "/sideproxy/status", timeout=3)
        assert code == 200, (code, body)
        return dict(body)

    def key(self, name: str) -> dict[str, Any]:
        for key in self.status()["keys"]:
            if key["name"] == name:
                return dict(key)
        return {}

    def wait_ready(self, timeout: float = 30.0) -> None:
        def ready() -> bool:
            self.check_alive()
            return self.readyz() == 200

        wait_until(ready, timeout, f"{self.name} /readyz")

    def wait_for(self, check: Callable[[ProxyProc], Any], timeout: float, what: str) -> Any:
        """Poll ``check(self)`` until truthy; its value."""
        return wait_until(lambda: check(self), timeout, f"{self.name}: {what}")

    def wait_listening(self, timeout: float = 30.0) -> None:
        def listening() -> bool:
            self.check_alive()
            return self.readyz() != 0

        wait_until(listening, timeout, f"{self.name} listening")


@dataclass
class Outcome:
    sent: float
    status: int  # HTTP status, or 0 for a transport error
    served_by: str  # x-fake-key (the fingerprint that answered), "" if none
    error: str = ""


def chat(conn: http.client.HTTPConnection, path: str = "/v1/chat/completions") -> Outcome:
    sent = time.time()
    try:
        conn.request("POST", path, CHAT, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return Outcome(sent, response.status, response.getheader("x-fake-key") or "")
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        return Outcome(sent, 0, "", f"{type(exc).__name__}: {exc}")


def burst(port: int, n: int, concurrency: int = 4, timeout: float = 30.0) -> list[Outcome]:
    """``n`` chat completions through 127.0.0.1:``port`` from ``concurrency`` connections."""
    shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]

    def worker(count: int) -> list[Outcome]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        try:
            return [chat(conn) for _ in range(count)]
        finally:
            conn.close()

    with ThreadPoolExecutor(concurrency) as pool:
        return [o for part in pool.map(worker, shares) for o in part]


@dataclass
class Traffic:
    """Steady background traffic through some proxies until :meth:`stop`; every outcome kept."""

    ports: Sequence[int]
    per_proxy: int = 2
    pause: float = 0.02
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self, port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            while not self._stop.is_set():
                outcome = chat(conn)
                with self._lock:
                    self.outcomes.append(outcome)
                if outcome.status == 0:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                self._stop.wait(self.pause)
        finally:
            conn.close()

    def start(self) -> Traffic:
        for port in self.ports:
            for _ in range(self.per_proxy):
                thread = threading.Thread(target=self._run, args=(port,), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(35)
        return self.outcomes

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def __enter__(self) -> Traffic:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()


def failures(outcomes: Sequence[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o.status != 200]


@contextlib.contextmanager
def stopped_on_exit(procs: list[Proc]) -> Iterator[list[Proc]]:
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            try:
                proc.stop()
            finally:
                proc.kill()
