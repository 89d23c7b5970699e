#!/usr/bin/env python3
"""Greedy generation with a transformers model whose experts run on moemesh.

For each model family moemesh.attach covers (every family moemesh serves but
Llama 4, whose experts take inputs already scaled by their weights), this
builds a tiny random model,
saves it with `save_pretrained`, serves it with `moemesh up --model DIR`,
and generates 8 tokens greedily from a fixed prompt twice: with the model
all local, then after `moemesh.attach(model, client)` (routed experts on
the cluster; gates, shared experts and attention local). The tokens must be
identical and every step's logits within 1e-4; it prints one row per family
and exits 1 if any family differs.

    pip install torch transformers target/wheels/moemesh-*.whl
    cargo build -p moemesh
    python3 examples/generate.py [--families mixtral deepseek_v3] [--one-hop]

With --one-hop the client follows the coordinators and sends to the expert
nodes itself (`moemesh.Client(coordinator=..., checkpoint=DIR)`) instead of
going through the router.

The moemesh binary is MOEMESH_BIN, or target/debug/moemesh of this
repository.
"""

import argparse
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import transformers

import moemesh

REPO = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8
PROMPT = [[5, 17, 42, 99, 3, 250, 77, 12]]
LOGIT_TOLERANCE = 1e-4
# A cold debug cluster on a busy machine loads slowly.
STARTUP_SECONDS = 600
# Shared by every family: small enough to build and serve in seconds.
COMMON = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)


def tiny_config(family):
    """A config of a few layers and experts of `family`, some layers dense
    where the family has dense layers."""
    if family == "mixtral":
        return transformers.MixtralConfig(
            **COMMON, intermediate_size=96, num_hidden_layers=2, num_local_experts=8,
            num_experts_per_tok=2,
        )
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(
            **COMMON, intermediate_size=128, moe_intermediate_size=48,
            shared_expert_intermediate_size=80, num_hidden_layers=3, num_experts=8,
            num_experts_per_tok=4, norm_topk_prob=False, mlp_only_layers=[0],
        )
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=64,
            num_hidden_layers=2, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
        )
    if family == "deepseek_v3":
        return transformers.DeepseekV3Config(
            **dict(COMMON, num_key_value_heads=4), intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=2,
            num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
            norm_topk_prob=True, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16,
        )
    if family == "olmoe":
        return transformers.OlmoeConfig(
            **COMMON, intermediate_size=96, num_hidden_layers=2, num_experts=8,
            num_experts_per_tok=3, norm_topk_prob=False,
        )
    if family == "glm4_moe":
        return transformers.Glm4MoeConfig(
            **COMMON, head_dim=16, intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=1,
            num_experts_per_tok=4, n_group=1, topk_group=1, routed_scaling_factor=2.5,
            norm_topk_prob=True,
        )
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config(
            **dict(COMMON, num_key_value_heads=4), intermediate_size=128, moe_intermediate_size=32,
            num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=16, n_shared_experts=2,
            num_experts_per_tok=4, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=16.0, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16,
        )
    return tiny_config_of_the_newer_families(family)


def tiny_config_of_the_newer_families(family):
    """`tiny_config` for PhiMoE, Granite MoE, DBRX, gpt-oss and LongCat-Flash."""
    if family == "phimoe":
        return transformers.PhimoeConfig(
            **COMMON, intermediate_size=96, num_hidden_layers=2, num_local_experts=8,
            num_experts_per_tok=2, router_jitter_noise=0.1,
        )
    if family in ("granitemoe", "granitemoeshared"):
        shared = family == "granitemoeshared"
        config_class = transformers.GraniteMoeSharedConfig if shared else transformers.GraniteMoeConfig
        return config_class(
            **COMMON, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
            num_experts_per_tok=3, **({"shared_intermediate_size": 80} if shared else {}),
        )
    if family == "dbrx":
        return transformers.DbrxConfig(
            vocab_size=COMMON["vocab_size"], d_model=COMMON["hidden_size"], n_heads=4, n_layers=2,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 3},
        )
    if family == "gpt_oss":
        return transformers.GptOssConfig(
            **COMMON, head_dim=16, intermediate_size=32, num_hidden_layers=2, num_local_experts=8,
            num_experts_per_tok=4,
        )
    if family == "longcat_flash":
        return transformers.LongcatFlashConfig(
            vocab_size=COMMON["vocab_size"], hidden_size=COMMON["hidden_size"], num_attention_heads=4,
            num_layers=2, n_routed_experts=8, zero_expert_num=4, moe_topk=3, expert_ffn_hidden_size=32,
            ffn_hidden_size=96, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8, head_dim=8, qk_nope_head_dim=16,
            v_head_dim=16,
        )
    raise ValueError(f"unknown family {family!r}")


FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "olmoe", "glm4_moe", "deepseek_v2", "phimoe",
    "granitemoe", "granitemoeshared", "dbrx", "gpt_oss", "longcat_flash",
)


def tiny_model(family, seed):
    """A random model of `family`, its weights large enough that the experts
    matter to the logits (transformers' initialisation makes them tiny)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.copy_(0.15 * torch.randn_like(parameter))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # Large enough to change which experts and groups win.
                buffer.copy_(0.3 * torch.randn_like(buffer))
    return model


class Cluster:
    """`moemesh up` serving one model directory, until `stop`."""

    def __init__(self, model_dir, log_path, one_hop=False):
        self.model_dir = model_dir
        self.one_hop = one_hop
        binary = os.environ.get("MOEMESH_BIN", str(REPO / "target" / "debug" / "moemesh"))
        arguments = [
            binary, "up", "--model", str(model_dir), "--expert-nodes", "2",
            "--router-addr", "127.0.0.1:0", "--threads-per-node", "1",
        ]
        # Without the caller's MOEMESH_* settings: the cluster makes its own secret.
        environment = {name: value for name, value in os.environ.items()
                       if not name.startswith("MOEMESH_")}
        self.log_path = log_path
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                arguments, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                env=environment, text=True,
            )
        self.router, self.coordinators, self.cluster_secret = self._read_urls_and_secret()

    def _read_urls_and_secret(self):
        """Reads stdout up to the cluster secret, the last line `moemesh up`
        prints once the cluster serves."""
        lines = queue.Queue()

        def read_lines():
            for line in self.process.stdout:
                lines.put(line.strip())
            lines.put(None)  # it closed its stdout: it exited

        threading.Thread(target=read_lines, daemon=True).start()
        router, coordinators = None, None
        while True:
            try:
                line = lines.get(timeout=STARTUP_SECONDS)
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                raise RuntimeError(f"moemesh up did not start; its log:\n{self.log_path.read_text()}")
            if line.startswith("router "):
                router = line.split(" ", 1)[1]
            elif line.startswith("export MOEMESH_COORDINATOR="):
                coordinators = line.split("=", 1)[1]
            elif line.startswith("export MOEMESH_CLUSTER_SECRET="):
                if router is None or coordinators is None:
                    self.stop()
                    raise RuntimeError("moemesh up printed no router or coordinator URL")
                return router, coordinators, line.split("=", 1)[1]

    def client(self):
        if self.one_hop:
            return moemesh.Client(coordinator=self.coordinators, checkpoint=self.model_dir,
                                  cluster_secret=self.cluster_secret)
        return moemesh.Client(self.router, cluster_secret=self.cluster_secret)

    def stop(self):
        """SIGTERM, then SIGKILL if it lingers; its members exit with it."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def greedy(model):
    """8 greedy tokens from PROMPT: (tokens, [steps, vocab] logits, seconds per token)."""
    prompt = torch.tensor(PROMPT)
    started = time.perf_counter()
    with torch.no_grad():
        output = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True, pad_token_id=0,
        )
    seconds = (time.perf_counter() - started) / NEW_TOKENS
    tokens = output.sequences[0, len(PROMPT[0]):].tolist()
    return tokens, torch.cat(output.logits), seconds


def compare(family, work_dir, one_hop):
    """Generates with `family`'s tiny model local and attached; one row of the table."""
    model = tiny_model(family, seed=FAMILIES.index(family))
    model_dir = work_dir / family
    model.save_pretrained(model_dir)
    cluster = Cluster(model_dir, work_dir / f"{family}.log", one_hop)
    try:
        client = cluster.client()
        greedy(model)  # warm-up: the first generate pays one-time setup
        local_tokens, local_logits, local_seconds = greedy(model)
        moemesh.attach(model, client)
        remote_layers = sum(getattr(module, "is_moemesh_remote", False)
                            for module in model.modules())
        remote_tokens, remote_logits, remote_seconds = greedy(model)
        moemesh.detach(model)
    finally:
        cluster.stop()
    return {
        "family": family,
        "remote_layers": remote_layers,
        "tokens_equal": local_tokens == remote_tokens,
        "max_logit_diff": (local_logits - remote_logits).abs().max().item(),
        "local_ms": local_seconds * 1e3,
        "attached_ms": remote_seconds * 1e3,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES),
                        help="model families to run (default: all)")
    parser.add_argument("--one-hop", action="store_true",
                        help="send to the expert nodes directly, following the coordinators")
    arguments = parser.parse_args()
    families = arguments.families
    transformers.utils.logging.disable_progress_bar()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"moemesh {moemesh.__version__}, {'one hop' if arguments.one_hop else 'through the router'}")
    with tempfile.TemporaryDirectory(prefix="moemesh-generate-") as work_dir:
        rows = [compare(family, Path(work_dir), arguments.one_hop) for family in families]
    header = f"{'family':<16} {'remote MoE layers':>17} {'tokens equal':>12} " \
             f"{'max logit diff':>15} {'ms/token local':>15} {'ms/token attached':>18}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['family']:<16} {row['remote_layers']:>17} {str(row['tokens_equal']):>12} "
              f"{row['max_logit_diff']:>15.2e} "
              f"{row['local_ms']:>15.2f} {row['attached_ms']:>18.2f}")
    failed = [row["family"] for row in rows if row["remote_layers"] == 0
              or not row["tokens_equal"] or row["max_logit_diff"] > LOGIT_TOLERANCE]
    if failed:
        print(f"differs from local generation: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"every family: identical tokens, logits within {LOGIT_TOLERANCE:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
