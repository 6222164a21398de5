"""The container image: its inputs checked by reading, then the image itself built and run.

constraints.txt must pin every runtime dependency (direct and transitive) at a version that
pyproject.toml allows, and the Dockerfile must build what the chart runs. The last tests run the
image built from this Dockerfile by scripts/build-image.sh (podman; marked ``pods``); the pod
tests in tests/pods run the same image in a real cluster.
"""

from __future__ import annotations

import json
import re
import tomllib
from importlib import metadata

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.chart._helm import CHART, ROOT
from tests.kube.images import Image, in_store, podman

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for raw in (ROOT / "constraints.txt").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert match, f"constraints.txt: {line!r} is not an exact name==version pin"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(match[2])
    return pins


def _runtime_requirements() -> list[Requirement]:
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]


def test_every_direct_dependency_is_pinned_within_its_range() -> None:
    pins = _pins()
    for req in _runtime_requirements():
        if req.marker is not None and not req.marker.evaluate({"sys_platform": "linux"}):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"constraints.txt does not pin {req.name} (pyproject dependency)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {name}=={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_every_transitive_dependency_is_pinned() -> None:
    """Walk the runtime closure as installed in this venv: each package in it has a pin."""
    pins = _pins()
    seen: set[str] = set()
    todo = _runtime_requirements()
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        assert name in pins, f"constraints.txt does not pin {name} (needed via the runtime deps)"
        todo.extend(Requirement(r) for r in metadata.requires(req.name) or [])
    stale = set(pins) - seen
    assert not stale, f"constraints.txt pins packages no runtime dependency needs: {sorted(stale)}"


def test_no_test_tools_in_the_image() -> None:
    pins = _pins()
    test_tools = PYPROJECT["project"]["optional-dependencies"]["test"]
    leaked = [r for r in test_tools if canonicalize_name(Requirement(r).name) in pins]
    assert not leaked, f"constraints.txt pins test-only packages: {leaked}"


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), by stage."""
    lines: list[str] = []
    current = ""
    for raw in DOCKERFILE.splitlines():
        stripped = raw.strip()
        if stripped.startswith("#") or not stripped:
            continue
        current += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current.strip())
            current = ""
    stages: list[list[str]] = [[]]
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_dockerfile_is_multi_stage_with_a_lean_non_root_runtime() -> None:
    preamble, builder, runtime = _stages()
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in preamble
    assert builder[0] == "FROM ${PYTHON_IMAGE} AS builder"
    assert runtime[0] == "FROM ${PYTHON_IMAGE}"

    build = " ".join(builder)
    assert "pip wheel" in build
    assert "-c constraints.txt" in build
    assert "--no-cache-dir" in build
    assert "/opt/venv" in build

    assert "COPY --from=builder /opt/venv /opt/venv" in runtime
    copies = [line for line in runtime if line.startswith("COPY")]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv"], "only the venv crosses over"
    run = " ".join(line for line in runtime if line.startswith("RUN"))
    for tool in ("apt-get", "apk", "gcc", "build-essential", "pip install", "make"):
        assert tool not in run, f"the runtime stage installs {tool}"
    assert "useradd --system --uid 10001 --gid 10001" in run
    assert "USER 10001:10001" in runtime
    assert 'ENTRYPOINT ["sideproxy"]' in runtime
    assert 'CMD ["serve"]' in runtime
    assert runtime.index("USER 10001:10001") > max(
        i for i, line in enumerate(runtime) if line.startswith(("RUN", "COPY"))
    )


def test_image_labels_and_version_match_the_chart() -> None:
    runtime = " ".join(_stages()[2])
    for label in ("title", "description", "version", "revision", "created", "licenses", "source"):
        assert f"org.opencontainers.image.{label}=" in runtime, label
    version = PYPROJECT["project"]["version"]
    assert f"ARG VERSION={version}" in runtime
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert chart["appVersion"] == version
    assert values["image"]["repository"] == "ghcr.io/side-proxy/sideproxy"
    assert values["image"]["tag"] == "", "the tag defaults to appVersion"
    assert f"ghcr.io/side-proxy/sideproxy:{version}" in DOCKERFILE


def test_dockerignore_is_an_allow_list_of_what_the_dockerfile_copies() -> None:
    entries = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert entries[0] == "*"
    allowed = {e[1:].rstrip("/") for e in entries if e.startswith("!")}
    copied = set()
    for line in _stages()[1]:
        if line.startswith("COPY ") and "--from" not in line:
            copied.update(line.split()[1:-1])
    assert copied == allowed, f"COPY {sorted(copied)} vs .dockerignore allows {sorted(allowed)}"
    assert "README.md" in allowed, "pyproject's readme is read at build time"


# ------------------------------------------------------------------------------------------------
# The built image, run: scripts/build-image.sh builds the Dockerfile above with podman (no Docker
# engine here); each check runs it with no network at all.


def _run(image: Image, *args: str, entrypoint: str | None = None) -> str:
    """``podman run`` the image as the chart does: read-only root (tmpfs /tmp), no network."""
    # Explicit rlimits: podman's defaults for root exceed what this machine (no
    # CAP_SYS_RESOURCE) lets runc set, and every run fails with "error setting rlimit".
    argv = ["run", "--rm", "--network=none", "--read-only", "--cap-drop=ALL",
            "--security-opt=no-new-privileges", "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024"]  # fmt: skip
    if entrypoint is not None:
        argv.append(f"--entrypoint={entrypoint}")
    proc = podman(*argv, in_store(image).ref, *args)
    assert proc.returncode == 0, f"podman run {' '.join(args)} failed:\n{proc.stderr}"
    return proc.stdout.strip()


def test_the_built_image_runs_sideproxy_as_10001_on_a_read_only_root(app_image: Image) -> None:
    version = PYPROJECT["project"]["version"]
    assert _run(app_image, "--version") == f"sideproxy {version}"  # the entrypoint is sideproxy
    assert _run(app_image, "-u", entrypoint="id") == "10001"
    assert _run(app_image, "-g", entrypoint="id") == "10001"
    # Everything both components import loads from the read-only root, and writes fail there:
    # only /tmp (the chart's emptyDir; a tmpfs here) is writable.
    probe = (
        "import sideproxy.proxy, sideproxy.operator, sideproxy.fake_provider, pathlib\n"
        "pathlib.Path('/tmp/ok').write_text('ok')\n"
        "try:\n"
        "    pathlib.Path('/opt/venv/x').write_text('no')\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    assert _run(app_image, "-c", probe, entrypoint="python") == "30"  # EROFS
    help_text = _run(app_image, "serve", "--help")
    assert "--pool" in help_text


def test_the_built_image_config_is_what_the_dockerfile_says(app_image: Image) -> None:
    proc = podman("image", "inspect", in_store(app_image).ref)
    assert proc.returncode == 0, proc.stderr
    config = json.loads(proc.stdout)[0]["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["sideproxy"]
    assert config["Cmd"] == ["serve"]
    assert config["WorkingDir"] == "/tmp"
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/venv/bin:")
    assert env["HOME"] == "/tmp"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == PYPROJECT["project"]["version"]
    assert labels["org.opencontainers.image.revision"] not in ("", "unknown")
