"""The operator's public surface: one function, with the signature the CLI calls."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import sideproxy.operator
from sideproxy.operator import run


def test_public_names() -> None:
    assert sideproxy.operator.__all__ == ["run"]


def test_run_signature() -> None:
    signature = inspect.signature(run)
    assert list(signature.parameters) == ["namespaces", "liveness", "kubeconfig"]
    assert signature.return_annotation in (int, "int")


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sideproxy.operator", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    for flag in ("--namespace", "--liveness", "--kubeconfig"):
        assert flag in out


def test_unreachable_cluster_fails_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-kubeconfig"
    result = subprocess.run(
        [sys.executable, "-m", "sideproxy.operator", "-n", "x", "--kubeconfig", str(missing)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
