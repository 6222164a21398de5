#!/usr/bin/env bash
# Install the Debian packages named as arguments when they are missing (CI starts from a fresh
# machine). A no-op, without touching apt, when all are installed. Services a package ships are
# not what the tests run (they start their own daemons with their own configs).
#
#   bash scripts/ensure-packages.sh containerd runc ...
set -euo pipefail

missing=()
for p; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0

[[ $(id -u) == 0 ]] || { echo "ensure-packages: need root to install ${missing[*]}" >&2; exit 1; }
echo "ensure-packages: apt-get install ${missing[*]}" >&2
install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2
}
# Serialise with any other apt user; refresh the lists only when the install needs it.
exec 9>/var/lock/sideproxy-ensure-packages.lock
flock 9
install "${missing[@]}" || { apt-get update >&2 && install "${missing[@]}"; }
