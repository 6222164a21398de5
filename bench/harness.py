"""Side Proxy vs nginx vs LiteLLM, side by side in one run (issue 7). Called by ``bench/run``.

    taskset -c 1 .venv/bin/python bench/harness.py --out DIR [--quick] [--only 1,2,3,4,5,6]

Core 0 runs the proxy under test and nothing else; core 1 runs wrk, the Python load client, the
upstreams and this harness. CPU per request is the proxy's own process tree's utime+stime delta
(/proc/<pid>/stat) over the measured run, divided by the successful requests of that run.

Every process started here gets its own session and its process group is written to
``$BENCH_PIDFILE`` (bench/run kills them on exit too); every loop is bounded in count and time;
only 127.0.0.1 is ever a target.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = ROOT / ".venv" / "bin" / "python"
CACHE = Path(os.environ.get("BENCH_CACHE", Path.home() / ".cache" / "sideproxy-bench"))
LITELLM = CACHE / "litellm-venv" / "bin" / "litellm"
CLK_TCK = os.sysconf("SC_CLK_TCK")
KEYS = ["k1", "k2", "k3", "k4"]
VK = "bench-vk"
LITELLM_VK = "sk-bench-vk"  # LiteLLM wants its master key to start with sk-
PATH = "/v1/chat/completions"
BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello."}],"max_tokens":16}'
)

PORT_CANNED, PORT_PY, PORT_SLOW = 19101, 19102, 19103
PORTS = {
    "sideproxy": 19201,
    "nginx": 19202,
    "litellm": 19203,
    "bare": 19204,
    "raw": 19205,
    "transport": 19206,
    "sideproxy-w1": 19207,
    "sideproxy-w2": 19208,
}
RAW_LIBS = CACHE / "raw-libs"  # httptools, for the raw-protocol prototype only

COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,'
    '"model":"bench-model","choices":[{"index":0,"message":{"role":"assistant",'
    '"content":"Hello from the bench upstream."},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":9,"completion_tokens":7,"total_tokens":16}}'
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.pidfile = os.environ.get("BENCH_PIDFILE")

    def start(
        self, name: str, cmd: list[str], *, cpu: int | str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        logf = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.Popen(
            ["taskset", "-c", str(cpu), *cmd],
            stdout=logf,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=True,
            cwd=self.workdir,
        )
        logf.close()
        self.running[name] = proc
        if self.pidfile:
            with open(self.pidfile, "a") as f:
                f.write(f"{proc.pid}\n")
        return proc

    def stop(self, name: str) -> None:
        proc = self.running.pop(name, None)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        # Whatever the group left behind (workers of a master that died first).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name)

    def tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2 :].split()


def tree_cpu_seconds(root: int) -> float:
    """utime+stime of ``root`` and all its descendants, in seconds."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None:
            continue
        stats[int(entry)] = fields
        children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        f = stats.get(pid)
        if f:
            total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15)
        todo.extend(children.get(pid, []))
    return total / CLK_TCK


def tree_rss_bytes(root: int) -> int:
    """Resident memory of ``root`` and all its descendants (VmRSS), in bytes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    total, todo, seen = 0, [root], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        todo.extend(children.get(pid, []))
    return total


def hold(url: str, token: str, connections: int, streams: bool) -> subprocess.Popen[str]:
    """Start ``loadclient.py hold``; returns once it printed READY (or exited)."""
    cmd = ["taskset", "-c", "1", str(PY), str(BENCH / "loadclient.py"), "hold", url, token,
           "--connections", str(connections), "--seconds", "120",
           *(["--streams"] if streams else [])]  # fmt: skip
    return subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def core_times() -> dict[str, tuple[int, int]]:
    """(busy, total) jiffies for cpu0 and cpu1."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            idle = v[3] + v[4]
            out[name] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def core_busy(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict:
    res = {}
    for name in sorted(after):
        if name in before:
            busy = after[name][0] - before[name][0]
            total = after[name][1] - before[name][1]
            res[name] = round(busy / total, 3) if total else None
    return res


def foreign(r: dict[str, Any]) -> float:
    """Load on core 0 that was not the target (direct has no target: all of core 0)."""
    return r.get("foreign_cpu0", r["core_busy"].get("cpu0") or 0.0)


def http(url: str, data: bytes | None = None, token: str | None = None, timeout: float = 5.0):
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # only 127.0.0.1 URLs
        return resp.status, resp.read()


def export_ref(ref: str, dest: Path) -> Path:
    """``git archive REF sideproxy`` into ``dest``; returns ``dest`` (for PYTHONPATH)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "sideproxy"],
        capture_output=True,
        timeout=60,
        check=True,
    )
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def wait_ready(url: str, token: str, timeout: float, alive: Callable[[], bool]) -> float:
    """POST a completion until one succeeds; returns seconds waited."""
    start = time.monotonic()
    last = ""
    while time.monotonic() - start < timeout:
        if not alive():
            raise RuntimeError(f"process exited while starting ({last})")
        try:
            status, _ = http(url, BODY, token, timeout=5.0)
            if status == 200:
                return time.monotonic() - start
            last = f"HTTP {status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise RuntimeError(f"not ready after {timeout:.0f}s ({last})")


# --------------------------------------------------------------------------- load


def wrk(url: str, token: str, conns: int, seconds: float) -> dict[str, Any]:
    cmd = [
        "taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--timeout", "10s",
        "-s", str(BENCH / "wrk.lua"), url, "--", token,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("WRKJSON "):
            r = json.loads(line[8:])
            r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
            r["ok"] = r["requests"] - r["errors"]["status"]
            r["ok_rps"] = r["ok"] / (r["duration_us"] / 1e6)
            return r
    raise RuntimeError(f"wrk printed no result: {out.stdout[-500:]} {out.stderr[-500:]}")


def loadclient(mode: str, url: str, token: str, *extra: str, timeout: float = 300) -> dict:
    cmd = ["taskset", "-c", "1", str(PY), str(BENCH / "loadclient.py"), mode, url, token, *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"loadclient {mode} failed: {out.stderr[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- targets


@dataclass
class Target:
    name: str
    label: str
    token: str
    url: str = ""
    pid: int | None = None
    version: str = ""
    notes: list[str] = field(default_factory=list)

    def cpu(self) -> float | None:
        return None if self.pid is None else tree_cpu_seconds(self.pid)


NGINX_CANNED = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location = /v1/chat/completions {{
      default_type application/json;
      return 200 '{body}';
    }}
  }}
}}
"""

NGINX_PROXY = """
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  keepalive_requests 1000000;
  upstream llm {{ server 127.0.0.1:{upstream_port}; keepalive 128; keepalive_requests 1000000; }}
  # One of 4 pool keys per request (random over $request_id: nginx has no round-robin map).
  split_clients "${{request_id}}" $pool_key {{
    25% "Bearer k1"; 25% "Bearer k2"; 25% "Bearer k3"; * "Bearer k4";
  }}
  # The client's virtual key: one string compare.
  map $http_authorization $vk_ok {{ "Bearer {vk}" 1; default 0; }}
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location /v1/ {{
      if ($vk_ok = 0) {{ return 401; }}
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization $pool_key;
      proxy_buffering off;
    }}
  }}
}}
"""

LITELLM_CONFIG = """
model_list:
{deployments}
litellm_settings:
  telemetry: false
  drop_params: true
general_settings:
  master_key: {vk}
"""


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.quick = args.quick
        self.workdir = workdir
        self.procs = Procs(workdir)
        # Which sideproxy/ to run: the working tree, or a committed ref exported read-only
        # (``git archive``), so a colleague's half-saved edit cannot break a run.
        self.ref = getattr(args, "sideproxy_ref", None)
        self.sideproxy_src = ROOT
        if self.ref:
            self.sideproxy_src = export_ref(self.ref, workdir / "snapshot")
        self.results: dict[str, Any] = {"meta": self.meta(), "scenarios": {}, "targets": {}}
        self.quiet_spent = 0.0

    # ---- environment

    def meta(self) -> dict[str, Any]:
        def cmd(*c: str) -> str:
            try:
                out = subprocess.run(c, capture_output=True, text=True, timeout=20, check=False)
                return (out.stdout + out.stderr).strip()
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"unavailable: {exc}"

        cpu = ""
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        pkgs = cmd(str(PY), "-c", "import aiohttp,uvloop,prometheus_client as p;"
                   "print(aiohttp.__version__, uvloop.__version__, p.__version__ "
                   "if hasattr(p,'__version__') else '')")  # fmt: skip
        return {
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "mode": "quick" if self.quick else "full",
            "cpu": cpu,
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "python": cmd(str(PY), "-V"),
            "aiohttp_uvloop": pkgs,
            "nginx": cmd("nginx", "-v"),
            "wrk": cmd("wrk", "-v").splitlines()[0] if shutil.which("wrk") else "missing",
            "litellm": self.litellm_version(),
            "sideproxy_commit": cmd(
                "git", "-C", str(ROOT), "rev-parse", "--short", self.ref or "HEAD"
            ),
            "sideproxy_ref": self.ref or "working tree",
            "sideproxy_dirty": not self.ref
            and bool(cmd("git", "-C", str(ROOT), "status", "--porcelain", "--", "sideproxy")),
        }

    def litellm_version(self) -> str:
        if not LITELLM.exists():
            reason = CACHE / "litellm-install.status"
            return "not installed" + (f": {reason.read_text().strip()}" if reason.exists() else "")
        pip = LITELLM.parent / "pip"
        out = subprocess.run(
            [str(pip), "show", "litellm"], capture_output=True, text=True, timeout=60, check=False
        )
        for line in out.stdout.splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
        return "unknown"

    # ---- upstreams

    def start_canned(self) -> str:
        d = self.workdir / "nginx-canned"
        d.mkdir(exist_ok=True)
        (d / "nginx.conf").write_text(
            NGINX_CANNED.format(dir=d, port=PORT_CANNED, body=COMPLETION.replace("'", "\\'"))
        )
        cmd = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(d / "nginx.conf"),
               "-g", "daemon off;"]  # fmt: skip
        p = self.procs.start("upstream-canned", cmd, cpu=1)
        url = f"http://127.0.0.1:{PORT_CANNED}{PATH}"
        wait_ready(url, "k1", 15, lambda: p.poll() is None)
        return f"http://127.0.0.1:{PORT_CANNED}"

    def start_py(self) -> str:
        cmd = [str(PY), str(BENCH / "upstream.py"), "--port", str(PORT_PY),
               "--workers", str(self.args.upstream_workers), "--delay", "0.02",
               "--chunks", "20", "--chunk-interval", "0.005", "--keys", ",".join(KEYS),
               "--retry-after", str(self.args.retry_after)]  # fmt: skip
        p = self.procs.start("upstream-py", cmd, cpu=1)
        wait_ready(f"http://127.0.0.1:{PORT_PY}{PATH}", "k1", 15, lambda: p.poll() is None)
        return f"http://127.0.0.1:{PORT_PY}"

    # ---- targets

    def start_target(self, name: str, upstream: str, cpu: int | str = 0) -> Target:
        """Start ``name`` in front of ``upstream`` (http://127.0.0.1:port); wait until it serves.
        ``cpu``: the cores it may use (``taskset -c``), core 0 alone by default."""
        up_port = upstream.rsplit(":", 1)[1]
        if name == "direct":
            return Target("direct", "direct (no proxy)", "k1", url=upstream + PATH)
        port = PORTS[name]
        url = f"http://127.0.0.1:{port}{PATH}"
        if name == "sideproxy":
            t = Target(name, "Side Proxy", VK, url=url)
            env = {
                "SIDE_POOL_KEYS": ",".join(KEYS),
                "SIDE_POOL_PROVIDER": "custom",
                "SIDE_POOL_BASE_URL": f"{upstream}/v1",
                "SIDE_PROXY_VIRTUAL_KEYS": VK,
                **({"PYTHONPATH": str(self.sideproxy_src)} if self.ref else {}),
                **self.args.sideproxy_env,
            }
            cmd = [str(ROOT / ".venv" / "bin" / "sideproxy"), "serve", "--port", str(port),
                   "--host", "127.0.0.1", *self.args.sideproxy_args]  # fmt: skip
            t.version = self.results["meta"]["sideproxy_commit"]
            timeout = 30.0
        elif name == "bare":
            t = Target(name, "bare aiohttp (floor)", VK, url=url)
            cmd = [str(PY), str(BENCH / "bare_proxy.py"), "--port", str(port), "--upstream",
                   f"{upstream}/v1", "--keys", ",".join(KEYS), "--vk", VK]  # fmt: skip
            env, timeout = {}, 20.0
        elif name == "transport":
            t = Target(name, "Side Proxy transport (floor)", VK, url=url)
            cmd = [str(PY), str(BENCH / "transport_proxy.py"), "--port", str(port), "--upstream",
                   f"{upstream}/v1", "--keys", ",".join(KEYS), "--vk", VK]  # fmt: skip
            env = {"PYTHONPATH": str(self.sideproxy_src)}
            timeout = 20.0
        elif name.startswith("sideproxy-w"):
            workers = name.removeprefix("sideproxy-w")
            t = Target(name, f"Side Proxy, {workers} worker(s)", VK, url=url)
            env = {
                "SIDE_POOL_KEYS": ",".join(KEYS),
                "SIDE_POOL_PROVIDER": "custom",
                "SIDE_POOL_BASE_URL": f"{upstream}/v1",
                "SIDE_PROXY_VIRTUAL_KEYS": VK,
                **({"PYTHONPATH": str(self.sideproxy_src)} if self.ref else {}),
                **self.args.sideproxy_env,
            }
            cmd = [str(ROOT / ".venv" / "bin" / "sideproxy"), "serve", "--port", str(port),
                   "--host", "127.0.0.1", "--workers", workers,
                   *self.args.sideproxy_args]  # fmt: skip
            timeout = 30.0
        elif name == "raw":
            t = Target(name, "raw-protocol prototype", VK, url=url)
            if not (RAW_LIBS / "httptools").exists():
                raise RuntimeError(f"httptools is not installed in {RAW_LIBS}")
            cmd = [str(PY), str(BENCH / "raw_proxy.py"), "--port", str(port), "--upstream",
                   f"127.0.0.1:{up_port}", "--keys", ",".join(KEYS), "--vk", VK]  # fmt: skip
            env, timeout = {"PYTHONPATH": str(RAW_LIBS)}, 20.0
        elif name == "nginx":
            t = Target(name, "nginx key-injector", VK, url=url)
            t.version = self.results["meta"]["nginx"].split("/")[-1]
            d = self.workdir / f"nginx-proxy-{up_port}"
            d.mkdir(exist_ok=True)
            (d / "nginx.conf").write_text(
                NGINX_PROXY.format(dir=d, port=port, upstream_port=up_port, vk=VK)
            )
            cmd = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c",
                   str(d / "nginx.conf"), "-g", "daemon off;"]  # fmt: skip
            env, timeout = {}, 15.0
        elif name == "litellm":
            t = Target(name, "LiteLLM proxy", LITELLM_VK, url=url)
            t.version = self.results["meta"]["litellm"]
            if not LITELLM.exists():
                raise RuntimeError(f"LiteLLM {t.version}")
            deployments = "".join(
                f"  - model_name: bench-model\n"
                f"    litellm_params:\n"
                f"      model: openai/bench-model\n"
                f"      api_base: {upstream}/v1\n"
                f"      api_key: {k}\n"
                for k in KEYS
            )
            cfg = self.workdir / f"litellm-{up_port}.yaml"
            cfg.write_text(LITELLM_CONFIG.format(deployments=deployments, vk=LITELLM_VK))
            cmd = [str(LITELLM), "--config", str(cfg), "--host", "127.0.0.1", "--port",
                   str(port), "--num_workers", "1"]  # fmt: skip
            env = {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_TELEMETRY": "False",
                "DISABLE_ADMIN_UI": "True",
                "NO_DOCS": "True",
                "NO_PROXY": "*",
                "HOME": str(self.workdir),
            }
            timeout = 180.0
        else:
            raise ValueError(name)
        proc = self.procs.start(name, cmd, cpu=cpu, env=env)
        t.pid = proc.pid
        try:
            waited = wait_ready(url, t.token, timeout, lambda: proc.poll() is None)
        except RuntimeError as exc:
            tail = self.procs.tail(name)
            self.procs.stop(name)
            raise RuntimeError(f"{exc}; log tail:\n{tail}") from None
        log(f"{t.label} ready in {waited:.1f}s (pid {t.pid})")
        return t

    def stop_target(self, t: Target) -> None:
        if t.name != "direct":
            self.procs.stop(t.name)

    def start_all(self, names: list[str], upstream: str) -> dict[str, Target]:
        """Start every target in front of ``upstream``; one that fails is recorded and skipped."""
        started: dict[str, Target] = {}
        for name in names:
            try:
                t = self.start_target(name, upstream)
            except RuntimeError as exc:
                log(f"{name}: could not start: {exc}")
                self.results["targets"].setdefault(name, {})["error"] = str(exc)[:2000]
                continue
            self.results["targets"].setdefault(name, {}).update(
                {"label": t.label, "version": t.version}
            )
            started[name] = t
        # What each target burns while idle (it shares core 0 with the one being measured).
        c0 = {n: t.cpu() for n, t in started.items()}
        time.sleep(2.0)
        for n, t in started.items():
            c1 = t.cpu()
            if c0[n] is not None and c1 is not None:
                idle = (c1 - c0[n]) / 2.0
                self.results["targets"][n].setdefault("idle_cpu_fraction", {})[upstream] = round(
                    idle, 4
                )
        return started

    @contextlib.contextmanager
    def target(self, name: str, upstream: str, cpu: int | str = 0) -> Iterator[Target | None]:
        """One target for the length of a ``with`` block (None when it would not start)."""
        try:
            t = self.start_target(name, upstream, cpu)
        except RuntimeError as exc:
            log(f"{name}: could not start: {exc}")
            yield None
            return
        try:
            yield t
        finally:
            self.stop_target(t)

    def stop_all_targets(self, started: dict[str, Target]) -> None:
        for t in started.values():
            self.stop_target(t)

    # ---- measurements

    def wait_quiet(self) -> float:
        """Wait (bounded) until core 0 is nearly idle: the machine may be shared.

        Samples core 0 for 0.5 s at a time while no load runs; gives up after ``--quiet-wait``
        seconds per measurement and ``--quiet-budget`` seconds per run. Returns seconds waited.
        """
        waited = 0.0
        while waited < self.args.quiet_wait and self.quiet_spent < self.args.quiet_budget:
            k0 = core_times()
            time.sleep(0.5)
            busy = core_busy(k0, core_times()).get("cpu0") or 0.0
            if busy < self.args.quiet_threshold:
                break
            waited += 0.5
            self.quiet_spent += 0.5
        return waited

    def measure_wrk(self, t: Target, conns: int, seconds: float, warmup: float) -> dict:
        waited = self.wait_quiet()
        if warmup:
            wrk(t.url, t.token, conns, warmup)
        c0, k0 = t.cpu(), core_times()
        r = wrk(t.url, t.token, conns, seconds)
        c1, k1 = t.cpu(), core_times()
        r["core_busy"] = core_busy(k0, k1)
        r["waited_for_quiet_s"] = waited
        if c0 is not None and c1 is not None:
            r["cpu_s"] = c1 - c0
            r["cpu_us_per_req"] = (c1 - c0) / max(r["ok"], 1) * 1e6
            # Core 0 should run the target alone: what else ran there (other users' processes).
            busy0 = r["core_busy"].get("cpu0") or 0.0
            r["foreign_cpu0"] = round(max(0.0, busy0 - r["cpu_s"] / (r["duration_us"] / 1e6)), 3)
        return r

    def scenario1(self, targets: list[str]) -> None:
        log("scenario 1: throughput and CPU per request, zero-latency upstream (nginx canned)")
        reps = 1 if self.quick else 3
        seconds = 4 if self.quick else 6
        out: dict[str, Any] = {"conns": 64, "seconds": seconds, "reps": reps, "results": {}}
        upstream = self.start_canned()
        started: dict[str, Target] = {}
        try:
            started = self.start_all(targets, upstream)
            runs: dict[str, list[dict[str, Any]]] = {n: [] for n in started}
            for rep in range(reps):  # rounds interleave the targets, so drift hits all alike
                for name, t in started.items():
                    r = self.measure_wrk(t, 64, seconds, warmup=2 if rep == 0 else 1)
                    runs[name].append(r)
                    log(
                        f"  round {rep + 1} {t.label}: {r['ok_rps']:.0f} req/s"
                        + (
                            f", {r['cpu_us_per_req']:.1f} us CPU/req"
                            if "cpu_us_per_req" in r
                            else ""
                        )
                        + f", other load on core 0 {foreign(r):.0%}"
                        + f", errors {sum(r['errors'].values())}"
                    )
            for name, rs in runs.items():
                if "cpu_us_per_req" in rs[0]:
                    best = min(rs, key=lambda r: r["cpu_us_per_req"])
                else:
                    best = max(rs, key=lambda r: r["ok_rps"])
                out["results"][name] = {
                    "best": best,
                    "runs": rs,
                    "median_rps": statistics.median(r["ok_rps"] for r in rs),
                    "median_cpu_us_per_req": (
                        statistics.median(r["cpu_us_per_req"] for r in rs)
                        if "cpu_us_per_req" in rs[0]
                        else None
                    ),
                }
        finally:
            self.stop_all_targets(started)
            self.procs.stop("upstream-canned")
        self.results["scenarios"]["1_throughput"] = out

    def scenarios234(self, targets: list[str], which: set[int]) -> None:
        log("scenarios 2-4: 20 ms upstream (Python, uvloop, SO_REUSEPORT), streaming, 429 storm")
        upstream = self.start_py()
        stats_url = f"{upstream}/_fake/stats"
        seconds = 3 if self.quick else 5
        reps = 1 if self.quick else 2
        s2: dict[str, Any] = {"seconds": seconds, "delay_ms": 20, "reps": reps, "results": {}}
        s3: dict[str, Any] = {
            "requests": 96 if self.quick else 400,
            "concurrency": 8,
            "chunks": 20,
            "interval_ms": 5,
            "results": {},
        }
        s4: dict[str, Any] = {
            "seconds": 5 if self.quick else 10,
            "concurrency": 16,
            "limited_key": "k2",
            "retry_after_s": self.args.retry_after,
            "settle_s": 1.0,
            "results": {},
        }
        started: dict[str, Target] = {}
        try:
            started = self.start_all(targets, upstream)
            if 2 in which:
                for c in (1, 16, 64):
                    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in started}
                    for _ in range(reps):
                        for name, t in started.items():
                            runs[name].append(self.measure_wrk(t, c, seconds, warmup=1))
                    for name, rs in runs.items():
                        # The round with the least other load on core 0 (ties: lower p50).
                        best = min(rs, key=lambda r: (round(foreign(r), 2), r["p50_us"]))
                        best["rounds"] = [
                            {k: r[k] for k in ("p50_us", "p90_us", "p99_us", "ok_rps")}
                            | {"foreign_cpu0": foreign(r)}
                            for r in rs
                        ]
                        s2["results"].setdefault(name, {})[str(c)] = best
                        log(
                            f"  s2 {started[name].label} c={c}: p50 {best['p50_us'] / 1e3:.2f} ms,"
                            f" p99 {best['p99_us'] / 1e3:.2f} ms, {best['ok_rps']:.0f} req/s, "
                            f"errors {sum(best['errors'].values())}"
                        )
            if 3 in which:
                for name, t in started.items():
                    r = loadclient("stream", t.url, t.token, "--requests",
                                   str(s3["requests"]), "--concurrency", "8",
                                   "--timeout", "120")  # fmt: skip
                    s3["results"][name] = r
                    log(
                        f"  s3 {t.label}: TTFB p50 {r['ttfb_ms']['p50']:.2f} ms, TTLB p50 "
                        f"{r['ttlb_ms']['p50']:.2f} ms, {r['completed']} ok, errors {r['errors']}"
                    )
            if 4 in which:
                for name, t in started.items():
                    if name in ("direct", "bare", "transport", "raw"):  # no pool to cool a key in
                        continue
                    http(f"{upstream}/_fake/limit", b"k2")
                    try:
                        r = loadclient("storm", t.url, t.token, "--seconds",
                                       str(s4["seconds"]), "--concurrency", "16",
                                       "--settle", "1", "--stats", stats_url)  # fmt: skip
                    finally:
                        http(f"{upstream}/_fake/limit", b"")
                    s4["results"][name] = r
                    log(
                        f"  s4 {t.label}: {r['client_requests']} requests, errors "
                        f"{r['client_errors']} ({r['error_rate']:.1%}), attempts/request "
                        f"{r['attempts_per_request']:.3f} (after 1 s: "
                        f"{r['after_settle']['attempts_per_request']:.3f})"
                    )
        finally:
            self.stop_all_targets(started)
            self.procs.stop("upstream-py")
        if 2 in which:
            self.results["scenarios"]["2_latency"] = s2
        if 3 in which:
            self.results["scenarios"]["3_streaming"] = s3
        if 4 in which:
            self.results["scenarios"]["4_storm"] = s4

    def scenario5(self) -> None:
        log("scenario 5: pick cost with 10, 1,000 and 10,000 keys (bench/pool_pick.py)")
        out_json = self.workdir / "pool_pick.json"
        picks = "50000" if self.quick else "200000"
        cmd = ["taskset", "-c", "0", str(PY), str(BENCH / "pool_pick.py"), "--json",
               str(out_json), "--picks", picks]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if p.returncode != 0:
            self.results["scenarios"]["5_pick"] = {"error": p.stderr[-1500:]}
            log(f"  pool_pick failed: {p.stderr[-300:]}")
            return
        data = json.loads(out_json.read_text())
        self.results["scenarios"]["5_pick"] = {"picks": int(picks), **data}
        log("  " + p.stdout.replace("\n", "\n  "))

    def scenario6(self) -> None:
        log("scenario 6: cluster propagation")
        p = subprocess.run(
            [str(PY), str(BENCH / "cluster_propagation.py")],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if p.returncode == 0:
            self.results["scenarios"]["6_cluster"] = json.loads(p.stdout.strip().splitlines()[-1])
        else:
            msg = (p.stdout + p.stderr).strip()
            self.results["scenarios"]["6_cluster"] = {"status": "not measured yet", "message": msg}
            log(f"  {msg}")

    def memory_point(self, name: str, upstream: str, count: int, streams: bool) -> dict:
        """RSS of a fresh ``name`` before and while ``count`` idle connections (or streams in
        flight) are held; the difference per connection."""
        with self.target(name, upstream) as t:
            if t is None or t.pid is None:
                return {"error": "did not start"}
            time.sleep(1.0)
            before = tree_rss_bytes(t.pid)
            holder = hold(t.url, t.token, count, streams)
            try:
                assert holder.stdout is not None
                line = ""
                deadline = time.monotonic() + 180
                while time.monotonic() < deadline:
                    line = holder.stdout.readline()
                    if not line or line.startswith("READY "):
                        break
                if not line.startswith("READY "):
                    return {
                        "error": f"holder: {holder.stderr.read()[-500:] if holder.stderr else ''}"
                    }
                ready = json.loads(line[6:])
                time.sleep(2.0)  # let the proxy settle (timers, buffers)
                during = tree_rss_bytes(t.pid)
                alive = t.pid is not None and Path(f"/proc/{t.pid}").exists()
            finally:
                with contextlib.suppress(OSError):
                    holder.communicate("", timeout=60)
                if holder.poll() is None:
                    holder.kill()
            opened = max(ready["open"] - sum(ready["errors"].values()), 1)
            return {
                "requested": count,
                **ready,
                "rss_before": before,
                "rss_during": during,
                "per_connection_bytes": (during - before) / opened,
                "target_alive": alive,
            }

    def scenario7(self, targets: list[str]) -> None:
        log("scenario 7: memory per idle connection (10,000 held) and per in-flight stream")
        idle_n = 2000 if self.quick else 10_000
        stream_n = 100 if self.quick else 500
        cmd = [str(PY), str(BENCH / "upstream.py"), "--port", str(PORT_SLOW), "--workers", "1",
               "--delay", "0", "--chunks", "240", "--chunk-interval", "0.5",
               "--keys", ",".join(KEYS)]  # fmt: skip
        p = self.procs.start("upstream-slow", cmd, cpu=1)
        upstream = f"http://127.0.0.1:{PORT_SLOW}"
        out: dict[str, Any] = {"idle_connections": idle_n, "streams": stream_n, "results": {}}
        try:
            wait_ready(f"{upstream}{PATH}", "k1", 15, lambda: p.poll() is None)
            for name in targets:
                if name in ("direct", "litellm"):
                    continue
                idle = self.memory_point(name, upstream, idle_n, streams=False)
                stream = self.memory_point(name, upstream, stream_n, streams=True)
                out["results"][name] = {"idle": idle, "streams": stream}
                log(
                    f"  s7 {name}: idle {idle.get('per_connection_bytes', 0) / 1024:.1f} KiB/conn"
                    f" ({idle.get('open')} open, errors {idle.get('errors')}), stream "
                    f"{stream.get('per_connection_bytes', 0) / 1024:.1f} KiB/stream"
                )
        finally:
            self.procs.stop("upstream-slow")
        self.results["scenarios"]["7_memory"] = out

    def scenario8(self) -> None:
        log("scenario 8: sideproxy --workers 1 vs 2 (both cores, zero-latency upstream)")
        seconds = 4 if self.quick else 6
        reps = 1 if self.quick else 2
        upstream = self.start_canned()
        out: dict[str, Any] = {"conns": 64, "seconds": seconds, "results": {}}
        try:
            for rep in range(reps):
                for name in ("sideproxy-w1", "sideproxy-w2"):
                    with self.target(name, upstream, cpu="0,1") as t:
                        if t is None:
                            continue
                        r = self.measure_wrk(t, 64, seconds, warmup=1)
                        best = out["results"].get(name)
                        if best is None or r["ok_rps"] > best["ok_rps"]:
                            out["results"][name] = r
                        log(f"  s8 round {rep + 1} {t.label}: {r['ok_rps']:.0f} req/s, "
                            f"{r.get('cpu_us_per_req', 0):.1f} us CPU/req")  # fmt: skip
        finally:
            self.procs.stop("upstream-canned")
        w1, w2 = out["results"].get("sideproxy-w1"), out["results"].get("sideproxy-w2")
        if w1 and w2:
            out["scaling"] = w2["ok_rps"] / w1["ok_rps"]
        self.results["scenarios"]["8_workers"] = out

    def run(self) -> dict[str, Any]:
        only = self.args.only
        targets = [t for t in self.args.targets if t]
        started = time.monotonic()
        try:
            if 1 in only:
                self.scenario1(targets)
            if only & {2, 3, 4}:
                self.scenarios234(targets, only)
            if 5 in only:
                self.scenario5()
            if 6 in only:
                self.scenario6()
            if 7 in only:
                self.scenario7(targets)
            if 8 in only:
                self.scenario8()
        finally:
            self.procs.stop_all()
            self.results["meta"]["wall_s"] = round(time.monotonic() - started, 1)
            self.results["meta"]["waited_for_quiet_s"] = self.quiet_spent
        return self.results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for results.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="1,2,3,4,5,6,7,8")
    parser.add_argument("--targets", default="direct,sideproxy,nginx,litellm,bare,transport,raw")
    parser.add_argument("--upstream-workers", type=int, default=2)
    parser.add_argument("--retry-after", type=int, default=2, help="429 storm: seconds")
    parser.add_argument("--sideproxy-ref", help="run sideproxy/ as committed at this git ref")
    parser.add_argument("--quiet-threshold", type=float, default=0.1, help="core-0 busy share")
    parser.add_argument("--quiet-wait", type=float, default=15.0, help="seconds, per point")
    parser.add_argument("--quiet-budget", type=float, default=120.0, help="seconds, per run")
    parser.add_argument("--sideproxy-arg", action="append", default=[], dest="sideproxy_args")
    parser.add_argument("--sideproxy-env", action="append", default=[], help="NAME=VALUE")
    args = parser.parse_args()
    args.only = {int(x) for x in args.only.split(",") if x}
    args.targets = args.targets.split(",")
    args.sideproxy_env = dict(kv.split("=", 1) for kv in args.sideproxy_env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Scenario 7 holds 10,000 connections: every process started from here inherits this.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = Path(tempfile.mkdtemp(prefix="sideproxy-bench-"))
    log(f"work dir {workdir} (process logs)")
    bench = Bench(args, workdir)

    def on_signal(signum: int, _frame: object) -> None:
        bench.procs.stop_all()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    results = bench.run()
    results["meta"]["workdir"] = str(workdir)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
