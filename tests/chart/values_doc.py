"""The values table of docs/helm.md, generated from the ``# --`` comments of values.yaml.

    python -m tests.chart.values_doc           print the table
    python -m tests.chart.values_doc --write   replace it in docs/helm.md (between the markers)

tests/chart/test_render.py fails when docs/helm.md's table differs from this output.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "helm" / "sideproxy" / "values.yaml"
DOC = ROOT / "docs" / "helm.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"


def rows(text: str) -> list[tuple[str, Any, str]]:
    """(dotted path, default, description) of every ``# --``-documented key, in file order."""
    lines = text.splitlines()
    values = yaml.safe_load(text)
    stack: list[tuple[int, str]] = []
    found: list[tuple[str, Any, str]] = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][\w./-]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        block: list[str] = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.insert(0, lines[j].strip())
            j -= 1
        starts = [n for n, comment in enumerate(block) if comment.startswith("# --")]
        if not starts:
            continue
        words = " ".join(c.lstrip("#").strip() for c in block[starts[-1] :])
        node = values
        for _, key in stack:
            node = node[key]
        found.append((".".join(k for _, k in stack), node, words.removeprefix("-- ").strip()))
    return found


def table(text: str) -> str:
    out = ["| Value | Default | Description |", "| --- | --- | --- |"]
    for path, default, description in rows(text):
        shown = json.dumps(default).replace("|", "\\|")
        text = description.replace("|", "\\|")
        out.append(f"| `{path}` | `{shown}` | {text} |")
    return "\n".join(out) + "\n"


def documented(doc: str) -> str:
    """The table currently in docs/helm.md."""
    return doc.split(START, 1)[1].split(END, 1)[0].strip("\n") + "\n"


def main(argv: list[str]) -> int:
    generated = table(VALUES.read_text())
    if argv == ["--write"]:
        doc = DOC.read_text()
        head, rest = doc.split(START, 1)
        tail = rest.split(END, 1)[1]
        DOC.write_text(f"{head}{START}\n{generated}{END}{tail}")
        return 0
    if argv:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(generated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
