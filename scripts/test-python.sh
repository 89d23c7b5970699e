#!/usr/bin/env bash
# Builds the Python package (client/python) as one abi3 wheel with maturin,
# installs it in a virtual environment under target/, and runs its pytest
# suite against a local cluster started from target/debug/moemesh (or
# MOEMESH_BIN). maturin, numpy, pytest and safetensors come from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/python-venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    'maturin>=1.9,<2' numpy pytest safetensors
# Debug build, like the rest of the tests; one wheel for every Python >= 3.9.
rm -f target/wheels/moemesh-*.whl
"$venv/bin/maturin" build --manifest-path client/python/Cargo.toml \
    --interpreter "$venv/bin/python" --out target/wheels
wheels=(target/wheels/moemesh-*-abi3-*.whl)
if [ "${#wheels[@]}" -ne 1 ] || [ ! -e "${wheels[0]}" ]; then
    echo "expected one abi3 wheel in target/wheels, found: ${wheels[*]}" >&2
    exit 1
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --force-reinstall "${wheels[0]}"
if [ -z "${MOEMESH_BIN:-}" ]; then
    cargo build -p moemesh
fi
"$venv/bin/python" -m pytest -q client/python/tests "$@"
