"""results.json -> small PNG plots (matplotlib, Agg): throughput/CPU, latency percentiles, streams.

python bench/plot.py bench/results/results.json --out bench/results/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ORDER = ["direct", "sideproxy", "nginx", "litellm", "bare", "transport", "raw"]
LABELS = {
    "direct": "direct",
    "sideproxy": "Side Proxy",
    "nginx": "nginx injector",
    "litellm": "LiteLLM",
    "bare": "bare aiohttp",
    "transport": "transport floor",
    "raw": "raw prototype",
}
COLORS = {
    "direct": "#9e9e9e",
    "sideproxy": "#1f77b4",
    "nginx": "#2ca02c",
    "litellm": "#d62728",
    "bare": "#ff7f0e",
    "transport": "#17becf",
    "raw": "#9467bd",
}
DPI = 90


def bar_labels(ax: Any, bars: Any, fmt: str) -> None:
    for b in bars:
        w = b.get_width()
        ax.text(w * 1.05, b.get_y() + b.get_height() / 2, fmt.format(w), va="center", fontsize=8)


def throughput(res: dict[str, Any], out: Path) -> Path | None:
    s = res["scenarios"].get("1_throughput")
    if not s or not s["results"]:
        return None
    r = {k: v["best"] for k, v in s["results"].items()}
    names = [n for n in ORDER if n in r]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 2.8))
    y = range(len(names))
    bars = a1.barh(y, [r[n]["ok_rps"] for n in names], color=[COLORS[n] for n in names])
    a1.set_xscale("log")
    a1.set_yticks(list(y), [LABELS[n] for n in names])
    a1.invert_yaxis()
    a1.set_xlabel("requests/s (log), higher is better")
    a1.set_title("Throughput, zero-latency upstream, c=64", fontsize=10)
    bar_labels(a1, bars, "{:,.0f}")
    a1.set_xlim(right=max(r[n]["ok_rps"] for n in names) * 8)
    cpu_names = [n for n in names if "cpu_us_per_req" in r[n]]
    y2 = range(len(cpu_names))
    bars = a2.barh(
        y2, [r[n]["cpu_us_per_req"] for n in cpu_names], color=[COLORS[n] for n in cpu_names]
    )
    a2.set_xscale("log")
    a2.set_yticks(list(y2), [LABELS[n] for n in cpu_names])
    a2.invert_yaxis()
    a2.axvline(110, color="k", ls="--", lw=0.8)
    a2.text(118, len(cpu_names) - 0.7, "target 110 µs", fontsize=7)
    a2.set_xlabel("CPU µs per request (log), lower is better")
    a2.set_title("Proxy CPU per request (1 core)", fontsize=10)
    bar_labels(a2, bars, "{:,.0f}")
    a2.set_xlim(right=max(r[n]["cpu_us_per_req"] for n in cpu_names) * 8)
    fig.tight_layout()
    path = out / "throughput.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def latency(res: dict[str, Any], out: Path) -> Path | None:
    s = res["scenarios"].get("2_latency")
    if not s or not s["results"]:
        return None
    r = s["results"]
    names = [n for n in ORDER if n in r]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.0), sharey=True)
    pcts = ["p50", "p90", "p99"]
    for ax, c in zip(axes, ("1", "16", "64"), strict=True):
        for n in names:
            if c not in r[n]:
                continue
            vals = [r[n][c][f"{p}_us"] / 1e3 for p in pcts]
            ax.plot(pcts, vals, marker="o", label=LABELS[n], color=COLORS[n],
                    ls="--" if n == "direct" else "-")  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"{c} connection{'s' if c != '1' else ''}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency ms (log), 20 ms upstream")
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Latency percentiles, closed-loop wrk, 20 ms upstream", fontsize=10)
    fig.tight_layout()
    path = out / "latency.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def streaming(res: dict[str, Any], out: Path) -> Path | None:
    s = res["scenarios"].get("3_streaming")
    if not s or not s["results"]:
        return None
    r = s["results"]
    names = [n for n in ORDER if n in r]
    fig, ax = plt.subplots(figsize=(6, 2.6))
    width = 0.2
    kinds = [("ttfb_ms", "p50", "TTFB p50"), ("ttfb_ms", "p99", "TTFB p99"),
             ("ttlb_ms", "p50", "TTLB p50"), ("ttlb_ms", "p99", "TTLB p99")]  # fmt: skip
    for i, n in enumerate(names):
        vals = [r[n][k][p] for k, p, _ in kinds]
        ax.bar([j + (i - len(names) / 2 + 0.5) * width for j in range(len(kinds))], vals,
               width, label=LABELS[n], color=COLORS[n])  # fmt: skip
    ax.set_xticks(range(len(kinds)), [t for _, _, t in kinds])
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Streams: 20 chunks 5 ms apart, concurrency 8", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "streaming.png"
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("results")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    res = json.loads(Path(args.results).read_text())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for f in (throughput, latency, streaming):
        path = f(res, out)
        if path:
            print(f"{path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
