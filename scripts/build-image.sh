#!/usr/bin/env bash
# Build the Side Proxy image from the repository's Dockerfile without a Docker engine or a
# registry: podman (Debian's, running with runc) builds the real Dockerfile on top of a local
# Python 3.11 base made with debootstrap (Debian bookworm, the distribution python:3.11-slim is
# built on), and the result is saved as a docker-archive that `ctr image import` (or
# `docker load`) reads.
#
# Cached outside the repository, keyed by a hash of everything the build reads, so an unchanged
# tree costs a few stats; nothing is ever written into the repository.
#
#   SIDEPROXY_IMAGE_CACHE   cache root (default: ~/.cache/sideproxy-image)
#
# Progress goes to stderr. The last two lines on stdout are the image reference
# (localhost/sideproxy:<hash>) and the path of its docker-archive.
#
# Needs root (debootstrap, podman's overlay storage). Missing Debian packages (podman,
# debootstrap, runc, ...) are installed with apt-get, since CI starts from a fresh machine.
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd -- "$here/.." && pwd)
cache=${SIDEPROXY_IMAGE_CACHE:-$HOME/.cache/sideproxy-image}
suite=bookworm
mirror=${SIDEPROXY_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# python3.11 as in python:3.11-slim; `python` and `pip` on PATH as the Dockerfile expects.
base_packages=python3,python3-venv,python3-pip,python-is-python3,ca-certificates
ca_bundle=/etc/ssl/certs/ca-certificates.crt

log() { printf '[build-image %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# What the build reads: the Dockerfile, its context (the .dockerignore allow-list) and this script.
input_hash() {
    cd "$repo"
    {
        printf '%s\n' Dockerfile .dockerignore constraints.txt pyproject.toml README.md \
            scripts/build-image.sh
        find sideproxy -type f ! -path '*/__pycache__/*' ! -name '*.py[cod]'
    } | LC_ALL=C sort | while IFS= read -r f; do
        printf '%s\0' "$f"
        sha256sum <"$f"
    done | sha256sum | cut -c1-16
}

hash=$(input_hash)
ref=localhost/sideproxy:$hash
out=$cache/$hash
archive=$out/image.tar

if [[ -s $archive ]]; then
    printf '%s\n%s\n' "$ref" "$archive"
    exit 0
fi

mkdir -p "$cache"
# Two test sessions may start at once; the second waits for the first build.
exec 9>"$cache/.lock"
flock 9
if [[ -s $archive ]]; then
    printf '%s\n%s\n' "$ref" "$archive"
    exit 0
fi

[[ $(id -u) == 0 ]] || die "needs root (debootstrap and podman's storage)"

bash "$here/ensure-packages.sh" podman runc conmon debootstrap ca-certificates >&2

# Podman with its own storage under the cache, cgroupfs (no systemd here), no journald, and no
# network of its own: builds use the host's network, runs use none, so podman never creates a
# bridge or an iptables rule on the host.
store=$cache/podman
podman() {
    command podman --root "$store/storage" --runroot "$store/run" --storage-driver overlay \
        --cgroup-manager cgroupfs --events-backend file --runtime runc "$@"
}

# The base: a bookworm minbase with Python 3.11, imported as a one-layer image. Cached by its
# package list; rebuilt only when that changes.
base_key=$(printf '%s %s %s\n' "$suite" "$mirror" "$base_packages" | sha256sum | cut -c1-12)
base_ref=localhost/sideproxy-python:3.11-$suite-$base_key
base_tar=$cache/base-$base_key.tar
if [[ ! -s $base_tar ]]; then
    start=$SECONDS
    log "debootstrap $suite ($base_packages)"
    root=$(mktemp -d "$cache/rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    debootstrap --variant=minbase --include="$base_packages" "$suite" "$root" "$mirror" >&2 ||
        die "debootstrap failed (log in $root/debootstrap/debootstrap.log)"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/tmp/*
    tar --numeric-owner -C "$root" -cf "$base_tar.part" .
    mv "$base_tar.part" "$base_tar"
    rm -rf "$root"
    trap - EXIT
    log "base rootfs in $((SECONDS - start))s"
fi
if ! podman image exists "$base_ref"; then
    podman import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' \
        "$base_tar" "$base_ref" >&2
fi

start=$SECONDS
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/pyproject.toml" | head -n1)
revision=$(git -C "$repo" rev-parse HEAD 2>/dev/null || echo unknown)
log "podman build $ref (version $version)"
# The host's CA bundle goes in as a read-only mount (never into a layer) so pip trusts whatever
# TLS-inspecting proxy this machine sits behind.
podman build --pull=never --network=host --layers=false \
    --volume "$ca_bundle:$ca_bundle:ro" \
    --build-arg "PYTHON_IMAGE=$base_ref" \
    --build-arg "VERSION=$version" \
    --build-arg "REVISION=$revision" \
    --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --tag "$ref" --file "$repo/Dockerfile" "$repo" >&2

mkdir -p "$out"
podman save --format docker-archive --output "$archive.part" "$ref" >&2
mv "$archive.part" "$archive"
# Keep the cache small: only this image and the base stay in podman's store, and only the
# newest three archives on disk.
# (A loop, not xargs: `podman` is the function above, with this script's storage.)
podman images --format '{{.Repository}}:{{.Tag}}' | grep '^localhost/sideproxy:' |
    grep -vx "$ref" | while IFS= read -r old; do podman rmi -f "$old" >/dev/null 2>&1 || true; done
podman image prune -f >/dev/null 2>&1 || true
find "$cache" -mindepth 2 -maxdepth 2 -name image.tar -printf '%T@ %h\n' | sort -rn |
    tail -n +4 | cut -d' ' -f2- | xargs -r rm -rf
log "image built in $((SECONDS - start))s: $(du -h "$archive" | cut -f1)"
printf '%s\n%s\n' "$ref" "$archive"
