#!/usr/bin/env bash
# Tests the CUDA backend without a GPU: compiles every kernel for sm_90 with
# NVRTC (which needs no GPU) and runs the backend's GPU-free tests. NVRTC
# comes from PyPI, at the CUDA version of the GPUs moemesh is checked on
# (13.0), installed under target/ on first use.
set -euo pipefail
cd "$(dirname "$0")/.."
nvrtc=target/nvrtc-13.0
if [ ! -e "$nvrtc/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    python3 -m pip install --quiet --disable-pip-version-check \
        --target "$nvrtc" 'nvidia-cuda-nvrtc==13.0.*'
fi
export LD_LIBRARY_PATH="$PWD/$nvrtc/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test -p moemesh-core --features cuda --lib compute::cuda
