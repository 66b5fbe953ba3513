#!/usr/bin/env bash
# The GPU check on a machine without internet: install the wheels carried in bench/wheels (built with internet
# by `python -m bench.gpu_wheels`) beside the machine's own packages (its CUDA torch stays), install phitune from
# this checkout, then run `python -m bench.gpu_check` with this script's arguments. What cannot be installed is
# named here; the check names any package it still lacks.
#
#     bench/gpu_check.sh                      # PYTHON=python3 by default
#     PYTHON=/opt/conda/bin/python bench/gpu_check.sh --only speed
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=bench/wheels
pip_offline() { "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$WHEELS" "$@"; }

if [ -f "$WHEELS/requirements.txt" ]; then
    if ! pip_offline -r "$WHEELS/requirements.txt"; then
        # pip installs all or nothing: now one requirement at a time, to install what can be and name the rest.
        missing=0
        while read -r requirement; do
            [ -n "$requirement" ] || continue
            if ! output=$(pip_offline "$requirement" 2>&1); then
                missing=1
                reason=$(printf '%s\n' "$output" | grep -m1 -o 'No matching distribution found for .*' || true)
                echo "gpu_check.sh: cannot install $requirement: ${reason:-$(printf '%s\n' "$output" | tail -1)}" >&2
            fi
        done <"$WHEELS/requirements.txt"
        [ "$missing" = 0 ] || echo "gpu_check.sh: the machine lacks the above; the check runs what it can" >&2
    fi
    pip_offline --no-deps --no-build-isolation -e . ||
        echo "gpu_check.sh: phitune is not installed as a package; the check runs from this checkout" >&2
else
    echo "gpu_check.sh: no $WHEELS/requirements.txt, nothing installed (python -m bench.gpu_wheels makes it)" >&2
fi
exec "$PYTHON" -m bench.gpu_check "$@"
