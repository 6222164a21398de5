#!/usr/bin/env bash
# Copy the generated CRDs (crds/*.yaml, from `python -m sideproxy.crds --write`) into the Helm
# chart's crds/ directory, so the chart ships byte-identical copies (tests/test_crds.py checks).
#
#   bash scripts/sync-chart-crds.sh          copy, removing chart CRDs that crds/ no longer has
#   bash scripts/sync-chart-crds.sh --check  change nothing; exit 1 and name the files that differ
set -euo pipefail

root=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
src=$root/crds
dst=$root/helm/sideproxy/crds

check=false
case ${1:-} in
    "") ;;
    --check) check=true ;;
    *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

shopt -s nullglob
sources=("$src"/*.yaml)
if ((${#sources[@]} == 0)); then
    echo "$0: no CRDs in $src (run: python -m sideproxy.crds --write)" >&2
    exit 1
fi

stale=()
for f in "${sources[@]}"; do
    name=${f##*/}
    cmp -s "$f" "$dst/$name" || stale+=("$name")
done
for f in "$dst"/*; do
    name=${f##*/}
    [[ -e $src/$name ]] || stale+=("$name (not in crds/)")
done

if $check; then
    if ((${#stale[@]})); then
        printf 'helm/sideproxy/crds/ is out of date: %s\n' "${stale[@]}" >&2
        echo "run: bash scripts/sync-chart-crds.sh" >&2
        exit 1
    fi
    exit 0
fi

mkdir -p "$dst"
for f in "$dst"/*; do
    [[ -e $src/${f##*/} ]] || rm -f -- "$f"
done
cp -- "${sources[@]}" "$dst/"
echo "copied ${#sources[@]} CRD(s) into ${dst#"$root"/}/"
