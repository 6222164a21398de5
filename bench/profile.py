"""Where Side Proxy's CPU goes under the zero-latency load: py-spy, ranked by file:function.

    taskset -c 1 .venv/bin/python bench/profile.py --out bench/results --py-spy PATH [--seconds 15]

Starts the canned nginx upstream (core 1) and ``sideproxy serve`` (core 0) the way the harness
does, drives it with wrk -c64 from core 1, and samples it with ``py-spy record --native`` (C
frames of aiohttp, multidict, yarl, uvloop included). Writes ``profile.json`` and
``profile.md``: inclusive and self shares by function, and a breakdown of the request path by
component. The raw collapsed stacks go to bench/results/tmp/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::(?P<line>\d+))?\)$")

# Components by file path fragment, first match wins (leaf attribution).
COMPONENTS = [
    ("sideproxy/proxy/http/", "sideproxy: HTTP transport (proxy/http/)"),
    ("sideproxy/proxy/_server.py", "sideproxy: front (_server.py)"),
    ("sideproxy/proxy/_forward.py", "sideproxy: forwarder (_forward.py)"),
    ("sideproxy/proxy/_attempt.py", "sideproxy: attempt (_attempt.py)"),
    ("sideproxy/proxy/_route.py", "sideproxy: route (_route.py)"),
    ("sideproxy/proxy/_model.py", "sideproxy: model read (_model.py)"),
    ("sideproxy/proxy/_bodies.py", "sideproxy: body checks (_bodies.py)"),
    ("sideproxy/proxy/_headers.py", "sideproxy: header filtering (_headers.py)"),
    ("sideproxy/proxy/_auth.py", "sideproxy: virtual-key check (_auth.py)"),
    ("sideproxy/proxy/_paths.py", "sideproxy: path check (_paths.py)"),
    ("sideproxy/proxy/_metrics.py", "sideproxy: metrics wrapper (_metrics.py)"),
    ("sideproxy/proxy/_logging.py", "sideproxy: log formatting (_logging.py)"),
    ("sideproxy/pool/", "sideproxy: pool core (pool/)"),
    ("sideproxy/", "sideproxy: other"),
    ("prometheus_client/", "prometheus_client"),
    ("/logging/", "stdlib logging"),
    ("json/", "stdlib json"),
    ("aiohttp/client", "aiohttp client (client*.py)"),
    ("aiohttp/connector", "aiohttp client (connector.py)"),
    ("aiohttp/web_", "aiohttp server (web_*.py)"),
    ("aiohttp/http_writer", "aiohttp HTTP writer"),
    ("aiohttp/streams", "aiohttp streams"),
    ("aiohttp/_http_parser", "aiohttp C parser (llhttp)"),
    ("aiohttp/", "aiohttp other"),
    ("multidict", "multidict"),
    ("yarl", "yarl"),
    ("uvloop", "uvloop / libuv"),
    ("asyncio/", "stdlib asyncio"),
    ("libc", "libc / kernel (syscalls)"),
    ("libpython", "CPython interpreter"),
    ("python3", "CPython interpreter"),
]


def short(path: str) -> str:
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def parse(raw: str) -> list[tuple[list[tuple[str, str]], int]]:
    stacks = []
    for raw_line in raw.splitlines():
        line = raw_line.strip()
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        frames = []
        for fr in stack.split(";"):
            m = FRAME.match(fr)
            if m:
                frames.append((m["func"], short(m["file"])))
            else:
                frames.append((fr, "?"))
        stacks.append((frames, int(count)))
    return stacks


def component(file: str) -> str:
    for frag, name in COMPONENTS:
        if frag in file:
            return name
    return "other native" if file.endswith(".so") or ".so." in file or file == "?" else file


def analyse(stacks: list[tuple[list[tuple[str, str]], int]]) -> dict[str, Any]:
    total = sum(c for _, c in stacks)
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    comp: Counter[str] = Counter()
    for frames, count in stacks:
        seen = set()
        for func, file in frames:
            name = f"{file}:{func}"
            if name not in seen:
                seen.add(name)
                inclusive[name] += count
        func, file = frames[-1]
        self_[f"{file}:{func}"] += count
        # Leaf attribution, but skip interpreter/libc frames up to the nearest Python-level or
        # library frame so "syscall" time lands on whoever made the call.
        comp[component(leaf_owner(frames))] += count
    return {
        "samples": total,
        "inclusive": [(k, v / total) for k, v in inclusive.most_common(60)],
        "self": [(k, v / total) for k, v in self_.most_common(40)],
        "components": [(k, v / total) for k, v in comp.most_common()],
    }


def leaf_owner(frames: list[tuple[str, str]]) -> str:
    for _func, file in reversed(frames):
        if any(frag in file for frag, _ in COMPONENTS[:-3]):
            return file
    return frames[-1][1]


def inclusive_of(stacks: list[tuple[list[tuple[str, str]], int]], needle: str) -> float:
    total = sum(c for _, c in stacks)
    hit = sum(c for frames, c in stacks if any(needle in f"{fl}:{fn}" for fn, fl in frames))
    return hit / total if total else 0.0


# Named slices of the request path: share of samples whose stack contains the needle.
SLICES = [
    ("transport: parse requests (ServerProtocol.data_received)", "ServerProtocol.data_received"),
    ("transport: per-request task (ServerProtocol._run)", "ServerProtocol._run"),
    ("Forwarder.handle (the request path's stages + the upstream call)", "Forwarder.handle"),
    ("  access log line (Forwarder._log_access)", "Forwarder._log_access"),
    ("  stdlib json (request validity, model read, 2xx body check)", "json/__init__.py:loads"),
    ("  virtual-key check (VirtualKeys.check)", "_auth.py:VirtualKeys.check"),
    ("  path check (parse_path)", "_paths.py:parse_path"),
    ("  route (resolve)", "_route.py:resolve"),
    ("  pool acquire", "_pool.py:ManagedCreditPool.acquire"),
    ("  pool release (incl. header parsing)", "_pool.py:ManagedCreditPool.release"),
    ("  prometheus metrics (all calls)", "prometheus_client/"),
    ("  transport: upstream request (UpstreamClient.send)", "UpstreamClient.send"),
    ("    of which the socket write (Connection.send)", "Connection.send"),
    ("  transport: answer the client (Cycle.respond)", "Cycle.respond"),
    ("    of which the socket write (ServerProtocol.write)", "ServerProtocol.write"),
    ("transport: upstream responses (Connection.data_received)", "Connection.data_received"),
    ("stdlib logging (anywhere)", "logging/__init__.py:"),
    ("cyclic GC (gc_collect_main, native only)", "gc_collect_main"),
]


def render(result: dict[str, Any]) -> str:
    a = result["analysis"]
    lines = [
        "## Profile: Side Proxy under the zero-latency load",
        "",
        f"py-spy {result['py_spy_mode']}, {result['rate']} Hz for {result['seconds']} s: "
        f"{a['samples']:,} samples; wrk -c64 drove {result['wrk']['ok_rps']:,.0f} req/s "
        f"({result['wrk'].get('cpu_us_per_req', 0):.0f} µs CPU/request while sampled). Shares are "
        "of the proxy's busy samples; µs/request = share \u00d7 CPU per request.",
        "",
        "### The request path, by slice (inclusive: a slice's share contains its callees)",
        "",
        "| slice | share | ≈ µs/request |",
        "| --- | ---: | ---: |",
    ]
    cpu = result["wrk"].get("cpu_us_per_req", 0.0)
    for name, share in result["slices"]:
        lines.append(f"| {name} | {share:.1%} | {share * cpu:.0f} |")
    lines += [
        "",
        "### By component (leaf frame's owner)",
        "",
        "| component | share | ≈ µs/request |",
        "| --- | ---: | ---: |",
    ]
    for name, share in a["components"][:20]:
        lines.append(f"| {name} | {share:.1%} | {share * cpu:.0f} |")
    lines += ["", "### Top functions, inclusive", "", "| file:function | share |", "| --- | ---: |"]
    for name, share in a["inclusive"][:35]:
        lines.append(f"| `{name}` | {share:.1%} |")
    lines += ["", "### Top functions, self", "", "| file:function | share |", "| --- | ---: |"]
    for name, share in a["self"][:25]:
        lines.append(f"| `{name}` | {share:.1%} |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--py-spy", required=True)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames)")
    parser.add_argument("--name", default="profile")
    parser.add_argument("--ref", help="profile sideproxy/ as committed at this git ref")
    parser.add_argument("--sideproxy-arg", action="append", default=[], dest="sideproxy_args")
    parser.add_argument("--sideproxy-env", action="append", default=[])
    args = parser.parse_args()
    out = Path(args.out)
    raw_dir = out / "tmp" if out.name != "tmp" else out
    raw_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sideproxy-profile-"))
    hargs = argparse.Namespace(
        quick=True,
        upstream_workers=2,
        retry_after=2,
        sideproxy_args=args.sideproxy_args,
        sideproxy_env=dict(kv.split("=", 1) for kv in args.sideproxy_env),
        quiet_threshold=0.1,
        quiet_wait=15.0,
        quiet_budget=60.0,
        sideproxy_ref=args.ref,
    )
    bench = harness.Bench(hargs, workdir)
    try:
        upstream = bench.start_canned()
        t = bench.start_target("sideproxy", upstream)
        harness.wrk(t.url, t.token, 64, 3)  # warm up
        result_box: dict[str, Any] = {}
        total = args.seconds + 4

        def load() -> None:
            result_box["wrk"] = bench.measure_wrk(t, 64, total, warmup=0)

        th = threading.Thread(target=load)
        th.start()
        time.sleep(2)
        raw_path = raw_dir / f"{args.name}.collapsed.txt"
        mode = "--native (C frames too; slows the proxy more)" if args.native else "python frames"
        cmd = [args.py_spy, "record", "--pid", str(t.pid), "--rate", str(args.rate),
               "--duration", str(args.seconds), "--format", "raw",
               "--output", str(raw_path)]  # fmt: skip
        if args.native:
            cmd.append("--native")
        p = subprocess.run(
            cmd, capture_output=True, text=True, timeout=args.seconds + 120, check=False
        )
        if p.returncode != 0 and args.native:
            harness.log(f"py-spy --native failed ({p.stderr.strip()[-200:]}); python frames only")
            cmd.remove("--native")
            mode = "python frames"
            p = subprocess.run(
                cmd, capture_output=True, text=True, timeout=args.seconds + 120, check=False
            )
        th.join(timeout=total + 60)
        if p.returncode != 0:
            sys.exit(f"py-spy failed: {p.stderr[-500:]}")
        stacks = parse(raw_path.read_text())
        result = {
            "py_spy_mode": mode,
            "rate": args.rate,
            "seconds": args.seconds,
            "wrk": result_box.get("wrk", {}),
            "analysis": analyse(stacks),
            "slices": [(name, inclusive_of(stacks, needle)) for name, needle in SLICES],
        }
        (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        text = render(result)
        (out / f"{args.name}.md").write_text(text)
        print(text)
    finally:
        bench.procs.stop_all()


if __name__ == "__main__":
    main()
