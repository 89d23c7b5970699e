#!/usr/bin/env bash
# The CPU check: on a host whose CPU experts fall short of `moemesh bench`'s
# goals, measures where the time goes, into one directory of plain files:
#
#   machine.txt      lscpu, memory nodes, thread siblings, huge pages
#   scaling.txt      thread_scaling in f32 and bf16: one thread, threads
#                    side by side (weights laid out by one thread or by
#                    each), in step (meeting every round, waiting asleep or
#                    spinning), the backend's one call
#   scaling-pairs.txt  the same on chosen pairs of CPUs (taskset): vCPUs
#                    that share a core show up as a slow pair
#   decode.txt       decode_step in bf16 and f32 against the read bound,
#                    back to back and 10 ms apart (compute threads that
#                    wake from idle vCPUs)
#   bench-N.json     two `moemesh bench --json` runs (needs torch for the
#                    PyTorch contestant; --no-torch otherwise)
#
# Build where Rust is, then carry the binaries over:
#   cargo build --release -p moemesh
#   cargo build --release -p moemesh-core --example thread_scaling --example decode_step
# Usage: scripts/cpu-check.sh [BINARY_DIR] [OUT_DIR] [THREADS]
#   BINARY_DIR holds moemesh, thread_scaling and decode_step (default: the
#   release build's places, built first where cargo is); OUT_DIR defaults
#   to cpu-check; THREADS to 2.
# A few minutes (a minute and a half on a 2-vCPU Zen 5 guest).
set -uo pipefail
cd "$(dirname "$0")/.."
bin=${1:-}
out=${2:-cpu-check}
threads=${3:-2}
mkdir -p "$out"
if [[ -z "$bin" ]] && command -v cargo >/dev/null; then
    echo "cpu-check: building the release binary and examples" >&2
    cargo build --release --quiet -p moemesh || exit 1
    cargo build --release --quiet -p moemesh-core --example thread_scaling --example decode_step || exit 1
fi
binary() {
    if [[ -n "$bin" ]]; then echo "$bin/$1"
    elif [[ $1 == moemesh ]]; then echo target/release/moemesh
    else echo "target/release/examples/$1"; fi
}

{
    lscpu
    echo; echo "memory nodes: $(ls -d /sys/devices/system/node/node* 2>/dev/null | wc -l)"
    echo "cpu0's thread siblings: $(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list 2>/dev/null)"
    echo "transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null)"
} >"$out/machine.txt" 2>&1

echo "cpu-check: thread scaling" >&2
for format in f32 bf16; do
    timeout 60 "$(binary thread_scaling)" 128 "$threads" 2 "$format"
done >"$out/scaling.txt" 2>&1

cpus=$(nproc)
if ((cpus >= 4 && threads == 2)); then
    echo "cpu-check: thread scaling on pairs of CPUs" >&2
    for pair in 0,1 0,2 "0,$((cpus / 2))" "$((cpus - 1)),$((cpus / 2 - 1))"; do
        echo "== taskset -c $pair"
        timeout 60 taskset -c "$pair" "$(binary thread_scaling)" 128 2 2
    done >"$out/scaling-pairs.txt" 2>&1
fi

echo "cpu-check: decode steps, back to back and 10 ms apart" >&2
for idle_ms in 0 10; do
    for format in bf16 f32; do
        timeout 60 "$(binary decode_step)" 8 "$threads" 40 "$format" "$idle_ms"
    done
done >"$out/decode.txt" 2>&1

torch=()
python3 -c "import torch, transformers" 2>/dev/null || torch=(--no-torch)
for run in 1 2; do
    echo "cpu-check: moemesh bench, run $run of 2" >&2
    timeout 300 "$(binary moemesh)" bench --json --threads "$threads" "${torch[@]}" \
        >"$out/bench-$run.json" 2>"$out/bench-$run.log"
done
tail -n +1 "$out"/scaling*.txt "$out/decode.txt"
