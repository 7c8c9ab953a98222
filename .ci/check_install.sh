#!/usr/bin/env bash
# What a lab does with a clone: `pip install` it (not editable) into a fresh virtual environment,
# then run every console command from another folder. Also validates CITATION.cff with cffconvert.
# Usage: bash .ci/check_install.sh          (about a minute with pip's cache warm)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
# setuptools builds in the clone: remove its build/ and egg-info afterwards unless they were there before
leftovers=()
for path in "$repo/build" "$repo/fcdensenet_microscopy.egg-info"; do [ -e "$path" ] || leftovers+=("$path"); done
trap 'rm -rf "$work" "${leftovers[@]}"' EXIT
python3 -m venv "$work/venv"
"$work/venv/bin/python" -m pip install --quiet --upgrade pip
"$work/venv/bin/python" -m pip install --quiet "$repo"
cd "$work"
for command in fcdensenet-build-lmdb fcdensenet-train fcdensenet-segment fcdensenet-export-bioimageio \
        fcdensenet-measure-objects; do
    "$work/venv/bin/$command" --help > "$work/help.txt"
    grep -q -- "--version" "$work/help.txt"
    echo "$("$work/venv/bin/$command" --version) (installed, run from $work)"
done
python3 -m venv "$work/cff"
"$work/cff/bin/python" -m pip install --quiet cffconvert
"$work/cff/bin/cffconvert" --validate -i "$repo/CITATION.cff"
