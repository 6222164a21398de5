"""A throw-away Kubernetes control plane for tests: etcd, kube-apiserver, kube-controller-manager.

No kubelet, no scheduler, no container runtime: Pods are accepted but never run. What works is
the API itself (CRDs, status subresources, watches, RBAC, TokenRequest, server-side apply), plus
the two controllers that operators lean on: ownerReference garbage collection and namespace
deletion. Binaries come from ``scripts/build-k8s.sh`` (cached, versions pinned in
``scripts/k8s-versions.env``); everything else lives in one temp dir removed on ``stop()``.

This module is a plain library (no pytest) so scripts and other harnesses can use it too::

    with KubeCluster(build_binaries()) as kube:
        kube.kubectl("get", "namespaces")
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

__all__ = [
    "BUILD_SCRIPT",
    "VERSIONS_FILE",
    "CommandError",
    "HarnessError",
    "KubeCluster",
    "build_binaries",
    "cached_bin_dir",
    "free_port",
    "read_versions",
    "wait_for",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build-k8s.sh"
VERSIONS_FILE = REPO_ROOT / "scripts" / "k8s-versions.env"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")

# Generous for 2 cores: a cold apiserver runs its RBAC bootstrap before /readyz turns green.
# Only what operators lean on: ownerReference GC, namespace cleanup, and filling in the
# aggregated admin/edit/view ClusterRoles (without it, binding `view` grants nothing).
CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "clusterrole-aggregation-controller",
)
START_TIMEOUT = float(os.environ.get("SIDEPROXY_KUBE_START_TIMEOUT", "120"))
BUILD_TIMEOUT = 90 * 60.0
LOG_TAIL_LINES = 40

T = TypeVar("T")


class HarnessError(RuntimeError):
    """The control plane could not be built, started or reached; the message carries log tails."""


class CommandError(subprocess.CalledProcessError):
    """A kubectl/helm call failed. Unlike CalledProcessError, str() shows the command's stderr."""

    def __str__(self) -> str:
        return f"{super().__str__()}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


# --------------------------------------------------------------------------------------------
# Versions and binaries


def read_versions(path: Path = VERSIONS_FILE) -> dict[str, str]:
    """Parse the ``KEY=value`` lines of k8s-versions.env, the file build-k8s.sh sources."""
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip().strip("\"'")
    return versions


def _cache_root() -> Path:
    # `or`, not a default: the shell script's ${VAR:-...} also treats an empty value as unset.
    return Path(os.environ.get("SIDEPROXY_K8S_CACHE") or Path.home() / ".cache" / "sideproxy-k8s")


def cached_bin_dir(versions: Mapping[str, str] | None = None) -> Path:
    """Where build-k8s.sh puts (or has put) the binaries for the pinned versions."""
    v = versions if versions is not None else read_versions()
    key = f"k8s-{v['K8S_VERSION']}_etcd-{v['ETCD_VERSION']}_helm-{v['HELM_VERSION']}"
    return _cache_root() / key / "bin"


def binaries_cached(bin_dir: Path | None = None) -> bool:
    d = bin_dir if bin_dir is not None else cached_bin_dir()
    return all(os.access(d / name, os.X_OK) for name in BINARIES)


def build_binaries(timeout: float = BUILD_TIMEOUT) -> Path:
    """Run build-k8s.sh (milliseconds when cached, ~11 min cold on 2 cores) and return its bin dir.

    ``SIDEPROXY_K8S_BIN_DIR`` short-circuits the build with a dir holding the five binaries.
    Raises HarnessError with the build log's tail when anything is missing or the build fails.
    """
    override = os.environ.get("SIDEPROXY_K8S_BIN_DIR")
    if override:
        bin_dir = Path(override)
        if not binaries_cached(bin_dir):
            missing = [b for b in BINARIES if not os.access(bin_dir / b, os.X_OK)]
            raise HarnessError(f"SIDEPROXY_K8S_BIN_DIR={bin_dir} lacks {', '.join(missing)}")
        return bin_dir

    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    fd, log_name = tempfile.mkstemp(prefix="build-", suffix=".log", dir=root)
    log = Path(log_name)
    with os.fdopen(fd, "w") as err:
        try:
            proc = subprocess.run(
                ["bash", str(BUILD_SCRIPT)],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{BUILD_SCRIPT} did not finish in {timeout:.0f}s; log {log}:\n{_tail(log)}"
            ) from None
    lines = proc.stdout.strip().splitlines()
    bin_dir = Path(lines[-1]) if lines else Path()
    if proc.returncode != 0 or not lines or not binaries_cached(bin_dir):
        raise HarnessError(
            f"{BUILD_SCRIPT} failed (exit {proc.returncode}); log {log}:\n{_tail(log, 80)}"
        )
    log.unlink()
    return bin_dir


# --------------------------------------------------------------------------------------------
# Small helpers


def wait_for(
    predicate: Callable[[], T],
    timeout: float = 30.0,
    interval: float = 0.2,
    *,
    message: str = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``predicate`` until it returns something truthy and return that value.

    Exceptions listed in ``ignore`` count as "not yet" (e.g. ``CommandError`` while the API
    server restarts); the last one is chained to the TimeoutError.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except ignore as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}") from last_exc
        time.sleep(interval)


def free_port() -> int:
    """A loopback port that is free right now (callers retry if another process wins it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"<{path}: {exc}>"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if pytest is SIGKILLed, the kernel kills the
    # control plane too instead of leaving etcd and the apiserver orphaned on their ports.
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_WORKDIR_PREFIX = "sideproxy-kube-"
_OWNER_FILE = "owner.pid"
_KEEP_FILE = "KEEP"


def _reap_stale_workdirs() -> None:
    """Remove temp dirs of earlier runs that were SIGKILLed before their teardown ran."""
    for d in Path(tempfile.gettempdir()).glob(f"{_WORKDIR_PREFIX}*"):
        if (d / _KEEP_FILE).exists():
            continue
        try:
            pid = int((d / _OWNER_FILE).read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (OSError, ValueError):
            continue  # not ours to judge (no pid file yet, or someone else's process)


@dataclass
class _Process:
    """One control-plane binary in its own process group, logging to a file."""

    name: str
    argv: list[str]
    log: Path
    env: Mapping[str, str]
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"\n===== {time.strftime('%H:%M:%S')} starting {self.name}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(self.env),
                start_new_session=True,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads run at start-up
            )

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, grace: float = 10.0, first_signal: signal.Signals = signal.SIGTERM) -> None:
        proc, self.popen = self.popen, None
        if proc is None:
            return
        # start_new_session made the child a group leader: kill the group, not just the pid.
        for sig, wait in ((first_signal, grace), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers in the group, if any

    def tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return _tail(self.log, lines)

    def port_clash(self) -> bool:
        return "address already in use" in self.tail(200)


def _read_url(url: str, context: ssl.SSLContext | None = None) -> bytes:
    """GET ``url`` (2 s timeout); HTTP errors raise ``HTTPError`` like urlopen."""
    with urllib.request.urlopen(url, timeout=2, context=context) as r:
        body: bytes = r.read()
        return body


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise HarnessError(f"openssl {' '.join(args)} failed:\n{proc.stderr}")


@dataclass(frozen=True)
class _Pki:
    ca_crt: Path
    serving_crt: Path
    serving_key: Path
    admin_crt: Path
    admin_key: Path
    sa_key: Path


def _make_pki(d: Path) -> _Pki:
    """A one-day CA, an apiserver serving cert, an admin client cert and a SA signing key."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
        "-subj", "/CN=sideproxy-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        cwd=d,
    )  # fmt: skip

    def leaf(name: str, subject: str, extensions: str) -> None:
        (d / f"{name}.ext").write_text(extensions)
        _openssl("req", "-new", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=d)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "1",
            "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=d,
        )  # fmt: skip

    leaf(
        "serving",
        "/CN=kube-apiserver",
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,"
        "DNS:kubernetes.default.svc,IP:10.96.0.1\n",
    )
    # O=system:masters is bound to cluster-admin by the apiserver's RBAC bootstrap.
    leaf(
        "admin",
        "/O=system:masters/CN=admin",
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=clientAuth\n",
    )
    # RSA: the one key type every TokenRequest consumer verifies (RS256).
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
             "-out", "sa.key", cwd=d)  # fmt: skip
    return _Pki(
        ca_crt=d / "ca.crt",
        serving_crt=d / "serving.crt",
        serving_key=d / "serving.key",
        admin_crt=d / "admin.crt",
        admin_key=d / "admin.key",
        sa_key=d / "sa.key",
    )


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _kubeconfig(server: str, ca: Path, user: Mapping[str, str], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "sideproxy-test",
             "cluster": {"server": server, "certificate-authority-data": _b64(ca)}},
        ],
        "users": [{"name": name, "user": dict(user)}],
        "contexts": [{"name": name, "context": {"cluster": "sideproxy-test", "user": name}}],
        "current-context": name,
    }  # fmt: skip


def _write_private(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


# --------------------------------------------------------------------------------------------
# The cluster


Manifest = str | Mapping[str, Any] | Sequence[Mapping[str, Any]]


class KubeCluster:
    """etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, torn down by ``stop()``.

    Admin access is a client certificate in ``system:masters``; ``kubeconfig`` points at it.
    The controller-manager runs only ``CONTROLLERS``. Not running: scheduler, kubelet and every
    controller that needs them, nor the service-account controllers (namespaces get no
    ``default`` ServiceAccount; the ServiceAccount admission plugin is off so Pods are still
    accepted, and stay Pending forever).
    """

    def __init__(self, bin_dir: Path, workdir: Path | None = None) -> None:
        self.bin_dir = Path(bin_dir)
        self.versions = read_versions()
        self._own_workdir = workdir is None
        if workdir is None:
            _reap_stale_workdirs()
            workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
            (workdir / _OWNER_FILE).write_text(str(os.getpid()))
        self.workdir = Path(workdir)
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.apiserver_port = 0
        self._etcd_url = ""
        self._etcd: _Process | None = None
        self._apiserver: _Process | None = None
        self._controller_manager: _Process | None = None
        self._pki: _Pki | None = None
        self._stopped = False
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "HELM_"))}
        no_proxy = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1,localhost"]))
        self._env: dict[str, str] = {
            **env,
            "NO_PROXY": no_proxy,
            "no_proxy": no_proxy,
            # Nothing may write to ~: kubectl's discovery cache and helm's three homes.
            "KUBECONFIG": str(self.kubeconfig),
            "KUBECACHEDIR": str(self.workdir / "kubectl-cache"),
            "HELM_CACHE_HOME": str(self.workdir / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(self.workdir / "helm" / "config"),
            "HELM_DATA_HOME": str(self.workdir / "helm" / "data"),
        }

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for child processes (an operator under test, a script): KUBECONFIG is
        the admin kubeconfig, helm/kubectl caches live in the temp dir, loopback bypasses proxies.
        """
        return dict(self._env)

    @property
    def logs(self) -> dict[str, Path]:
        return {p.name: p.log for p in self._processes()}

    def __enter__(self) -> KubeCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Generate PKI, then start etcd, the apiserver (waits for /readyz) and the KCM."""
        atexit.register(self.stop)  # backstop if the caller never reaches its teardown
        try:
            self._pki = _make_pki(self.workdir / "pki")
            self._start_etcd()
            self._start_apiserver_fresh()
            self._start_controller_manager()
        except BaseException:
            self.stop(keep_workdir=True)
            raise

    def stop(self, *, keep_workdir: bool = False) -> None:
        """Kill every process group; remove the temp dir unless asked (or SIDEPROXY_KUBE_KEEP)."""
        for proc in (self._controller_manager, self._apiserver, self._etcd):
            if proc is not None:
                proc.stop()
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        keep = keep_workdir or bool(os.environ.get("SIDEPROXY_KUBE_KEEP"))
        if not self._own_workdir:
            return
        if keep:
            (self.workdir / _KEEP_FILE).touch()  # kept on purpose: never reaped
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def stop_apiserver(self, *, crash: bool = False) -> None:
        """Stop only kube-apiserver; etcd and its data stay, so start_apiserver() resumes.

        By default a graceful SIGTERM (open watches end, ~1 s); ``crash=True`` SIGKILLs it, so
        clients see connections drop mid-flight.
        """
        if self._apiserver is not None:
            self._apiserver.stop(
                grace=0.0 if crash else 10.0,
                first_signal=(signal.SIGKILL if crash else signal.SIGTERM),
            )

    def start_apiserver(self, timeout: float = START_TIMEOUT) -> None:
        """(Re)start kube-apiserver on the same port against the same etcd; waits for /readyz."""
        proc = self._require(self._apiserver, "kube-apiserver")
        restarted = not proc.alive()
        if restarted:
            proc.start()
            self._wait_ready(proc, timeout)
        manager = self._controller_manager
        if manager is not None and (restarted or not manager.alive()):
            # A fresh controller-manager too: after losing the API server its garbage collector
            # can stay stalled on a stale graph (seen in CI: nothing collected within 60 s), and
            # a test that needs GC must not depend on how an earlier test's outage went.
            if manager.alive():
                manager.stop(grace=5.0)
            manager.start()

    @contextlib.contextmanager
    def apiserver_down(self, *, crash: bool = False) -> Iterator[None]:
        """``with kube.apiserver_down(): ...`` runs the block with the API server stopped."""
        self.stop_apiserver(crash=crash)
        try:
            yield
        finally:
            self.start_apiserver()

    def ensure_running(self) -> None:
        """Bring back a stopped apiserver or controller-manager (e.g. after a failed test)."""
        etcd = self._require(self._etcd, "etcd")
        if not etcd.alive():
            raise HarnessError(f"etcd died; its log:\n{etcd.tail()}")
        self.start_apiserver()

    def log_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines of every process log, for failure reports."""
        parts = []
        for proc in self._processes():
            state = "running" if proc.alive() else "stopped"
            parts.append(f"----- {proc.name} ({state}) {proc.log}\n{proc.tail(lines)}")
        return "\n".join(parts)

    # -- clients ------------------------------------------------------------------------------

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | str | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster (admin unless ``kubeconfig`` is given)."""
        cfg = str(kubeconfig or self.kubeconfig)
        argv = [str(self.bin_dir / "kubectl"), f"--kubeconfig={cfg}", *args]
        return self._run(argv, input=input, check=check, timeout=timeout)

    def helm(
        self,
        *args: str,
        kubeconfig: Path | str | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned helm against this cluster, with its cache/config/data in the temp dir."""
        cfg = str(kubeconfig or self.kubeconfig)
        argv = [str(self.bin_dir / "helm"), f"--kubeconfig={cfg}", *args]
        return self._run(argv, input=input, check=check, timeout=timeout)

    def apply(
        self,
        manifest: Manifest,
        namespace: str | None = None,
        *,
        server_side: bool = False,
        kubeconfig: Path | str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl apply`` YAML text, one object (dict) or a list of objects."""
        if isinstance(manifest, str):
            text = manifest
        elif isinstance(manifest, Mapping):
            text = yaml.safe_dump(dict(manifest), sort_keys=False)
        else:
            text = yaml.safe_dump_all([dict(m) for m in manifest], sort_keys=False)
        args = ["apply", "-f", "-"]
        if namespace:
            args += ["-n", namespace]
        if server_side:
            args += ["--server-side", "--force-conflicts", "--field-manager=sideproxy-tests"]
        return self.kubectl(*args, input=text, kubeconfig=kubeconfig)

    def create_namespace(self, name: str | None = None) -> str:
        """Create (or keep) a namespace and return its name; a random ``t-xxxxxxxx`` by default."""
        name = name or f"t-{uuid.uuid4().hex[:8]}"
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        return name

    def delete_namespace(self, name: str, *, wait: bool = False) -> None:
        self.kubectl(
            "delete", "namespace", name, "--ignore-not-found", f"--wait={str(wait).lower()}"
        )

    def service_account_kubeconfig(
        self, namespace: str, name: str, *, duration: str = "1h"
    ) -> Path:
        """A kubeconfig holding only a TokenRequest token for ``namespace/name`` (SA created if
        missing). Its RBAC is whatever the test grants; by default it can do almost nothing."""
        self.apply(
            {"apiVersion": "v1", "kind": "ServiceAccount",
             "metadata": {"name": name, "namespace": namespace}},
        )  # fmt: skip
        token = self.kubectl(
            "create", "token", name, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        user = f"system:serviceaccount:{namespace}:{name}"
        config = _kubeconfig(self.server, self._pki_or_fail().ca_crt, {"token": token}, user)
        path = self.workdir / "kubeconfigs" / f"sa-{namespace}-{name}.yaml"
        return _write_private(path, yaml.safe_dump(config))

    def api_client(self, kubeconfig: Path | str | None = None) -> k8s_client.ApiClient:
        """An official sync ``kubernetes`` ApiClient for this cluster (admin by default)."""
        cfg = str(kubeconfig or self.kubeconfig)
        api: k8s_client.ApiClient = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=cfg
        )
        return api

    def wait_for(
        self,
        predicate: Callable[[], T],
        timeout: float = 30.0,
        interval: float = 0.2,
        *,
        message: str = "",
        ignore: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Same as the module-level :func:`wait_for`."""
        return wait_for(predicate, timeout, interval, message=message, ignore=ignore)

    # -- internals ----------------------------------------------------------------------------

    def _processes(self) -> list[_Process]:
        procs = (self._etcd, self._apiserver, self._controller_manager)
        return [p for p in procs if p is not None]

    @staticmethod
    def _require(proc: _Process | None, name: str) -> _Process:
        if proc is None:
            raise HarnessError(f"{name} was never started; call start() first")
        return proc

    def _pki_or_fail(self) -> _Pki:
        if self._pki is None:
            raise HarnessError("cluster not started")
        return self._pki

    def _command(self, argv: list[str]) -> list[str]:
        """How every daemon and client command runs; a subclass may wrap it (e.g. nsenter)."""
        return argv

    def _in_net(self, call: Callable[[], T]) -> T:
        """Run ``call`` (a health check) where the daemons' network is; a subclass may move it."""
        return call()

    def _run(
        self, argv: list[str], *, input: str | None, check: bool, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self._command(argv),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            env=self._env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, argv, proc.stdout, proc.stderr)
        return proc

    def _bin(self, name: str) -> str:
        path = self.bin_dir / name
        if not os.access(path, os.X_OK):
            raise HarnessError(f"{path} is missing; run {BUILD_SCRIPT}")
        return str(path)

    def _start_with_free_ports(
        self, make: Callable[[], _Process], ready: Callable[[_Process], None], attempts: int = 3
    ) -> _Process:
        """Ports are picked free but not reserved; if another run grabs one first, pick again."""
        for attempt in range(attempts):
            proc = make()
            proc.start()
            try:
                ready(proc)
                return proc
            except HarnessError:
                proc.stop()
                if attempt + 1 == attempts or not proc.port_clash():
                    raise
        raise AssertionError("unreachable")

    def _start_etcd(self) -> None:
        data = self.workdir / "etcd"

        def make() -> _Process:
            shutil.rmtree(data, ignore_errors=True)
            client, peer = f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"
            self._etcd_url = client
            argv = [
                self._bin("etcd"),
                "--name=default",
                f"--data-dir={data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=default={peer}",
                "--unsafe-no-fsync",  # a test cluster's data need not survive a power cut
                "--log-level=warn",
            ]
            return _Process("etcd", self._command(argv), self.workdir / "etcd.log", self._env)

        def ready(proc: _Process) -> None:
            def healthy() -> bool:
                if not proc.alive():
                    raise HarnessError(f"etcd exited at start-up; its log:\n{proc.tail()}")
                try:
                    body = self._in_net(lambda: _read_url(f"{self._etcd_url}/health"))
                except OSError:
                    return False
                return b'"true"' in body

            try:
                wait_for(healthy, START_TIMEOUT, 0.1, message="etcd /health")
            except TimeoutError as exc:
                raise HarnessError(f"{exc}; etcd log:\n{proc.tail()}") from None

        self._etcd = self._start_with_free_ports(make, ready)

    def _start_apiserver_fresh(self) -> None:
        pki = self._pki_or_fail()

        def make() -> _Process:
            self.apiserver_port = free_port()
            user = {"client-certificate-data": _b64(pki.admin_crt),
                    "client-key-data": _b64(pki.admin_key)}  # fmt: skip
            config = _kubeconfig(self.server, pki.ca_crt, user, "admin")
            _write_private(self.kubeconfig, yaml.safe_dump(config))
            argv = self._apiserver_argv(pki)
            return _Process(
                "kube-apiserver",
                self._command(argv),
                self.workdir / "kube-apiserver.log",
                self._env,
            )

        self._apiserver = self._start_with_free_ports(
            make, lambda proc: self._wait_ready(proc, START_TIMEOUT)
        )

    def _apiserver_argv(self, pki: _Pki) -> list[str]:
        """kube-apiserver's command line; a subclass may edit it (e.g. a node that runs pods)."""
        return [
            self._bin("kube-apiserver"),
            f"--etcd-servers={self._etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--tls-cert-file={pki.serving_crt}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca_crt}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_key}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--service-cluster-ip-range=10.96.0.0/16",
            # Its job (mounting the default SA token) needs the SA controllers we don't run.
            "--disable-admission-plugins=ServiceAccount",
            # Its Endpoints would be 127.0.0.1, which validation rejects every 10 s in the log.
            "--endpoint-reconciler-type=none",
            # Without a bound, SIGTERM waits forever for the controller-manager's watches.
            "--shutdown-watch-termination-grace-period=1s",
            "--profiling=false",
        ]

    def _wait_ready(self, proc: _Process, timeout: float) -> None:
        pki = self._pki_or_fail()
        ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
        ctx.load_cert_chain(str(pki.admin_crt), str(pki.admin_key))
        last: list[str] = []

        def ready() -> bool:
            if not proc.alive():
                raise HarnessError(f"{proc.name} exited at start-up; its log:\n{proc.tail()}")
            try:
                self._in_net(lambda: _read_url(f"{self.server}/readyz", ctx))
                return True
            except urllib.error.HTTPError as exc:  # 500 lists the checks still failing
                last[:] = [exc.read().decode(errors="replace")]
                return False
            except OSError as exc:
                last[:] = [str(exc)]
                return False

        try:
            wait_for(ready, timeout, 0.25, message=f"{self.server}/readyz")
        except TimeoutError as exc:
            detail = last[0] if last else ""
            raise HarnessError(
                f"{exc}\nlast answer: {detail}\n{proc.name} log:\n{proc.tail()}"
            ) from None

    def _controller_manager_argv(self) -> list[str]:
        """kube-controller-manager's command line; a subclass may edit it."""
        return [
            self._bin("kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            f"--controllers={','.join(CONTROLLERS)}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",  # no metrics/healthz server: nothing to collide with
            "--profiling=false",
        ]

    def _start_controller_manager(self) -> None:
        argv = self._command(self._controller_manager_argv())
        proc = _Process(
            "kube-controller-manager", argv, self.workdir / "kube-controller-manager.log", self._env
        )
        proc.start()
        self._controller_manager = proc
        # It has no health endpoint with --secure-port=0; catch flag errors, which exit at once.
        time.sleep(1.0)
        if not proc.alive():
            raise HarnessError(f"kube-controller-manager exited at start-up:\n{proc.tail()}")
