#!/usr/bin/env bash
# Build the test control plane (etcd, kube-apiserver, kube-controller-manager, kubectl, helm) and
# the node components of the pod tests (kube-scheduler, kube-proxy, kubelet) from the Go module
# proxy into a per-version cache outside the repository.
#
# Idempotent: when every binary is already cached it only stats eight files. Binaries are linked in
# a scratch dir and renamed into place, so a killed build never leaves half a binary behind.
# Progress goes to stderr; the last line on stdout is the bin dir.
#
#   SIDEPROXY_K8S_CACHE   cache root (default: ~/.cache/sideproxy-k8s)
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=k8s-versions.env
. "$here/k8s-versions.env"

cache_root=${SIDEPROXY_K8S_CACHE:-$HOME/.cache/sideproxy-k8s}
out=$cache_root/k8s-${K8S_VERSION}_etcd-${ETCD_VERSION}_helm-${HELM_VERSION}
bin=$out/bin

k8s_bins=(kube-apiserver kube-controller-manager kubectl kube-scheduler kube-proxy kubelet)
all_bins=("${k8s_bins[@]}" etcd helm)

have() {
    local b
    for b; do [[ -x $bin/$b ]] || return 1; done
}

# Fast path: no lock, no Go, no network.
if have "${all_bins[@]}"; then
    echo "$bin"
    exit 0
fi

log() { printf '[build-k8s %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$bin"
# Two test sessions may start at once; the second waits for the first build instead of racing it.
exec 9>"$out/.lock"
flock 9
if have "${all_bins[@]}"; then
    echo "$bin"
    exit 0
fi

# Every pinned module declares `go 1.26.0`, which the installed Go satisfies: never fetch a
# toolchain behind our back.
export GOTOOLCHAIN=local
export CGO_ENABLED=0
# The wrapper modules start without go.sum; let the go command fill it in.
export GOFLAGS=-mod=mod

# Scratch space next to bin/ so the final mv is a rename on one filesystem. Holding the lock,
# any other scratch dir is left over from a killed build.
rm -rf "$out"/work.*
work=$(mktemp -d "$out/work.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Move finished binaries from a scratch dir into bin/.
publish() {
    local f
    for f in "$1"/*; do
        chmod 0755 "$f"
        mv -f "$f" "$bin/"
    done
}

# Build the k8s_bins that are missing (a cache from before the node components were added gains
# just those three, reusing the Go build cache of the rest).
build_kubernetes() {
    local mod=$work/kubernetes dst=$work/out-kubernetes gomod ld p b major minor
    local -a staging replaces pkgs=()
    for b in "${k8s_bins[@]}"; do
        [[ -x $bin/$b ]] || pkgs+=("k8s.io/kubernetes/cmd/$b")
    done
    mkdir -p "$mod" "$dst"
    cd "$mod"
    go mod init sideproxy.invalid/k8s-wrapper
    go mod edit -require="k8s.io/kubernetes@${K8S_VERSION}"

    # k8s.io/kubernetes replaces its staging modules with ./staging/... paths, which do not exist
    # in the module zip. Read the list from its own go.mod so a new staging module needs no edit.
    gomod=$(go mod download -json "k8s.io/kubernetes@${K8S_VERSION}" |
        sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
    [[ -f $gomod ]] || die "could not download k8s.io/kubernetes@${K8S_VERSION}'s go.mod"
    mapfile -t staging < <(awk '
        { sub(/^[[:space:]]*replace[[:space:]]+/, "") }
        { for (i = 2; i < NF; i++) if ($i == "=>" && $(i + 1) ~ /^\.\/staging\//) print $1 }
    ' "$gomod" | sort -u)
    ((${#staging[@]} > 0)) || die "no ./staging replaces found in $gomod"
    log "pinning ${#staging[@]} staging modules to ${K8S_STAGING_VERSION}"
    replaces=()
    for p in "${staging[@]}"; do replaces+=("-replace=$p=$p@${K8S_STAGING_VERSION}"); done
    go mod edit "${replaces[@]}"

    # Without these the binaries call themselves v0.0.0-master and /version lies.
    major=${K8S_VERSION#v}
    major=${major%%.*}
    minor=${K8S_VERSION#v*.}
    minor=${minor%%.*}
    ld="-s -w"
    for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        ld+=" -X $p.gitVersion=${K8S_VERSION} -X $p.gitMajor=$major -X $p.gitMinor=$minor"
        ld+=" -X $p.gitTreeState=clean"
    done
    # One invocation so they share the compile of apimachinery, client-go, ...
    go build -trimpath -ldflags="$ld" -o "$dst/" "${pkgs[@]}"
    publish "$dst"
}

build_etcd() {
    local mod=$work/etcd dst=$work/out-etcd
    mkdir -p "$mod" "$dst"
    cd "$mod"
    # etcd's own go.mod has relative replaces, so `go install ...@version` refuses it; a wrapper
    # module resolves the published v3 modules instead.
    go mod init sideproxy.invalid/etcd-wrapper
    go get -tool "go.etcd.io/etcd/server/v3@${ETCD_VERSION}"
    go build -trimpath -ldflags="-s -w" -o "$dst/etcd" go.etcd.io/etcd/server/v3
    publish "$dst"
}

build_helm() {
    local dst=$work/out-helm ld
    mkdir -p "$dst"
    cd "$work"
    # Default .Capabilities.KubeVersion for `helm template` matches the pinned cluster.
    ld="-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}"
    ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=$major"
    ld+=" -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor"
    # `go install pkg@version` builds helm's own module graph and rejects -mod.
    GOFLAGS= GOBIN=$dst go install -trimpath -ldflags="$ld" "helm.sh/helm/v3/cmd/helm@${HELM_VERSION}"
    publish "$dst"
}

timed() {
    local name=$1 start=$SECONDS
    shift
    log "building $name"
    ("$@")
    log "built $name in $((SECONDS - start))s"
}

major=${K8S_VERSION#v}
major=${major%%.*}
minor=${K8S_VERSION#v*.}
minor=${minor%%.*}

total=$SECONDS
have etcd || timed "etcd ${ETCD_VERSION}" build_etcd
have helm || timed "helm ${HELM_VERSION}" build_helm
have "${k8s_bins[@]}" || timed "kubernetes ${K8S_VERSION}" build_kubernetes
have "${all_bins[@]}" || die "build finished but binaries are missing from $bin"
log "all binaries ready in $((SECONDS - total))s"
echo "$bin"
