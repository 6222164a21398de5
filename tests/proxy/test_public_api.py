"""The proxy's public surface is what its docstring documents and what its users import.

Not a copy of ``__all__`` (a test that restates a list passes whatever the list says): the
surface must match the module docstring, which is what a reader sees, and every name the rest
of the repository imports from ``sideproxy.proxy`` must be in it.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import sideproxy.proxy

ROOT = Path(__file__).resolve().parents[2]


def _documented() -> set[str]:
    doc = sideproxy.proxy.__doc__ or ""
    surface = doc.split("::", 1)[1].split("\n\n", 2)[1]  # the indented block after "::"
    return set(re.findall(r"\b([A-Za-z_][A-Za-z0-9_]*)\b(?=[(,\s]|$)", surface)) & set(
        dir(sideproxy.proxy)
    )


def _imported_elsewhere() -> set[str]:
    names: set[str] = set()
    for folder in ("sideproxy", "tests", "bench", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "sideproxy.proxy":
                    names.update(alias.name for alias in node.names)
    # ``from sideproxy.proxy import kube`` imports a public submodule, not a name.
    return {n for n in names if importlib.util.find_spec(f"sideproxy.proxy.{n}") is None}


def test_every_public_name_is_documented_in_the_module_docstring() -> None:
    assert set(sideproxy.proxy.__all__) - _documented() == set()


def test_every_documented_name_is_public() -> None:
    assert _documented() <= set(sideproxy.proxy.__all__)


def test_the_repository_imports_only_public_names() -> None:
    assert _imported_elsewhere() <= set(sideproxy.proxy.__all__)


def test_every_public_name_resolves() -> None:
    for name in sideproxy.proxy.__all__:
        assert getattr(sideproxy.proxy, name) is not None, name
