"""Before/after for candidate fixes: each variant is Side Proxy run from a patched temporary copy.

    taskset -c 1 .venv/bin/python bench/variants.py --out bench/results [--reps 3] [--seconds 8]

Nothing under sideproxy/ is edited: each variant copies the package to a temp dir, applies
text patches (an exact old -> new replacement that must match once, else the variant is
reported as "did not apply") and/or passes CLI flags, and runs with PYTHONPATH pointing at the
copy. Variants run interleaved (round-robin over ``--reps`` rounds) against the canned nginx
upstream with wrk -c64, so drift hits them all alike; the table gives medians and the change
against the baseline of the same run. "Upper bound" variants remove a feature outright: they
measure what that feature costs, they are not proposals to drop it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

Patch = tuple[str, str, str]  # (file under sideproxy/, old, new)

# Undo-patches: what the tuning already in sideproxy/ (commit 2e96f70) buys, measured by
# taking it out again.
UNDO_GC_TUNE: Patch = (
    "proxy/_server.py",
    "    gc.collect()\n    gc.freeze()\n    gc.set_threshold(10_000, 50, 100)\n",
    "    return\n",
)
UNDO_LEAN_LOG_RECORD: Patch = (
    "proxy/_logging.py",
    "    logging._srcfile = None\n"
    "    logging.logThreads = False\n"
    "    logging.logProcesses = False\n"
    "    logging.logMultiprocessing = False\n",
    "",
)
# The 2xx answer's JSON check (a truncated body is retried on another key); the request's JSON
# is parsed anyway to read the model, so that one cannot be switched off.
_WHOLE_JSON_DOC = (
    '    """A 2xx JSON body that is one complete object or array'
    ' (truncation is the real fault)."""\n'
)
NO_JSON_CHECK: Patch = ("proxy/_bodies.py", _WHOLE_JSON_DOC, _WHOLE_JSON_DOC + "    return True\n")
NO_METRICS: list[Patch] = [
    ("proxy/_forward.py", "        self.metrics.inflight.inc()\n", ""),
    ("proxy/_forward.py", "            self.metrics.inflight.dec()\n", ""),
    *[
        ("proxy/_metrics.py", sig, sig + "        return\n")
        for sig in (
            "    def upstream(self, key: str, provider: str, status: str) -> None:\n",
            "    def client(self, provider: str, status: int) -> None:\n",
            "    def latency(self, provider: str, seconds: float) -> None:\n",
            "    def ttfb(self, provider: str, seconds: float) -> None:\n",
        )
    ],
]


@dataclass
class Variant:
    name: str
    description: str
    patches: list[Patch] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    upper_bound: bool = False


VARIANTS = [
    Variant("baseline", "as committed (gc freeze + lean log records included)"),
    Variant(
        "no-access-log",
        "`--no-access-log` (the flag exists; default is on)",
        args=["--no-access-log"],
    ),
    Variant(
        "undo gc tuning",
        "`_tune_gc` made a no-op: default thresholds, nothing frozen (as before 2e96f70)",
        patches=[UNDO_GC_TUNE],
    ),
    Variant(
        "undo lean log records",
        "caller lookup and thread/process fields back on (as before 2e96f70)",
        patches=[UNDO_LEAN_LOG_RECORD],
    ),
    Variant(
        "no-metrics (upper bound)",
        "Prometheus calls on the request path removed",
        patches=NO_METRICS,
        upper_bound=True,
    ),
    Variant(
        "no-json-check (upper bound)",
        "the 2xx answer's `json.loads` completeness check removed",
        patches=[NO_JSON_CHECK],
        upper_bound=True,
    ),
    Variant(
        "no-access-log + no-metrics + no-json-check",
        "all three together: what is left is the transport, routing and the pool",
        patches=[*NO_METRICS, NO_JSON_CHECK],
        args=["--no-access-log"],
        upper_bound=True,
    ),
]


def build(variant: Variant, root: Path, src: Path) -> tuple[Path | None, str | None]:
    """A patched copy of ``src/sideproxy`` (None when the variant patches nothing)."""
    if not variant.patches:
        return None, None
    dest = root / variant.name.replace(" ", "_").replace("(", "").replace(")", "")
    shutil.copytree(src / "sideproxy", dest / "sideproxy")
    for rel, old, new in variant.patches:
        path = dest / "sideproxy" / rel
        text = path.read_text()
        if text.count(old) != 1:
            return None, f"patch did not apply to {rel} (the code changed): {old.strip()[:80]!r}"
        path.write_text(text.replace(old, new))
    return dest, None


def latency(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sideproxy-variants-"))
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    hargs = argparse.Namespace(
        quick=True,
        upstream_workers=2,
        retry_after=2,
        sideproxy_args=[],
        sideproxy_env={},
        quiet_threshold=0.1,
        quiet_wait=15.0,
        quiet_budget=300.0,
        sideproxy_ref=args.ref,
    )
    bench = harness.Bench(hargs, workdir)
    built = {v.name: build(v, workdir / "copies", bench.sideproxy_src) for v in chosen}
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in chosen}
    try:
        upstream = bench.start_py()
        direct = bench.start_target("direct", upstream)
        for rep in range(args.reps):
            d = bench.measure_wrk(direct, 16, args.seconds, warmup=1)
            ds = harness.loadclient("stream", direct.url, direct.token, "--requests", "200")
            for v in chosen:
                copy, error = built[v.name]
                if error:
                    continue
                bench.args.sideproxy_args = v.args
                bench.args.sideproxy_env = {"PYTHONPATH": str(copy or bench.sideproxy_src)}
                with bench.target("sideproxy", upstream) as t:
                    if t is None:
                        continue
                    r = bench.measure_wrk(t, 16, args.seconds, warmup=1)
                    st = harness.loadclient("stream", t.url, t.token, "--requests", "200")
                    row = {
                        f"added_{p}_ms": (r[f"{p}_us"] - d[f"{p}_us"]) / 1e3
                        for p in ("p50", "p90", "p99")
                    } | {
                        "added_ttfb_p50_ms": st["ttfb_ms"]["p50"] - ds["ttfb_ms"]["p50"],
                        "added_ttfb_p99_ms": st["ttfb_ms"]["p99"] - ds["ttfb_ms"]["p99"],
                        "wrk": r,
                        "stream": st,
                    }
                    runs[v.name].append(row)
                    harness.log(
                        f"  round {rep + 1} {v.name}: added p50 {row['added_p50_ms']:.2f} ms, "
                        f"p99 {row['added_p99_ms']:.2f} ms; stream TTFB added p50 "
                        f"{row['added_ttfb_p50_ms']:.2f} ms, p99 {row['added_ttfb_p99_ms']:.2f} ms"
                    )
    finally:
        bench.procs.stop_all()
    keys = ("added_p50_ms", "added_p99_ms", "added_ttfb_p50_ms", "added_ttfb_p99_ms")
    lines = [
        f"### Before/after, latency: 20 ms upstream, wrk -c16 {args.seconds} s and 200 streams "
        f"at concurrency 8, minus direct in the same round; median of {args.reps} rounds",
        "",
        "| variant | added p50 ms | added p99 ms | stream added TTFB p50 ms | "
        "stream added TTFB p99 ms |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    summary = []
    for v in chosen:
        rs = runs[v.name]
        row: dict[str, Any] = {"name": v.name, "error": built[v.name][1], "runs": rs}
        if rs:
            row |= {k: statistics.median(r[k] for r in rs) for k in keys}
            lines.append(f"| {v.name} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
        else:
            lines.append(f"| {v.name} | {row['error'] or 'failed'} | | | |")
        summary.append(row)
    text = "\n".join(lines) + "\n"
    (out / "variants-latency.json").write_text(json.dumps({"variants": summary}, indent=2) + "\n")
    (out / "variants-latency.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated variant names")
    parser.add_argument("--ref", help="patch sideproxy/ as committed at this git ref")
    parser.add_argument(
        "--scenario",
        choices=("throughput", "latency"),
        default="throughput",
        help="throughput: canned upstream, wrk -c64 (CPU/request); latency: 20 ms upstream, "
        "wrk -c16 percentiles and 200 streams at concurrency 8, each minus direct's",
    )
    args = parser.parse_args()
    if args.scenario == "latency":
        latency(args)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="sideproxy-variants-"))
    chosen = [v for v in VARIANTS if not args.only or v.name in args.only.split(",")]
    hargs = argparse.Namespace(
        quick=True,
        upstream_workers=2,
        retry_after=2,
        sideproxy_args=[],
        sideproxy_env={},
        quiet_threshold=0.1,
        quiet_wait=15.0,
        quiet_budget=300.0,
        sideproxy_ref=args.ref,
    )
    bench = harness.Bench(hargs, workdir)
    built: dict[str, tuple[Path | None, str | None]] = {
        v.name: build(v, workdir / "copies", bench.sideproxy_src) for v in chosen
    }
    runs: dict[str, list[dict[str, Any]]] = {v.name: [] for v in chosen}
    try:
        upstream = bench.start_canned()
        for rep in range(args.reps):
            for v in chosen:
                copy, error = built[v.name]
                if error:
                    continue
                bench.args.sideproxy_args = v.args
                bench.args.sideproxy_env = {"PYTHONPATH": str(copy or bench.sideproxy_src)}
                with bench.target("sideproxy", upstream) as t:
                    if t is None:
                        continue
                    r = bench.measure_wrk(t, 64, args.seconds, warmup=2)
                    runs[v.name].append(r)
                    harness.log(
                        f"  round {rep + 1} {v.name}: {r['ok_rps']:.0f} req/s, "
                        f"{r['cpu_us_per_req']:.1f} us CPU/req, other load on core 0 "
                        f"{r['foreign_cpu0']:.0%}"
                    )
    finally:
        bench.procs.stop_all()
    summary = []
    for v in chosen:
        rs = runs[v.name]
        row: dict[str, Any] = {
            "name": v.name,
            "description": v.description,
            "upper_bound": v.upper_bound,
            "error": built[v.name][1],
            "runs": rs,
        }
        if rs:
            row["cpu_us_per_req"] = statistics.median(r["cpu_us_per_req"] for r in rs)
            row["min_cpu_us_per_req"] = min(r["cpu_us_per_req"] for r in rs)
            row["ok_rps"] = statistics.median(r["ok_rps"] for r in rs)
            row["errors"] = sum(sum(r["errors"].values()) for r in rs)
        summary.append(row)
    base = next((s for s in summary if s["name"] == "baseline" and "cpu_us_per_req" in s), None)
    lines = [
        f"### Before/after: patched copies of the package, median of {args.reps} interleaved "
        f"rounds, wrk -c64, {args.seconds} s each, zero-latency upstream",
        "",
        "| variant | what changes | CPU µs/req (median) | vs baseline | CPU µs/req (min) | "
        "vs baseline | req/s (median) | vs baseline |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        if "cpu_us_per_req" not in s:
            lines.append(
                f"| {s['name']} | {s['description']} | {s['error'] or 'failed'} | | | | | |"
            )
            continue
        dc = dr = dm = "—"
        if base and s is not base:
            mdiff = s["min_cpu_us_per_req"] - base["min_cpu_us_per_req"]
            dm = (
                f"{mdiff:+.0f} µs ({s['min_cpu_us_per_req'] / base['min_cpu_us_per_req'] - 1:+.0%})"
            )
            diff = s["cpu_us_per_req"] - base["cpu_us_per_req"]
            dc = f"{diff:+.0f} µs ({s['cpu_us_per_req'] / base['cpu_us_per_req'] - 1:+.0%})"
            dr = f"{s['ok_rps'] / base['ok_rps'] - 1:+.0%}"
        lines.append(
            f"| {s['name']} | {s['description']} | {s['cpu_us_per_req']:.0f} | {dc} | "
            f"{s['min_cpu_us_per_req']:.0f} | {dm} | {s['ok_rps']:,.0f} | {dr} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "variants.json").write_text(json.dumps({"variants": summary}, indent=2) + "\n")
    (out / "variants.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
