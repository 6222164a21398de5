#!/usr/bin/env bash
# Build the pod sandbox ("pause") image of the test node without a registry: a static C binary
# that sleeps, reaps zombies and exits on SIGTERM/SIGINT, packed into a one-layer image with
# umoci and saved as a docker-archive with skopeo, for `ctr -n k8s.io image import`.
#
# Cached outside the repository (default ~/.cache/sideproxy-image/pause-<hash>.tar, keyed by this
# script). The last two lines on stdout are the image reference and the archive path.
#
#   SIDEPROXY_IMAGE_CACHE   cache root (default: ~/.cache/sideproxy-image)
set -euo pipefail

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
cache=${SIDEPROXY_IMAGE_CACHE:-$HOME/.cache/sideproxy-image}
hash=$(sha256sum <"${BASH_SOURCE[0]}" | cut -c1-12)
ref=localhost/sideproxy-pause:$hash
archive=$cache/pause-$hash.tar

log() { printf '[build-pause %s] %s\n' "$(date +%T)" "$*" >&2; }

if [[ ! -s $archive ]]; then
    bash "$here/ensure-packages.sh" gcc libc6-dev umoci skopeo >&2
    mkdir -p "$cache"
    work=$(mktemp -d "$cache/pause.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    cat >"$work/pause.c" <<'EOF'
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction stop = {.sa_handler = quit};
    struct sigaction child = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP | SA_RESTART};
    sigaction(SIGINT, &stop, 0);
    sigaction(SIGTERM, &stop, 0);
    sigaction(SIGCHLD, &child, 0);
    for (;;) pause();
}
EOF
    gcc -static -Os -s -o "$work/pause" "$work/pause.c"
    (
        cd "$work"
        umoci init --layout layout
        umoci new --image layout:pause
        umoci insert --image layout:pause pause /pause
        umoci config --image layout:pause --config.entrypoint /pause --config.user 65535:65535 \
            --architecture amd64 --os linux
        skopeo copy --quiet oci:layout:pause "docker-archive:$archive.part:$ref"
    ) >&2
    mv "$archive.part" "$archive"
    log "built $ref"
fi
printf '%s\n%s\n' "$ref" "$archive"
