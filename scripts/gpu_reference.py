#!/usr/bin/env python3
"""The GPU check's reference figures, measured with PyTorch in the same run.

Reads the JSON object `moemesh bench-device` printed, measures on the same
GPU what a plain cuBLAS bf16 GEMM (through torch.matmul) does on the same
expert shapes and row counts, and the device's copy bandwidth, then prints
one JSON object: moemesh's figures, the references and the verdicts of
issue 12's bar (expert GEMMs >= 0.7 of cuBLAS at the throughput batch,
decode within 1.5x of the weight-streaming bound, every family within
5e-3 relative L2 of the CPU).
"""

import json
import statistics
import sys

import torch


def time_ms(fn, repeats=20, warmup=3):
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cublas_expert_gemms(rows_per_expert, hidden, intermediate):
    """TFLOP/s of the expert FFN's two GEMMs per expert, as plain bf16 GEMMs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    experts = []
    for rows in rows_per_expert:
        if rows == 0:
            continue
        x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        gate_up = torch.randn(hidden, 2 * intermediate, device="cuda", dtype=torch.bfloat16, generator=gen)
        act = torch.randn(rows, intermediate, device="cuda", dtype=torch.bfloat16, generator=gen)
        down = torch.randn(intermediate, hidden, device="cuda", dtype=torch.bfloat16, generator=gen)
        experts.append((x, gate_up, act, down))

    def run():
        for x, gate_up, act, down in experts:
            torch.matmul(x, gate_up)
            torch.matmul(act, down)

    ms = time_ms(run)
    pairs = sum(rows_per_expert)
    flops = 2.0 * pairs * 3 * hidden * intermediate
    return {"median_ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}


def copy_bandwidth():
    """Bytes read plus written per second by a large device-to-device copy."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), repeats=10)
    return 2 * src.numel() / (ms * 1e-3)


def main():
    with open(sys.argv[1]) as file:
        moemesh = json.load(file)
    throughput = moemesh["throughput"]
    decode = moemesh["decode"]
    reference = cublas_expert_gemms(
        throughput["rows_per_expert"], throughput["hidden_size"], throughput["intermediate_size"]
    )
    bandwidth = copy_bandwidth()
    bound_ms = decode["touched_expert_bytes"] / bandwidth * 1e3
    # The expert GEMMs on the GPU alone (gather and activation included),
    # as the cuBLAS reference is timed; the host-to-host figure, with the
    # copies over PCIe, is in moemesh.throughput.
    compute_only = throughput.get("compute_only") or {}
    gemm_tflops = compute_only.get("tflops", throughput["tflops"])
    worst_l2 = max(
        (family["relative_l2"] for family in moemesh.get("correctness", {}).values()),
        default=float("nan"),
    )
    verdicts = {
        "gemm_tflops": gemm_tflops,
        "gemm_vs_cublas": gemm_tflops / reference["tflops"],
        "gemm_at_least_0.7_of_cublas": gemm_tflops >= 0.7 * reference["tflops"],
        "decode_vs_streaming_bound": decode["median_ms"] / bound_ms,
        "decode_within_1.5x_of_bound": decode["median_ms"] <= 1.5 * bound_ms,
        "worst_relative_l2": worst_l2,
        "correct_to_5e-3": worst_l2 <= 5e-3,
        "batch_invariant": all(
            family["batch_invariant"] for family in moemesh.get("correctness", {}).values()
        ),
    }
    print(
        json.dumps(
            {
                "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__,
                "moemesh": moemesh,
                "cublas_bf16": reference,
                "copy_bytes_per_s": bandwidth,
                "decode_streaming_bound_ms": bound_ms,
                "verdicts": verdicts,
            }
        )
    )


if __name__ == "__main__":
    main()
