"""Benchmark one training step (eq. 7, AdamW): tokens/s, model FLOPs per token, MFU, compile time and
memory, for a grid of model shapes; and compile time against depth (flat under the layer scan).

    python experiments/bench_train.py [--presets gpt2_124m,llama_124m,smollm2] [--batch 8] [--seq 1024]
        [--dtype bfloat16] [--attention fused] [--remat none] [--steps 10] [--depths 2,4,8,16]
        [--outdir runs/bench_train]

Model FLOPs per token (training: forward + backward, no rematerialisation counted):

    F = 6 N + 12 L T d_attn          N: parameters in matmuls (every layer's weights and the output
                                     projection V·D; not the input embedding lookup, not norms)
                                     L layers, T the sequence length, d_attn = H · d_head

(Kaplan et al. 2020; PaLM's appendix B). For a mixture of experts N counts the k routed experts a
token uses, not all E. MFU = tokens/s · F / peak, with the peak of the device (bf16 dense tensor-core
figures for GPUs and TPUs; on CPU a float32 GEMM measured here, `cpu_gemm_peak`).

Memory: XLA's accounting of the compiled step (arguments + outputs + temporaries; on GPU also the
allocator's peak). Writes bench_train.json into --outdir. Not done here: transformers side by side
on CPU at these sizes (see `experiments/bench_generate.py` for the decode comparison).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import arlm  # noqa: E402
from arlm.config import ModelConfig  # noqa: E402
from arlm.objectives.lm import pretrain_loss  # noqa: E402
from arlm.sharding import MeshConfig, batch_sharding, make_mesh  # noqa: E402
from arlm.train.state import state_from_params  # noqa: E402
from arlm.train.step import make_train_step  # noqa: E402

# Peak dense bf16 FLOP/s by substring of jax's device_kind (first match wins).
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
              ("TPU v5p", 459e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12)]

PRESETS = {
    "gpt2_124m": lambda seq: ModelConfig.gpt2(vocab_size=50257, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
                                              max_seq_len=seq),
    "llama_124m": lambda seq: ModelConfig.llama(vocab_size=32000, d_model=768, n_layers=12, n_heads=12,
                                                n_kv_heads=4, d_ff=2048, max_seq_len=seq),
    "smollm2": lambda seq: ModelConfig.llama(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                                             d_ff=1536, max_seq_len=seq, tie_embeddings=True),
    "tiny": lambda seq: ModelConfig.llama(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                                          max_seq_len=seq),
}


def matmul_params(config: ModelConfig, params: Any) -> int:
    """N of the FLOPs formula: parameters of every matrix a token is multiplied by (layer weights, the
    output projection), routed experts counted k of E; norms, biases and the embedding lookup excluded."""
    n = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params["layers"])[0]:
        names = [getattr(p, "key", "") for p in path]
        last = str(names[-1])
        if leaf.ndim < 3 or last.endswith("_bias") or any("norm" in str(x) for x in names):   # [L, ...] matrices

            continue
        size = int(np.prod(leaf.shape[1:])) * config.n_layers
        if "moe" in names and last != "router":
            size = size * config.moe_top_k // config.n_experts
        n += size
    return n + config.vocab_size * config.d_model              # the unembedding (tied or not)


def model_flops_per_token(config: ModelConfig, params: Any, seq_len: int) -> float:
    """F = 6 N + 12 L T d_attn (module docstring)."""
    return 6.0 * matmul_params(config, params) + 12.0 * config.n_layers * seq_len * config.n_heads * config.head_dim


def device_peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


def cpu_gemm_peak(n: int = 1024, repeats: int = 5) -> float:
    """The best float32 FLOP/s of an n×n×n matmul on this machine (compiled once, best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def bench_step(config: ModelConfig, batch: int, seq: int, steps: int, peak: float | None) -> dict[str, Any]:
    """Compile and time `steps` AdamW steps of eq. 7 on random tokens; tokens/s is the median step's."""
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    params = arlm.init_params(config, jax.random.PRNGKey(0))
    optimizer = optax.adamw(1e-4)
    state, sharding = state_from_params(params, optimizer, mesh, MeshConfig(data=1), seed=0)
    step = make_train_step(lambda p, b: pretrain_loss(config, p, b), optimizer, sharding, batch_sharding(mesh))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1)), jnp.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    xla_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes) if mem else None
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, data)
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    flops = model_flops_per_token(config, params, seq)
    tok_s = batch * seq / step_s
    stats = jax.devices()[0].memory_stats() or {}
    return {"n_matmul_params": matmul_params(config, params), "flops_per_token": flops, "compile_s": compile_s,
            "step_s": step_s, "tokens_per_s": tok_s, "model_flops_per_s": tok_s * flops,
            "mfu": tok_s * flops / peak if peak else None, "xla_bytes": xla_bytes,
            "device_peak_bytes": stats.get("peak_bytes_in_use"), "loss": float(metrics["loss"])}


def compile_time_vs_depth(config: ModelConfig, depths: list[int], batch: int, seq: int) -> list[dict[str, float]]:
    """Compile time of the train step at each depth (the layer scan compiles one block whatever L is)."""
    return [{"n_layers": d, "compile_s": bench_step(config.replace(n_layers=d), batch, seq, 1, None)["compile_s"]}
            for d in depths]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="gpt2_124m,llama_124m,smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--attention", default="fused", choices=("reference", "fused"))
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--depths", default="2,4,8,16", help="compile time against depth, on the first preset")
    ap.add_argument("--outdir", default="runs/bench_train")
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    peak = device_peak_flops(device.device_kind)
    peak_source = "table (bf16 dense)"
    if peak is None and device.platform == "cpu":
        peak, peak_source = cpu_gemm_peak(), "measured float32 GEMM"
    out: dict[str, Any] = {"device": device.device_kind, "platform": device.platform, "peak_flops": peak,
                           "peak_source": peak_source, "dtype": args.dtype, "attention": args.attention,
                           "remat": args.remat, "batch": args.batch, "seq": args.seq, "load_avg": os.getloadavg(),
                           "results": {}}
    presets = [p for p in args.presets.split(",") if p]
    for name in presets:
        cfg = PRESETS[name](args.seq).replace(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
        out["results"][name] = bench_step(cfg, args.batch, args.seq, args.steps, peak)
        r = out["results"][name]
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, {r['flops_per_token'] / 1e9:.2f} GFLOP/token, "
              f"MFU {r['mfu']:.3f}, compile {r['compile_s']:.1f} s", flush=True)
    if args.depths and presets:
        base = PRESETS[presets[0]](args.seq).replace(dtype=args.dtype, attention_impl=args.attention,
                                                      remat=args.remat)
        out["compile_vs_depth"] = compile_time_vs_depth(base, [int(d) for d in args.depths.split(",")],
                                                        args.batch, args.seq)
    os.makedirs(args.outdir, exist_ok=True)
    with open(os.path.join(args.outdir, "bench_train.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
