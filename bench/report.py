"""results.json -> markdown tables (ratios within the run) and the targets met/missed.

    python bench/report.py bench/results/results.json [--out bench/results/tables.md]

Only the standard library: runs in the project venv or any Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

ORDER = ["direct", "sideproxy", "nginx", "litellm", "bare", "transport", "raw"]
LABELS = {
    "direct": "direct (no proxy)",
    "sideproxy": "**Side Proxy**",
    "nginx": "nginx key-injector",
    "litellm": "LiteLLM proxy",
    "bare": "bare aiohttp (floor)",
    "transport": "Side Proxy transport (floor)",
    "raw": "raw-protocol prototype",
}
REF = "sideproxy"
X = "\u00d7"  # multiplication sign


def fnum(x: float | None, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0 or a <= 0 or b < 0:
        return "—"
    r = a / b
    return f"{r:,.0f}{X}" if r >= 100 else f"{r:.2f}{X}" if r < 10 else f"{r:.1f}{X}"


def ms(us: float | None) -> float | None:
    return None if us is None else us / 1e3


def missing_rows(res: dict[str, Any], section: dict[str, Any], cols: int) -> list[str]:
    rows = []
    for name in ORDER:
        if name in section or name not in res.get("targets", {}):
            continue
        err = res["targets"][name].get("error")
        if err:
            first = err.splitlines()[0][:160]
            rows.append(f"| {LABELS[name]} | not measured: {first} |" + " |" * (cols - 2))
    return rows


def s1(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("1_throughput")
    if not s:
        return []
    r = {k: v["best"] for k, v in s["results"].items()}
    ref = r.get(REF, {})
    out = [
        f"### 1. Throughput and CPU per request (zero-latency upstream, wrk -t1 -c{s['conns']}, "
        f"{s['seconds']} s, best of {s['reps']})",
        "",
        "| target | req/s | req/s vs Side Proxy | CPU µs/req | CPU vs Side Proxy | p50 ms | "
        "p99 ms | non-2xx + socket errors | other load on core 0 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ORDER:
        if name not in r:
            continue
        x = r[name]
        errs = sum(x["errors"].values())
        cpu = x.get("cpu_us_per_req")
        foreign = x.get("foreign_cpu0")
        out.append(
            f"| {LABELS[name]} | {fnum(x['ok_rps'], 0)} | {ratio(x['ok_rps'], ref.get('ok_rps'))}"
            f" | {fnum(cpu)} | {ratio(cpu, ref.get('cpu_us_per_req')) if cpu else '—'}"
            f" | {fnum(ms(x['p50_us']), 2)} | {fnum(ms(x['p99_us']), 2)} | {errs}"
            f" | {'—' if foreign is None else f'{foreign:.0%}'} |"
        )
    out += missing_rows(res, r, 9)
    out += [
        "",
        "Direct is wrk against the canned nginx upstream on core 1 (wrk shares that core), so "
        "its req/s is the load side's ceiling, not a proxy figure. CPU is the target's own "
        "process tree (utime+stime) over the measured run divided by its successful requests.",
        "",
    ]
    return out


def s2(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("2_latency")
    if not s:
        return []
    r = s["results"]
    d = r.get("direct", {})
    out = [
        f"### 2. Added latency over direct, {s['delay_ms']} ms upstream (closed-loop wrk -t1, "
        f"{s['seconds']} s per point)",
        "",
        "| target | conns | p50 ms | p90 ms | p99 ms | added p50 | added p90 | added p99 | "
        "added p50 vs Side Proxy | req/s | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in ("1", "16", "64"):
        for name in ORDER:
            if name not in r or c not in r[name]:
                continue
            x, base = r[name][c], d.get(c)
            added = {
                p: (ms(x[f"{p}_us"] - base[f"{p}_us"]) if base and name != "direct" else None)
                for p in ("p50", "p90", "p99")
            }
            ref = r.get(REF, {}).get(c)
            ref_added = ms(ref["p50_us"] - base["p50_us"]) if ref and base else None
            rel = (
                ratio(added["p50"], ref_added)
                if name not in ("direct", REF) and ref_added and ref_added > 0.02
                else "—"
            )
            out.append(
                f"| {LABELS[name]} | {c} | {fnum(ms(x['p50_us']), 2)} | "
                f"{fnum(ms(x['p90_us']), 2)} | {fnum(ms(x['p99_us']), 2)} | "
                f"{fnum(added['p50'], 2)} | {fnum(added['p90'], 2)} | {fnum(added['p99'], 2)} | "
                f"{rel} | {fnum(x['ok_rps'], 0)} | {sum(x['errors'].values())} |"
            )
    out += missing_rows(res, r, 11)
    ideal = {c: int(c) / (s["delay_ms"] / 1e3) for c in ("1", "16", "64")}
    if d:
        out += [
            "",
            "Upstream headroom check (direct req/s vs the closed-loop ideal conns / 20 ms): "
            + ", ".join(f"c={c}: {d[c]['ok_rps']:,.0f} of {ideal[c]:,.0f}" for c in ideal if c in d)
            + ".",
        ]
    out += [
        "",
        "Closed loop: a slower target also gets fewer requests per second, so at 16 and 64 "
        "connections a saturated proxy shows queueing, not only its own per-request cost. "
        "wrk2 (fixed rate) is not packaged by Debian.",
        "",
    ]
    return out


def s3(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("3_streaming")
    if not s:
        return []
    r = s["results"]
    d = r.get("direct")
    out = [
        f"### 3. Streaming: {s['requests']} streams at concurrency {s['concurrency']}, "
        f"{s['chunks']} SSE chunks {s['interval_ms']} ms apart",
        "",
        "| target | TTFB p50 ms | TTFB p99 ms | added TTFB p50 | added TTFB p99 | TTLB p50 ms | "
        "TTLB p99 ms | added TTLB p50 | added TTLB p99 | streams ok | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ORDER:
        if name not in r:
            continue
        x = r[name]

        def add(kind: str, p: str, x: dict[str, Any] = x, name: str = name) -> float | None:
            if not d or name == "direct":
                return None
            return x[kind][p] - d[kind][p]

        out.append(
            f"| {LABELS[name]} | {fnum(x['ttfb_ms']['p50'], 2)} | {fnum(x['ttfb_ms']['p99'], 2)}"
            f" | {fnum(add('ttfb_ms', 'p50'), 2)} | {fnum(add('ttfb_ms', 'p99'), 2)}"
            f" | {fnum(x['ttlb_ms']['p50'], 2)} | {fnum(x['ttlb_ms']['p99'], 2)}"
            f" | {fnum(add('ttlb_ms', 'p50'), 2)} | {fnum(add('ttlb_ms', 'p99'), 2)}"
            f" | {x['completed']} | {sum(x['errors'].values())} |"
        )
    out += missing_rows(res, r, 11)
    out += [
        "",
        "TTFB is the first non-empty body chunk (the first SSE event), TTLB the end of the "
        "stream, both from just before the request is sent (aiohttp client with uvloop on core 1).",
        "",
    ]
    return out


def s4(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("4_storm")
    if not s:
        return []
    r = s["results"]
    out = [
        f"### 4. 429 storm: 4 keys, `{s['limited_key']}` always answers 429 "
        f"(`retry-after: {s['retry_after_s']}`), {s['concurrency']} connections, {s['seconds']} s,"
        " 20 ms upstream",
        "",
        "| target | client requests | client-visible errors | error rate | upstream attempts | "
        "attempts per request | attempts per request after the first 1 s | 429s at the upstream |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name in ORDER:
        if name not in r:
            continue
        x = r[name]
        n429 = sum(v.get("429", 0) for v in x["upstream_attempts"]["by_key"].values())
        out.append(
            f"| {LABELS[name]} | {x['client_requests']:,} | {x['client_errors']:,} | "
            f"{x['error_rate']:.2%} | {x['upstream_attempts']['total']:,} | "
            f"{x['attempts_per_request']:.3f} | {x['after_settle']['attempts_per_request']:.3f} | "
            f"{n429:,} |"
        )
    out += missing_rows(res, r, 8)
    out += [
        "",
        "Attempts are counted at the upstream (`/_fake/stats`, shared across its processes). "
        "nginx has no notion of a key cooling: a request that draws the limited key gets its 429.",
        "",
    ]
    return out


def s5(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("5_pick")
    if not s:
        return []
    if "error" in s:
        return ["### 5. Pick cost", "", f"Failed: `{s['error'][:300]}`", ""]
    out = [
        "### 5. Pick cost (`bench/pool_pick.py`: acquire + release with headers, two tiers, "
        "weights 1-4, 5% of keys cooling; best of 5)",
        "",
        "| case | keys | ns per pick | vs 10 keys |",
        "| --- | ---: | ---: | ---: |",
    ]
    for case, picks in _pick_cases(s["pick_ns"]).items():
        p = {int(k): v for k, v in picks.items()}
        for n in sorted(p):
            out.append(f"| {case} | {n:,} | {p[n]:,.0f} | {p[n] / p[min(p)]:.2f}{X} |")
    out.append("")
    return out


def _pick_cases(pick_ns: dict[str, Any]) -> dict[str, dict[str, float]]:
    """pool_pick.py's output: {keys: ns}, or {case: {keys: ns}} since the model-aware pool."""
    if all(isinstance(v, dict) for v in pick_ns.values()):
        return pick_ns
    return {"": pick_ns}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f} ms"


def s6(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("6_cluster")
    if not s:
        return []
    head = ["### 6. Cluster propagation", ""]
    if "p50_ms" not in s:
        return [*head, f"Not measured: {s.get('message', 'no result')}", ""]
    stages = s.get("stages", {})
    return [
        *head,
        "From a 429 on replica A to every replica avoiding the key (real kube-apiserver, operator "
        "and proxies as processes):",
        "",
        "| p50 | p90 | max | 429 → ReplicaReport written (p50) | report → last replica (p50) |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {s['p50_ms']:.0f} ms | {s.get('p90_ms', float('nan')):.0f} ms "
        f"| {s.get('max_ms', float('nan')):.0f} ms "
        f"| {_ms(stages.get('429_to_report_written_p50_ms'))} "
        f"| {_ms(stages.get('report_to_last_replica_p50_ms'))} |",
        "",
    ]


def s7(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("7_memory")
    if not s:
        return []
    out = [
        f"### 7. Memory: {s['idle_connections']:,} idle keep-alive connections, "
        f"{s['streams']} streams in flight (RSS of the process tree)",
        "",
        "| target | RSS before | RSS, idle held | per idle connection | RSS, streams held "
        "| per in-flight stream | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name in ORDER:
        r = s["results"].get(name)
        if not r:
            continue
        idle, st = r["idle"], r["streams"]
        if "per_connection_bytes" not in idle or "per_connection_bytes" not in st:
            out.append(f"| {LABELS[name]} | not measured: {idle.get('error') or st.get('error')} |"
                       + " |" * 5)  # fmt: skip
            continue
        errors = {**idle["errors"], **{f"stream {k}": v for k, v in st["errors"].items()}}
        out.append(
            f"| {LABELS[name]} | {idle['rss_before'] / 2**20:.1f} MiB "
            f"| {idle['rss_during'] / 2**20:.1f} MiB "
            f"| {idle['per_connection_bytes'] / 1024:.1f} KiB "
            f"| {st['rss_during'] / 2**20:.1f} MiB | {st['per_connection_bytes'] / 1024:.1f} KiB "
            f"| {errors or 'none'} |"
        )
    out += [
        "",
        "Per stream counts everything one stream in flight holds in the proxy: the client "
        "connection, the upstream connection and their buffers.",
        "",
    ]
    return out


def s8(res: dict[str, Any]) -> list[str]:
    s = res["scenarios"].get("8_workers")
    if not s or not s.get("results"):
        return []
    out = [
        f"### 8. `--workers`: 1 vs 2 processes on both cores (zero-latency upstream, "
        f"wrk -c{s['conns']}, best round)",
        "",
        "| workers | req/s | CPU µs/req | core 0 busy | core 1 busy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in ("sideproxy-w1", "sideproxy-w2"):
        r = s["results"].get(name)
        if r:
            out.append(
                f"| {name[-1]} | {r['ok_rps']:,.0f} | {fnum(r.get('cpu_us_per_req'))} "
                f"| {r['core_busy'].get('cpu0', 0):.0%} | {r['core_busy'].get('cpu1', 0):.0%} |"
            )
    if "scaling" in s:
        out += ["", f"2 workers / 1 worker: {s['scaling']:.2f}{X} the throughput."]
    out += [
        "",
        "This machine has 2 cores and wrk plus the upstream run on them too, so 2 workers "
        "compete with the load generator: compare CPU per request (flat = the workers scale) "
        "more than req/s.",
        "",
    ]
    return out


def verdict(value: float | None, limit: float, unit: str, digits: int = 1) -> tuple[str, str]:
    if value is None:
        return "—", "not measured"
    v = f"{value:.{digits}f} {unit}".strip()
    if value <= limit:
        margin = (limit - value) / limit if limit else 0.0
        return v, f"**met** ({margin:.0%} under)"
    over = value / limit if limit > 0 else math.inf
    return v, f"**missed** by {value - limit:.{digits}f} {unit} ({over:.2f}{X} the limit)".replace(
        "  ", " "
    )


def targets(res: dict[str, Any]) -> list[str]:
    sc = res["scenarios"]
    rows: list[tuple[str, str, str, str]] = []

    def get(path: list[str]) -> Any:
        cur: Any = sc
        for p in path:
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    cpu = get(["1_throughput", "results", REF, "best", "cpu_us_per_req"])
    ngx = get(["1_throughput", "results", "nginx", "best", "cpu_us_per_req"])
    if cpu is not None and ngx:
        rows.append(
            (
                "CPU per request vs nginx's, same run (zero-latency upstream)",
                f"≤ 4{X}",
                f"{cpu:.1f} µs = {cpu / ngx:.2f}{X} ({ngx:.1f} µs)",
                verdict(cpu / ngx, 4.0, "")[1],
            )
        )
    else:
        rows.append(("CPU per request vs nginx's", f"≤ 4{X}", fnum(cpu), "not measured"))
    for p, limit in (("p50", 0.3), ("p99", 2.0)):
        a = get(["2_latency", "results", REF, "16", f"{p}_us"])
        b = get(["2_latency", "results", "direct", "16", f"{p}_us"])
        val = (a - b) / 1e3 if a is not None and b is not None else None
        rows.append(
            (
                f"added latency, c=16, 20 ms upstream, {p}",
                f"≤ {limit} ms",
                *verdict(val, limit, "ms", 2),
            )
        )
    a = get(["3_streaming", "results", REF, "ttfb_ms", "p50"])
    b = get(["3_streaming", "results", "direct", "ttfb_ms", "p50"])
    val = a - b if a is not None and b is not None else None
    rows.append(("streaming added TTFB, p50", "≤ 0.3 ms", *verdict(val, 0.3, "ms", 2)))
    idle = get(["7_memory", "results", REF, "idle"])
    stream = get(["7_memory", "results", REF, "streams"])
    if idle and "per_connection_bytes" in idle:
        kib = idle["per_connection_bytes"] / 1024
        rows.append(("memory per idle client connection", "≤ 16 KiB", *verdict(kib, 16, "KiB")))
        held = idle["open"] - sum(idle["errors"].values())
        ok = held == idle["requested"] and idle.get("still_open", held) == held
        rows.append(
            (
                f"{idle['requested']:,} idle client connections held",
                "no error",
                f"{held:,} held, RSS {idle['rss_during'] / 2**20:.0f} MiB",
                "**met**" if ok and idle.get("target_alive") else "**missed**",
            )
        )
    else:
        rows.append(("memory per idle client connection", "≤ 16 KiB", "—", "not measured"))
    if stream and "per_connection_bytes" in stream:
        kib = stream["per_connection_bytes"] / 1024
        rows.append(("memory per in-flight stream", "≤ 64 KiB", *verdict(kib, 64, "KiB")))
    scaling = get(["8_workers", "scaling"])
    rows.append(
        (
            "throughput at --workers 2 vs 1",
            f"≥ 1.8{X}",
            "—" if scaling is None else f"{scaling:.2f}{X}",
            "not measured"
            if scaling is None
            else "**met**"
            if scaling >= 1.8
            else "**missed** (see scenario 8: the load generator shares the 2 cores)",
        )
    )
    storm = get(["4_storm", "results", REF])
    if storm:
        rows.append(
            ("429 storm: client-visible errors", "0", str(storm["client_errors"]),
             "**met**" if storm["client_errors"] == 0 else "**missed**")
        )  # fmt: skip
        v = storm["after_settle"]["attempts_per_request"]
        rows.append(
            (
                "429 storm: attempts per request once the key cools",
                "≤ 1.05",
                *verdict(v, 1.05, "", 3),
            )
        )
    else:
        rows.append(("429 storm", "0 errors, ≤ 1.05", "—", "not measured"))
    pick = get(["5_pick", "pick_ns"])
    if pick:
        for case, picks in _pick_cases(pick).items():
            r = picks["10000"] / picks["10"]
            rows.append(
                (
                    f"pick cost at 10,000 keys vs 10{f' ({case})' if case else ''}",
                    f"≤ 1.5{X}",
                    f"{r:.2f}{X}",
                    verdict(r, 1.5, "")[1],
                )
            )
    cluster = get(["6_cluster", "p50_ms"])
    if cluster is not None:
        rows.append(("cluster propagation p50", "< 1 s", *verdict(cluster, 1000.0, "ms", 0)))
    else:
        rows.append(("cluster propagation", "< 1 s", "—", "not measured"))
    out = [
        "### Targets",
        "",
        "| target | limit | measured | verdict |",
        "| --- | --- | ---: | --- |",
    ]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out.append("")
    return out


def meta(res: dict[str, Any]) -> list[str]:
    m = res["meta"]
    dirty = " (uncommitted changes in sideproxy/)" if m["sideproxy_dirty"] else ""
    nginx = m["nginx"].replace("nginx version: ", "")
    wrk = " ".join(m["wrk"].split()[:2])
    return [
        f"Run: {m['date_utc']} ({m['mode']}, {m.get('wall_s', '?')} s), {m['cpu']}, "
        f"{m['cores']} cores, kernel {m['kernel']}; {m['python']}, aiohttp/uvloop "
        f"{m['aiohttp_uvloop']}; {nginx}; {wrk}; LiteLLM {m['litellm']}; Side Proxy "
        f"at {m['sideproxy_commit']}{dirty}.",
        "",
    ]


def render(res: dict[str, Any]) -> str:
    lines = ["## Results", "", *meta(res), *targets(res)]
    for f in (s1, s2, s3, s4, s5, s6, s7, s8):
        lines += f(res)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--out")
    args = parser.parse_args()
    res = json.loads(Path(args.results).read_text())
    text = render(res)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
