#!/usr/bin/env bash
# The GPU check: on a machine with an NVIDIA GPU (CUDA 13 driver, cuBLAS,
# NVRTC) and PyTorch, measures moemesh's CUDA backend and prints ONE JSON
# object on stdout (progress goes to stderr): correctness against the CPU
# on the test checkpoint of every family, throughput at Mixtral scale
# (hidden 4096, intermediate 14336, 8 experts, top-2, 4096 tokens) beside a
# plain cuBLAS bf16 GEMM of the same shapes, decode (8 tokens) beside the
# weight-streaming bound, and Expert Buffering with half the experts.
#
# Build the binary where Rust is, then carry it over:
#   cargo build --profile gpu -p moemesh --features cuda
#   (target/gpu/moemesh, stripped, no debug info)
# Usage: scripts/gpu-check.sh [MOEMESH_BINARY]   (run from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
moemesh=${1:-target/gpu/moemesh}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "gpu-check: writing a Mixtral-scale bf16 checkpoint (2.8 GB)" >&2
"$moemesh" synth-model --bf16 --layers 1 --experts 8 --top-k 2 \
    --hidden-size 4096 --intermediate-size 14336 --out "$work/mixtral" >/dev/null

echo "gpu-check: measuring moemesh on cuda:0" >&2
RUST_LOG=warn "$moemesh" bench-device --device cuda:0 --model "$work/mixtral" \
    --fixtures tests/fixtures --tokens 4096 --decode-tokens 8 --repeats 10 \
    >"$work/moemesh.json"

echo "gpu-check: measuring cuBLAS through PyTorch" >&2
python3 scripts/gpu_reference.py "$work/moemesh.json"
