#!/usr/bin/env python3
"""The PyTorch contestant of `moemesh bench`: the transformers
MixtralSparseMoeBlock on the same checkpoint, input and thread count.

`moemesh bench` starts this script once, then alternates it with the other
contestants: each line it writes on stdin is a number of forwards to run,
and the script answers with the seconds they took; a line `gemm N` runs N
plain products [tokens, hidden] x [hidden, intermediate] in f32 instead
(PyTorch's own BLAS on the layer's shape: a ceiling beside the bench's).
It needs

    pip install torch transformers safetensors numpy

Run by hand:

    python3 torch_mixtral_block.py --model DIR --input x.npy --threads 2 --output y.npy
    3        (then type a count; the script prints the seconds)
"""

import argparse
import json
import os
import sys
import time

import numpy
import torch
import transformers
from safetensors.torch import load_file
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock


def load_block(model_dir, layer):
    config = MixtralConfig.from_pretrained(model_dir)
    block = MixtralSparseMoeBlock(config).eval()
    tensors = {}
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as index:
            files = sorted(set(json.load(index)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        tensors.update(load_file(os.path.join(model_dir, name)))
    prefix = f"model.layers.{layer}.block_sparse_moe"
    with torch.no_grad():
        block.gate.weight.copy_(tensors[f"{prefix}.gate.weight"])
        for expert in range(config.num_local_experts):
            weight = lambda name: tensors[f"{prefix}.experts.{expert}.{name}.weight"].float()
            block.experts.gate_up_proj[expert].copy_(torch.cat([weight("w1"), weight("w3")]))
            block.experts.down_proj[expert].copy_(weight("w2"))
    return block


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Mixtral-style checkpoint directory")
    parser.add_argument("--layer", type=int, default=0)
    parser.add_argument("--input", required=True, help="[tokens, hidden] f32 .npy")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--output", help="where to write the block's output (.npy), for comparison")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    block = load_block(args.model, args.layer)
    hidden = torch.from_numpy(numpy.load(args.input)).float().unsqueeze(0)

    def forward():
        with torch.inference_mode():
            output = block(hidden)
        return output[0] if isinstance(output, tuple) else output

    output = forward()
    if args.output:
        numpy.save(args.output, output[0].numpy())
    print(f"ready torch {torch.__version__} transformers {transformers.__version__} threads {torch.get_num_threads()}", flush=True)
    generator = torch.Generator().manual_seed(3)
    gemm_lhs = torch.rand(hidden.shape[1], block.experts.down_proj.shape[1], generator=generator)
    gemm_rhs = torch.rand(block.experts.down_proj.shape[1], block.experts.down_proj.shape[2], generator=generator)
    with torch.inference_mode():
        torch.mm(gemm_lhs, gemm_rhs)
    for line in sys.stdin:
        words = line.split()
        work = forward
        if words[0] == "gemm":
            work = lambda: torch.mm(gemm_lhs, gemm_rhs)
            words = words[1:]
        count = int(words[0])
        started = time.perf_counter()
        with torch.inference_mode():
            for _ in range(count):
                work()
        print(time.perf_counter() - started, flush=True)


if __name__ == "__main__":
    main()
