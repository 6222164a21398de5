"""The container images of the pod tests, built by the project's scripts (cached outside the repo).

- :func:`build_app_image`: ``scripts/build-image.sh``, the Dockerfile built with podman on a local
  Python 3.11 base (~3 min cold, a few stats when the tree is unchanged).
- :func:`build_pause_image`: ``scripts/build-pause.sh``, the pod sandbox image (a static C binary).
- :func:`podman`: podman on the build script's private storage, for running the built image
  without a network (``--network=none``), so nothing touches the host's network.

Plain library (no pytest), like :mod:`tests.kube.harness`.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.kube.harness import REPO_ROOT, HarnessError

__all__ = ["Image", "build_app_image", "build_pause_image", "image_cache", "podman"]

IMAGE_SCRIPT = REPO_ROOT / "scripts" / "build-image.sh"
PAUSE_SCRIPT = REPO_ROOT / "scripts" / "build-pause.sh"
BUILD_TIMEOUT = 30 * 60.0


@dataclass(frozen=True)
class Image:
    """A built image: its reference (``localhost/name:tag``) and its docker-archive."""

    ref: str
    archive: Path

    @property
    def repository(self) -> str:
        return self.ref.rpartition(":")[0]

    @property
    def tag(self) -> str:
        return self.ref.rpartition(":")[2]


def image_cache() -> Path:
    return Path(
        os.environ.get("SIDEPROXY_IMAGE_CACHE") or Path.home() / ".cache" / "sideproxy-image"
    )


def _run_script(script: Path, timeout: float) -> Image:
    proc = subprocess.run(
        ["bash", str(script)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or len(lines) < 2 or not Path(lines[-1]).is_file():
        tail = "\n".join(proc.stderr.splitlines()[-60:])
        raise HarnessError(f"{script} failed (exit {proc.returncode}):\n{tail}")
    return Image(ref=lines[-2], archive=Path(lines[-1]))


def build_app_image(timeout: float = BUILD_TIMEOUT) -> Image:
    """The Side Proxy image of this tree (``localhost/sideproxy:<hash of the inputs>``)."""
    return _run_script(IMAGE_SCRIPT, timeout)


def in_store(image: Image) -> Image:
    """The image, present in the podman store: loaded back from its archive when another build
    sharing the cache pruned it (each build keeps only its own tag in the store)."""
    if podman("image", "exists", image.ref).returncode != 0:
        loaded = podman("load", "-i", str(image.archive))
        if loaded.returncode != 0:
            raise HarnessError(f"podman load {image.archive} failed:\n{loaded.stderr}")
        podman("tag", _loaded_ref(loaded.stdout), image.ref)
    return image


def _loaded_ref(output: str) -> str:
    """The reference ``podman load`` printed ("Loaded image: <ref>" or "...(s): <ref>")."""
    return output.strip().splitlines()[-1].rpartition(": ")[2].strip()


def build_pause_image(timeout: float = 600.0) -> Image:
    return _run_script(PAUSE_SCRIPT, timeout)


def podman(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """podman with the storage, cgroup manager and runtime of scripts/build-image.sh."""
    store = image_cache() / "podman"
    argv = [
        "podman", "--root", str(store / "storage"), "--runroot", str(store / "run"),
        "--storage-driver", "overlay", "--cgroup-manager", "cgroupfs",
        "--events-backend", "file", "--runtime", "runc", *args,
    ]  # fmt: skip
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
        check=False,
    )
