"""A one-node Kubernetes cluster that runs real pods, inside a network namespace of its own.

:class:`PodCluster` is a :class:`~tests.kube.harness.KubeCluster` (etcd, kube-apiserver,
kube-controller-manager) plus containerd + runc (Debian's packages), the CNI bridge plugin,
kube-scheduler, kube-proxy (iptables mode) and kubelet. Every daemon, kubectl, helm and every test
client runs under ``nsenter --net=/run/netns/<name>``: the namespace has only ``lo`` and the pod
bridge, and no route out, so pods, Services and clients reach only each other and nothing the
cluster does touches the host's network or iptables. (``nsenter``, not ``ip netns exec``: the
latter also gives the process a mount namespace of its own and remounts ``/sys``, which breaks
kubelet's cgroup discovery and hides its volume mounts from containerd.)

Host state the node needs, all created here and removed by :meth:`PodCluster.stop` (and, after a
run that was SIGKILLed, by the next run's start):

- the network namespace ``sideproxy-<id>``;
- cgroups ``/sideproxy-<id>`` in each cgroup v1 hierarchy (kubelet's ``cgroupRoot``), so the
  teardown can kill exactly this run's containers;
- a shared bind mount of the kubelet's root dir (see ``_start_kubelet``) and the mounts kubelet
  and containerd make under the work dir.

Kernel tunables: kubelet sets ``vm.overcommit_memory``, ``kernel.panic`` and friends on the host
unless ``protectKernelDefaults``. It runs with that on, in a mount namespace where those six
``/proc/sys`` files are bind-mounted copies holding the values it wants, so it changes nothing.

Facts this relies on, found by trying on the CI machine kind (Debian 12, hybrid cgroup v1, no
CAP_SYS_RESOURCE): containerd needs ``restrict_oom_score_adj`` (the kernel refuses a negative
``oom_score_adj``) and ``netns_mounts_under_state_dir``; kubelet 1.36 needs ``failCgroupV1:
false`` and ``cgroupDriver: cgroupfs``; the API server needs
``--kubelet-preferred-address-types=InternalIP``. There is no cluster DNS: use ClusterIPs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tests.kube.harness import (
    REPO_ROOT,
    HarnessError,
    KubeCluster,
    _Pki,
    _Process,
    wait_for,
)
from tests.kube.images import Image

__all__ = ["NODE_BINARIES", "NODE_IP", "NODE_NAME", "NODE_PACKAGES", "PodCluster", "in_netns"]

NODE_BINARIES = ("kube-scheduler", "kube-proxy", "kubelet")
# Debian packages the node needs; scripts/ensure-packages.sh installs the missing ones.
NODE_PACKAGES = (
    "containerd", "runc", "containernetworking-plugins", "iptables", "conntrack", "iproute2",
    "util-linux", "mount",
)  # fmt: skip
ENSURE_PACKAGES = REPO_ROOT / "scripts" / "ensure-packages.sh"
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins
NODE_NAME = "sideproxy-node"
BRIDGE = "cni0"
POD_CIDR = "10.244.0.0/24"
NODE_IP = "10.244.0.1"  # the bridge's address: the node's InternalIP and the API's endpoint
SERVICE_CIDR = "10.96.0.0/16"
START_TIMEOUT = float(os.environ.get("SIDEPROXY_NODE_START_TIMEOUT", "180"))

_PREFIX = "sideproxy-node-"
_OWNER_FILE = "owner.pid"
_NETNS_FILE = "netns"
_CLONE_NEWNET = 0x40000000
_MNT_DETACH = 2

# What kubelet wants these to be (pkg/util/sysctl); it only checks them (protectKernelDefaults).
_KERNEL_TUNABLES = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _check_errno(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def in_netns(path: Path, call: Callable[[], T]) -> T:
    """Run ``call`` in a fresh thread that has joined the network namespace at ``path``.

    setns(CLONE_NEWNET) moves only the calling thread, and the thread ends with ``call``: the
    rest of the process stays where it was. Sockets ``call`` creates live in the namespace.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                _check_errno(_libc.setns(fd, _CLONE_NEWNET), f"setns {path}")
            finally:
                os.close(fd)
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="netns", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["value"]
    return result


def _sh(*argv: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=timeout,
        check=False,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise HarnessError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def ensure_node_packages() -> None:
    """Install containerd, runc, the CNI plugins, iptables... when missing (a fresh CI machine)."""
    _sh("bash", str(ENSURE_PACKAGES), *NODE_PACKAGES, timeout=900.0)


# --------------------------------------------------------------------------------------------
# Host state: cgroups, mounts, processes (shared by stop() and the reaper of crashed runs)


def _v1_hierarchies() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    return [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "cgroup.procs").exists()]


def _make_cgroup_root(name: str) -> None:
    """Create /<name> in every hierarchy; a new cpuset needs its parent's cpus and mems."""
    for hierarchy in _v1_hierarchies():
        d = hierarchy / name
        d.mkdir(exist_ok=True)
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (d / knob).exists() and not (d / knob).read_text().strip():
                (d / knob).write_text((hierarchy / knob).read_text())


def _cgroup_pids(name: str) -> set[int]:
    pids: set[int] = set()
    for hierarchy in _v1_hierarchies():
        base = hierarchy / name
        if not base.is_dir():
            continue
        for procs in base.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return pids


def _remove_cgroup_root(name: str) -> None:
    for hierarchy in _v1_hierarchies():
        base = hierarchy / name
        if not base.is_dir():
            continue
        # Deepest first: a cgroup directory can only go once its children are gone.
        dirs = sorted((p for p in base.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
        for d in [*dirs, base]:
            with contextlib.suppress(OSError):
                d.rmdir()


def _pids_mentioning(text: str) -> set[int]:
    """Processes whose command line contains ``text`` (containerd shims name their socket)."""
    pids: set[int] = set()
    needle = text.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (proc / "cmdline").read_bytes():
                pids.add(int(proc.name))
    return pids


def _kill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _unmount_under(root: Path) -> None:
    """Lazily unmount every mount point at or below ``root``, deepest first."""
    prefix = str(root)
    for _ in range(3):  # a detach can reveal mounts stacked underneath
        points = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
        if not points:
            return
        for point in sorted(points, key=len, reverse=True):
            _libc.umount2(point.encode(), _MNT_DETACH)


def _delete_netns(name: str) -> None:
    if Path("/run/netns", name).exists():
        _sh("ip", "netns", "delete", name, check=False)


def _teardown_host_state(workdir: Path, netns: str, cgroup: str) -> None:
    """Kill what is left of a node run, then remove its mounts, namespace, cgroups and files."""
    for _ in range(3):
        left = _cgroup_pids(cgroup) | _pids_mentioning(str(workdir))
        if not left:
            break
        _kill(left)
        time.sleep(0.5)
    _unmount_under(workdir)
    _delete_netns(netns)
    _remove_cgroup_root(cgroup)
    shutil.rmtree(workdir, ignore_errors=True)


def _reap_stale_nodes() -> None:
    """Remove what earlier runs that were SIGKILLed before their teardown left behind."""
    for d in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            pid = int((d / _OWNER_FILE).read_text())
            os.kill(pid, 0)
        except ProcessLookupError:
            netns = (d / _NETNS_FILE).read_text().strip() if (d / _NETNS_FILE).exists() else ""
            if netns:
                _teardown_host_state(d, netns, netns)
        except (OSError, ValueError):
            continue  # no pid file yet, or not ours to judge


# --------------------------------------------------------------------------------------------
# The cluster


class PodCluster(KubeCluster):
    """The control plane of :class:`KubeCluster` plus a node that runs pods, in a netns.

    ``images`` (docker-archives) are imported into containerd; pods run them with
    ``imagePullPolicy: Never`` (there is no registry and no route out). ``pause`` is the sandbox
    image. Admin kubeconfig, kubectl and helm work as in KubeCluster, through ``nsenter``.
    """

    def __init__(self, bin_dir: Path, *, pause: Image, images: Sequence[Image] = ()) -> None:
        _reap_stale_nodes()
        self.id = uuid.uuid4().hex[:8]
        self.netns = f"sideproxy-{self.id}"
        self.netns_path = Path("/run/netns") / self.netns
        self.cgroup_root = self.netns  # one name for both, so the reaper finds both
        workdir = Path(tempfile.mkdtemp(prefix=_PREFIX))
        (workdir / _OWNER_FILE).write_text(str(os.getpid()))
        (workdir / _NETNS_FILE).write_text(self.netns)
        super().__init__(bin_dir, workdir=workdir)
        self.pause = pause
        self.images = list(images)
        self.containerd_sock = self.workdir / "containerd" / "containerd.sock"
        self._node_procs: dict[str, _Process] = {}
        self._node_stopped = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Namespace and bridge, control plane, containerd (+ images), scheduler, kube-proxy,
        kubelet; returns once the node is Ready. On failure everything is torn down."""
        for name in NODE_BINARIES:
            self._bin(name)  # fail fast with the build hint
        try:
            ensure_node_packages()
            self._make_netns()
            super().start()
            self._start_containerd()
            self._import_images()
            self._start_scheduler()
            self._start_kube_proxy()
            self._start_kubelet()
            self._wait_node_ready()
        except BaseException:
            self._dump_logs_for_failure()
            self.stop()
            raise

    def stop(self, *, keep_workdir: bool = False) -> None:
        """Stop kubelet first (so nothing restarts), kill this node's containers, then the rest.

        ``keep_workdir`` (or SIDEPROXY_KUBE_KEEP) keeps only the logs, under the system temp dir.
        """
        for name in ("kubelet", "kube-proxy", "kube-scheduler"):
            proc = self._node_procs.get(name)
            if proc is not None:
                proc.stop(grace=1.0)  # torn down anyway: no need to wait
        _kill(_cgroup_pids(self.cgroup_root))
        containerd = self._node_procs.get("containerd")
        if containerd is not None:
            containerd.stop(grace=1.0)
        super().stop(keep_workdir=True)  # the workdir is ours: removed below, after unmounting
        if self._node_stopped:
            return
        self._node_stopped = True
        if keep_workdir or os.environ.get("SIDEPROXY_KUBE_KEEP"):
            self._keep_logs()
        _teardown_host_state(self.workdir, self.netns, self.cgroup_root)

    # -- clients ------------------------------------------------------------------------------

    def nsenter(self, argv: Sequence[str]) -> list[str]:
        """``argv`` prefixed so that it runs in the node's network namespace."""
        return ["nsenter", f"--net={self.netns_path}", "--", *argv]

    def in_net(self, call: Callable[[], T]) -> T:
        """Run ``call`` in a thread inside the node's network namespace (see :func:`in_netns`)."""
        return in_netns(self.netns_path, call)

    def ctr(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        return _sh("ctr", f"--address={self.containerd_sock}", "-n", "k8s.io", *args,
                   timeout=timeout)  # fmt: skip

    def cluster_ip(self, namespace: str, service: str) -> str:
        out = self.kubectl("get", "service", service, "-n", namespace, "-o",
                           "jsonpath={.spec.clusterIP}")  # fmt: skip
        return out.stdout.strip()

    def node_logs(self, lines: int = 40) -> str:
        parts = [self.log_tails(lines)]
        for proc in self._node_procs.values():
            state = "running" if proc.alive() else "stopped"
            parts.append(f"----- {proc.name} ({state}) {proc.log}\n{proc.tail(lines)}")
        return "\n".join(parts)

    # -- KubeCluster hooks ----------------------------------------------------------------------

    def _command(self, argv: list[str]) -> list[str]:
        return self.nsenter(argv)

    def _in_net(self, call: Callable[[], T]) -> T:
        return self.in_net(call)

    def _apiserver_argv(self, pki: _Pki) -> list[str]:
        # Pods reach it through the `kubernetes` Service (10.96.0.1 -> NODE_IP); they get their
        # ServiceAccount tokens mounted (the ServiceAccount admission plugin stays on).
        dropped = (
            "--bind-address=", "--advertise-address=", "--disable-admission-plugins=",
            "--endpoint-reconciler-type=",
        )  # fmt: skip
        argv = [a for a in super()._apiserver_argv(pki) if not a.startswith(dropped)]
        return [
            *argv,
            "--bind-address=0.0.0.0",  # only lo and the bridge exist in the namespace
            f"--advertise-address={NODE_IP}",
            "--kubelet-preferred-address-types=InternalIP",  # no resolver for the node name
            f"--kubelet-client-certificate={pki.admin_crt}",
            f"--kubelet-client-key={pki.admin_key}",
        ]

    def _controller_manager_argv(self) -> list[str]:
        pki = self._pki_or_fail()
        return [
            self._bin("kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}",
            # Every default controller: Deployments, ReplicaSets, EndpointSlices, the PDB
            # controller, ServiceAccounts, kube-root-ca.crt (projected token volumes need it).
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=0",
            f"--root-ca-file={pki.ca_crt}",
            f"--service-account-private-key-file={pki.sa_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--profiling=false",
        ]

    # -- internals ----------------------------------------------------------------------------

    def _make_netns(self) -> None:
        # The bridge and its address exist before the API server starts: it advertises NODE_IP.
        ns = self.netns
        _sh("ip", "netns", "add", ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "-n", ns, "addr", "add", f"{NODE_IP}/24", "dev", BRIDGE)
        _sh("ip", "-n", ns, "link", "set", BRIDGE, "up")
        # Clients on the node (the tests) reach ClusterIPs: the route lookup happens before
        # kube-proxy's DNAT, and without a route to the Service range it fails with
        # ENETUNREACH. The range stays on the bridge: still no route out of the namespace.
        _sh("ip", "-n", ns, "route", "add", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP)

    def _node_process(self, name: str, argv: list[str], *, wrap: bool = True) -> _Process:
        proc = _Process(name, self.nsenter(argv) if wrap else argv,
                        self.workdir / f"{name}.log", self._env)  # fmt: skip
        self._node_procs[name] = proc
        proc.start()
        return proc

    def _alive_or_fail(self, proc: _Process) -> None:
        if not proc.alive():
            raise HarnessError(f"{proc.name} exited at start-up; its log:\n{proc.tail(60)}")

    def _start_containerd(self) -> None:
        d = self.workdir / "containerd"
        cni_conf = self.workdir / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-sideproxy.conflist").write_text(json.dumps(self._cni_config(), indent=2))
        config = d / "config.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(self._containerd_config(cni_conf))
        proc = self._node_process("containerd", ["containerd", f"--config={config}"])

        def up() -> bool:
            self._alive_or_fail(proc)
            return (
                self.containerd_sock.exists()
                and _sh(
                    "ctr", f"--address={self.containerd_sock}", "version", check=False
                ).returncode
                == 0
            )

        wait_for(up, START_TIMEOUT, 0.2, message="containerd")

    def _containerd_config(self, cni_conf: Path) -> str:
        d = self.workdir / "containerd"
        return f"""version = 2
root = "{d / "root"}"
state = "{d / "state"}"
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{d / "containerd.sock.ttrpc"}"
[debug]
  level = "warn"
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.pause.ref}"
  # No CAP_SYS_RESOURCE here: the kernel refuses a negative oom_score_adj, so every sandbox
  # failed ("can't get final child's PID from pipe: EOF") until this was set.
  restrict_oom_score_adj = true
  # Pod network namespaces under the state dir (removed with it), not in /var/run/netns.
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{cni_conf}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{shutil.which("runc") or "/usr/sbin/runc"}"
        SystemdCgroup = false
"""

    def _cni_config(self) -> dict[str, Any]:
        return {
            "cniVersion": "0.4.0",
            "name": "sideproxy",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,  # nowhere to masquerade to: the namespace has no way out
                    "hairpinMode": True,  # a pod reaching itself through its Service
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": str(self.workdir / "cni" / "ipam"),
                    },
                },
            ],
        }

    def _import_images(self) -> None:
        for image in (self.pause, *self.images):
            self.ctr("images", "import", str(image.archive), timeout=600.0)

    def _start_scheduler(self) -> None:
        argv = [
            self._bin("kube-scheduler"),
            f"--kubeconfig={self.kubeconfig}",
            f"--authentication-kubeconfig={self.kubeconfig}",
            f"--authorization-kubeconfig={self.kubeconfig}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            "--secure-port=10259",
        ]
        self._node_process("kube-scheduler", argv)

    def _start_kube_proxy(self) -> None:
        # kube-proxy exits whenever its config file changes: written once, here.
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(self.kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
            # Leave the conntrack sysctls alone (the table size is host-wide).
            "conntrack": {
                "maxPerCore": 0,
                "min": 0,
                "tcpEstablishedTimeout": "0s",
                "tcpCloseWaitTimeout": "0s",
            },
        }
        path = self.workdir / "kube-proxy.yaml"
        path.write_text(yaml.safe_dump(config))
        self._node_process("kube-proxy", [self._bin("kube-proxy"), f"--config={path}"])

    def _kubelet_config(self, root: Path) -> dict[str, Any]:
        pki = self._pki_or_fail()
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "failCgroupV1": False,  # this machine kind has hybrid cgroups (v1 controllers)
            "cgroupDriver": "cgroupfs",  # no systemd
            "cgroupRoot": f"/{self.cgroup_root}",  # this run's pods only, killable as a group
            "containerRuntimeEndpoint": f"unix://{self.containerd_sock}",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(pki.ca_crt)},
            },
            "authorization": {"mode": "AlwaysAllow"},  # only the API server holds a client cert
            "resolvConf": "",  # no cluster DNS, and the host's resolvers are unreachable
            "failSwapOn": False,
            "protectKernelDefaults": True,  # check, never write, the kernel tunables
            "imageGCHighThresholdPercent": 100,  # never drop the imported images
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": False,
            "shutdownGracePeriod": "0s",
            "podPidsLimit": -1,
            "staticPodPath": "",
            "volumePluginDir": str(root / "volume-plugins"),
        }

    def _start_kubelet(self) -> None:
        root = self.workdir / "kubelet"
        root.mkdir()
        _make_cgroup_root(self.cgroup_root)
        config = self.workdir / "kubelet.yaml"
        config.write_text(yaml.safe_dump(self._kubelet_config(root)))
        # Kubelet runs in a mount namespace of its own (for the kernel tunables, below); its
        # root dir is a shared mount, so the volumes it mounts there propagate to containerd.
        _sh("mount", "--bind", str(root), str(root))
        _sh("mount", "--make-shared", str(root))
        tunables = self.workdir / "sysctl"
        binds = []
        for i, (name, value) in enumerate(_KERNEL_TUNABLES.items()):
            copy = tunables / str(i)
            copy.parent.mkdir(exist_ok=True)
            copy.write_text(value + "\n")
            binds.append(f"mount --bind {copy} /proc/sys/{name}")
        script = " && ".join([*binds, 'exec "$@"'])
        kubelet = [
            self._bin("kubelet"),
            f"--config={config}",
            f"--kubeconfig={self.kubeconfig}",
            f"--root-dir={root}",
            f"--cert-dir={self.workdir / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
        ]
        argv = [
            "unshare", "--mount", "--propagation", "unchanged", "--",
            "sh", "-c", script, "kubelet", *self.nsenter(kubelet),
        ]  # fmt: skip
        self._node_process("kubelet", argv, wrap=False)

    def _wait_node_ready(self) -> None:
        kubelet = self._node_procs["kubelet"]

        def ready() -> bool:
            for proc in self._node_procs.values():
                self._alive_or_fail(proc)
            out = self.kubectl(
                "get", "node", NODE_NAME, "--ignore-not-found", "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}", check=False,
            )  # fmt: skip
            return out.stdout.strip() == "True"

        try:
            wait_for(ready, START_TIMEOUT, 0.5, message=f"node {NODE_NAME} Ready")
        except TimeoutError as exc:
            raise HarnessError(f"{exc}; kubelet log:\n{kubelet.tail(60)}") from None

    def _dump_logs_for_failure(self) -> None:
        with contextlib.suppress(Exception):
            self._keep_logs()

    def _keep_logs(self) -> None:
        """Copy the daemons' logs out of the work dir (which the teardown removes)."""
        keep = Path(tempfile.gettempdir()) / f"sideproxy-node-logs-{self.id}"
        keep.mkdir(exist_ok=True)
        for log in self.workdir.glob("*.log"):
            shutil.copy2(log, keep / log.name)
