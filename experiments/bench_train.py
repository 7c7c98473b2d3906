"""Benchmark one training step (eq. 7, AdamW): tokens/s, model FLOPs per token, MFU, compile time and
memory, for a grid of model shapes; compile time against depth (flat under the layer scan); and, with
--compare-hf, the same step side by side with Hugging Face transformers on CPU.

    python experiments/bench_train.py [--presets gpt2_124m,llama_124m,smollm2] [--batch 8] [--seq 1024]
        [--dtype bfloat16] [--attention fused] [--remat none] [--logits-chunk 0] [--steps 10]
        [--depths 2,4,8,16] [--outdir runs/bench_train]

    python experiments/bench_train.py --presets smollm2 --batch 4 --seq 256 --dtype float32 --compare-hf
        --pin one,both [--arlm-variants reference/none/0,fused/dots/64] [--steps 10] [--repeats 1]

Model FLOPs per token (training: forward + backward, no rematerialisation counted):

    F = 6 N + 12 L T d_attn          N: parameters in matmuls (every layer's weights and the output
                                     projection V·D; not the input embedding lookup, not norms)
                                     L layers, T the sequence length, d_attn = H · d_head

(Kaplan et al. 2020; PaLM's appendix B). For a mixture of experts N counts the k routed experts a
token uses, not all E. MFU = tokens/s · F / peak, with the peak of the device (bf16 dense tensor-core
figures for GPUs and TPUs; on CPU a float32 GEMM measured here, `cpu_gemm_peak`).

Memory: XLA's accounting of the compiled step (arguments + outputs + temporaries, the donated state
counted once; on GPU also the allocator's peak). Writes bench_train.json into --outdir.

Side by side with transformers (--compare-hf; CPU, float32 only). One set of weights (arlm's init,
seed 0) is written once with `arlm.checkpoints.save_hf`; both systems read that directory. Each
measurement is its own fresh subprocess, arlm and transformers alternating, under each --pin mode:

    one    the process's affinity mask is one core (set by its first statement, so every thread XLA or
           torch starts is confined to it), torch.set_num_threads(1), and XLA_FLAGS / OMP / MKL asking for
           one thread. On jax 0.10 XLA:CPU sizes its pools from the affinity mask; the XLA_FLAGS
           `--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1` are accepted but do
           not by themselves stop a matmul using every core (measured), so the mask is the limit.
    both   every core this process may use, default threads.

Both run the same batch of random tokens (seed 0), the same next-token cross-entropy (mean over B·T)
and the same AdamW (`AdamW`: lr, betas, eps, decoupled weight decay); transformers runs in train mode
with dropout off, its default attention (SDPA), use_cache=False. Per run: the first step's loss (before
any update: both systems must agree, `LOSS_RTOL`), the median over --steps timed steps after --warmup
untimed ones (arlm's compile is timed apart), tokens/s, and peak memory from /proc/self/status:
the peak resident set is reset (/proc/self/clear_refs) once imports and the weights are loaded, and
peak_step_mib = the highest RSS during the timed steps − that baseline (optimizer state, gradients,
activations, compiled program), peak_run_mib = the same over the whole run (arlm: including the
compile). os.getloadavg() is recorded before and after every run. arlm runs every --arlm-variants
setting, attention_impl/remat/logits_chunk of `pretrain_loss` (all exact: the same loss and gradients);
the default pairs arlm's defaults (reference/none/0) with the leanest and fastest measured on SmolLM2's
shape (fused/dots/64). Before each pin mode's runs a child measures the float32 GEMM ceiling of those
cores in jax and torch (`gemm_ceiling`), the bound for every run's model FLOP/s (F above × tokens/s).
Writes bench_train.json ("compare_hf") and bench_train.md (the tables) into --outdir.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

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
    "tiny_gpt2": lambda seq: ModelConfig.gpt2(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=seq),
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


def best_seconds(run: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls of `run` (which must wait for its result), after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_gemm_peak(n: int = 1024, repeats: int = 5) -> float:
    """The best float32 FLOP/s of an n×n×n matmul on this machine (compiled once, best of `repeats`)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    return 2.0 * n ** 3 / best_seconds(lambda: f(a).block_until_ready(), repeats)


@dataclasses.dataclass(frozen=True)
class AdamW:
    """One AdamW for both systems: p ← p − lr·(m̂ / (√v̂ + eps) + weight_decay·p), with m̂, v̂ the
    bias-corrected moments of decay b1, b2 (`optax.adamw` and `torch.optim.AdamW` compute this update)."""

    lr: float = 1e-4
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01

    def for_optax(self) -> optax.GradientTransformation:
        return optax.adamw(self.lr, b1=self.b1, b2=self.b2, eps=self.eps, weight_decay=self.weight_decay)

    def for_torch(self, parameters: Any) -> Any:
        import torch
        return torch.optim.AdamW(parameters, lr=self.lr, betas=(self.b1, self.b2), eps=self.eps,
                                 weight_decay=self.weight_decay)


def random_tokens(vocab_size: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """int32 [B, T + 1] uniform token ids: inputs are [:, :-1], next-token targets [:, 1:]."""
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, seq + 1)).astype(np.int32)


def compile_train_step(config: ModelConfig, params: Any, optimizer: optax.GradientTransformation,
                       tokens_BxT1: np.ndarray, logits_chunk: int = 0) -> tuple[Callable[[], float], dict[str, Any]]:
    """arlm's train step (eq. 7, `make_train_step`, state donated) compiled for one batch on one device.

    Returns (step, info): step() runs one update on that batch and returns its loss (computed before
    the update); info holds compile_s and XLA's accounting of the compiled step's memory. `params`
    become the state without a copy and are donated: the caller's arrays are gone after the first step.
    """
    mesh = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    state, sharding = state_from_params(params, optimizer, mesh, MeshConfig(data=1), seed=0)
    step = make_train_step(lambda p, b: pretrain_loss(config, p, b, logits_chunk=logits_chunk), optimizer, sharding,
                           batch_sharding(mesh))
    tokens = jnp.asarray(tokens_BxT1, jnp.int32)
    data = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    info = {"compile_s": compile_s,
            "xla_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                          - mem.alias_size_in_bytes) if mem else None,
            "xla_temp_bytes": mem.temp_size_in_bytes if mem else None}
    holder = {"state": state}

    def run() -> float:
        holder["state"], metrics = compiled(holder["state"], data)
        return float(metrics["loss"])          # waits for the step
    return run, info


def bench_step(config: ModelConfig, batch: int, seq: int, steps: int, peak: float | None,
               logits_chunk: int = 0) -> dict[str, Any]:
    """Compile and time `steps` AdamW steps of eq. 7 on random tokens; tokens/s is the median step's."""
    params = arlm.init_params(config, jax.random.PRNGKey(0))
    run, info = compile_train_step(config, params, AdamW().for_optax(), random_tokens(config.vocab_size, batch, seq),
                                   logits_chunk)
    times, losses = [], []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        losses.append(run())
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    flops = model_flops_per_token(config, params, seq)
    tok_s = batch * seq / step_s
    stats = jax.devices()[0].memory_stats() or {}
    return {"n_matmul_params": matmul_params(config, params), "flops_per_token": flops,
            "compile_s": info["compile_s"], "step_s": step_s, "tokens_per_s": tok_s, "model_flops_per_s": tok_s * flops,
            "mfu": tok_s * flops / peak if peak else None, "xla_bytes": info["xla_bytes"],
            "device_peak_bytes": stats.get("peak_bytes_in_use"), "loss": losses[-1]}


def compile_time_vs_depth(config: ModelConfig, depths: list[int], batch: int, seq: int) -> list[dict[str, float]]:
    """Compile time of the train step at each depth (the layer scan compiles one block whatever L is)."""
    return [{"n_layers": d, "compile_s": bench_step(config.replace(n_layers=d), batch, seq, 1, None)["compile_s"]}
            for d in depths]


# --------------------------------------------------------------------------- side by side with transformers (CPU)

LOSS_RTOL = 1e-4                  # first-step losses of the two systems (same weights, same batch) must agree
ONE_CORE_XLA_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
WORKER_MARK = "BENCH_TRAIN_RESULT "
DEFAULT_VARIANTS = "reference/none/0,fused/dots/64"


@dataclasses.dataclass(frozen=True)
class ArlmVariant:
    """arlm's exact settings in a comparison: `ModelConfig.attention_impl`, `ModelConfig.remat` and
    `pretrain_loss`'s logits_chunk (0: whole logits); written "attention/remat/chunk"."""

    attention: str = "reference"
    remat: str = "none"
    logits_chunk: int = 0

    @classmethod
    def parse(cls, text: str) -> "ArlmVariant":
        parts = text.split("/")
        if len(parts) != 3:
            raise ValueError(f"an arlm variant is attention/remat/logits_chunk, e.g. fused/dots/64; got {text!r}")
        return cls(parts[0], parts[1], int(parts[2]))

    def apply(self, config: ModelConfig) -> ModelConfig:
        return config.replace(attention_impl=self.attention, remat=self.remat)


def _status_kib(field: str) -> int | None:
    """A `/proc/self/status` field in KiB (VmRSS: resident now, VmHWM: its peak), None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM; ru_maxrss where /proc is missing: KiB, bytes on macOS), KiB."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1024 if sys.platform == "darwin" else 1)


def reset_peak_rss() -> int:
    """Reset the peak resident set to the current one (Linux: "5" to /proc/self/clear_refs) and return it, KiB."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass
    rss = _status_kib("VmRSS")
    return rss if rss is not None else peak_rss_kib()


def write_hf_weights(config: ModelConfig, directory: str, seed: int = 0) -> str:
    """arlm's initial weights for `config` (float32, `seed`) as a Hugging Face directory both systems load."""
    from arlm.checkpoints import save_hf
    params = arlm.init_params(config.replace(dtype="float32"), jax.random.PRNGKey(seed))
    save_hf(directory, config, jax.tree_util.tree_map(np.asarray, params))
    return directory


def load_arlm_params(config: ModelConfig, hf_dir: str) -> Any:
    """The weights of `hf_dir` as arlm params on the default device (the file's shapes checked against `config`)."""
    from arlm.checkpoints import load_hf_dir
    loaded, params, _ = load_hf_dir(hf_dir)
    shape = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "tie_embeddings",
             "norm", "mlp", "pos_embedding")
    if any(getattr(loaded, k) != getattr(config, k) for k in shape):
        raise ValueError(f"{hf_dir} holds a different model than {config}")
    params = jax.device_put(params)
    jax.block_until_ready(params)
    return params


def load_hf_model(hf_dir: str) -> Any:
    """`transformers.AutoModelForCausalLM` from `hf_dir` in float32, train mode, every dropout set to 0."""
    import torch
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def hf_train_step(model: Any, adamw: AdamW, tokens_BxT1: np.ndarray) -> Callable[[], float]:
    """transformers' side of the comparison: step() = one AdamW update of the mean next-token cross-entropy
    on the batch (logits of every position, as arlm), returning the loss before the update."""
    import torch
    optimizer = adamw.for_torch(model.parameters())
    tokens = torch.from_numpy(tokens_BxT1.astype(np.int64))
    inputs_BxT, targets_N = tokens[:, :-1], tokens[:, 1:].reshape(-1)
    vocab = model.config.vocab_size

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        logits_BxTxV = model(input_ids=inputs_BxT, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits_BxTxV.reshape(-1, vocab), targets_N)
        loss.backward()
        optimizer.step()
        return float(loss.detach())
    return step


def time_steps(step: Callable[[], float], warmup: int, steps: int, baseline_kib: int) -> dict[str, Any]:
    """Run `warmup` untimed then `steps` timed steps; step times, losses, CPU use and peak memory over baseline."""
    losses = [step() for _ in range(warmup)]
    peak_run_kib = peak_rss_kib()
    reset_peak_rss()
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    cpu_s = time.process_time() - cpu0
    peak_step_kib = peak_rss_kib()
    return {"step_s": statistics.median(times), "step_times": times, "losses": losses, "loss_first": losses[0],
            "cpu_per_wall": cpu_s / sum(times), "baseline_mib": baseline_kib / 1024,
            "peak_step_mib": (peak_step_kib - baseline_kib) / 1024,
            "peak_run_mib": (max(peak_run_kib, peak_step_kib) - baseline_kib) / 1024,
            "peak_rss_mib": max(peak_run_kib, peak_step_kib) / 1024}


def gemm_ceiling(one_thread: bool, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The best float32 FLOP/s of an n×n×n matmul on the cores this process may use, in jax (`cpu_gemm_peak`)
    and in torch: what a training step of mostly matmuls can at most reach."""
    import torch
    if one_thread:
        torch.set_num_threads(1)
    a = torch.ones(n, n)
    torch_flops = 2.0 * n ** 3 / best_seconds(lambda: a @ a, repeats)
    return {"jax_gemm_flops": cpu_gemm_peak(n, repeats), "torch_gemm_flops": torch_flops}


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh, already pinned) process: load the weights, reset the peak RSS, train.
    System "gemm" instead measures the float32 matmul ceiling of these cores (`gemm_ceiling`)."""
    one_core = spec["pin"] == "one"
    if spec["system"] == "gemm":
        return dict(gemm_ceiling(one_core), cpus=sorted(os.sched_getaffinity(0)))
    adamw = AdamW(**spec["adamw"])
    config = PRESETS[spec["preset"]](spec["seq"]).replace(dtype="float32")
    tokens = random_tokens(config.vocab_size, spec["batch"], spec["seq"])
    info: dict[str, Any] = {}
    if spec["system"] == "transformers":
        import torch
        import transformers
        if one_core:
            torch.set_num_threads(1)
        model = load_hf_model(spec["hf_dir"])
        baseline = reset_peak_rss()
        step = hf_train_step(model, adamw, tokens)
        info.update(threads=torch.get_num_threads(), version=transformers.__version__,
                    attention=model.config._attn_implementation)
    else:
        variant = ArlmVariant.parse(spec["variant"])
        config = variant.apply(config)
        params = load_arlm_params(config, spec["hf_dir"])
        baseline = reset_peak_rss()
        step, compiled = compile_train_step(config, params, adamw.for_optax(), tokens, variant.logits_chunk)
        del params
        info.update(compiled, version=jax.__version__)
    result = time_steps(step, spec["warmup"], spec["steps"], baseline)
    result.update(info, cpus=sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                  os_threads=len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None)
    return result


def run_isolated(spec: dict[str, Any], cpus: set[int], timeout_s: float) -> dict[str, Any]:
    """`worker(spec)` in a fresh Python whose affinity mask is `cpus` from its first statement (before jax,
    torch or any thread pool exists); the load average (1, 5, 15 min) is read before and after."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if spec["pin"] == "one":
        env.update(ONE_THREAD_ENV, XLA_FLAGS=(env.get("XLA_FLAGS", "") + " " + ONE_CORE_XLA_FLAGS).strip())
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    launch = (f"import os, runpy, sys; os.sched_setaffinity(0, {sorted(cpus)!r}); "
              f"sys.argv = [{os.path.abspath(__file__)!r}, '--worker', {json.dumps(spec)!r}]; "
              f"runpy.run_path(sys.argv[0], run_name='__main__')")      # the mask first, before any import
    proc = subprocess.run([sys.executable, "-c", launch], env=env, capture_output=True, text=True, timeout=timeout_s)
    wall_s = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(WORKER_MARK)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{spec['system']} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(lines[-1][len(WORKER_MARK):])
    result.update({k: spec[k] for k in ("preset", "pin", "system", "variant", "batch", "seq")}, wall_s=wall_s,
                  load_avg_before=list(load_before), load_avg_after=list(os.getloadavg()))
    if "step_s" in result:
        result["tokens_per_s"] = spec["batch"] * spec["seq"] / result["step_s"]
    return result


def run_order(variants: list[str], repeat: int) -> list[tuple[str, str | None]]:
    """The runs of one repeat, arlm and transformers alternating (transformers second; reversed on odd repeats)."""
    order: list[tuple[str, str | None]] = [("arlm", variants[0]), ("transformers", None)]
    order += [("arlm", v) for v in variants[1:]]
    return order[::-1] if repeat % 2 else order


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per preset, pin and arlm variant: medians over repeats, speed and memory against transformers, and the
    first-step losses' relative difference."""
    rows = []
    keys = sorted({(r["preset"], r["pin"]) for r in runs}, key=lambda k: (k[0], k[1] != "one"))
    for preset, pin in keys:
        group = [r for r in runs if r["preset"] == preset and r["pin"] == pin]
        hf = [r for r in group if r["system"] == "transformers"]
        if not hf:
            continue
        hf_step = statistics.median(r["step_s"] for r in hf)
        hf_peak = statistics.median(r["peak_step_mib"] for r in hf)
        hf_loss = hf[0]["loss_first"]
        for variant in dict.fromkeys(r["variant"] for r in group if r["system"] == "arlm"):
            mine = [r for r in group if r["system"] == "arlm" and r["variant"] == variant]
            step_s = statistics.median(r["step_s"] for r in mine)
            peak = statistics.median(r["peak_step_mib"] for r in mine)
            rel = abs(mine[0]["loss_first"] - hf_loss) / abs(hf_loss)
            rows.append({"preset": preset, "pin": pin, "variant": variant, "arlm_step_s": step_s,
                         "hf_step_s": hf_step, "speedup": hf_step / step_s, "arlm_peak_step_mib": peak,
                         "hf_peak_step_mib": hf_peak, "peak_ratio": peak / hf_peak,
                         "arlm_peak_run_mib": statistics.median(r["peak_run_mib"] for r in mine),
                         "hf_peak_run_mib": statistics.median(r["peak_run_mib"] for r in hf),
                         "loss_first_arlm": mine[0]["loss_first"], "loss_first_hf": hf_loss, "loss_rel_diff": rel,
                         "loss_agrees": rel <= LOSS_RTOL,
                         "load_avg": [r["load_avg_before"] for r in mine + hf]})
    return rows


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def markdown_table(result: dict[str, Any]) -> str:
    """The runs (one line each, load average before → after beside every figure) and the summary, as markdown."""
    lines = [f"Training step, arlm vs transformers {result['transformers_version']} (jax {result['jax_version']}), "
             f"CPU ({result['cpus']} cores), float32, batch {result['batch']} × seq {result['seq']}, "
             f"median of {result['steps']} steps after {result['warmup']} warm-up; AdamW {result['adamw']}.", "",
             "| preset | cores | system | attention/remat/chunk | step s | tokens/s | model GFLOP/s "
             "| peak step MiB | peak run MiB | first loss | load avg before → after |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    lines[1:1] = [f"Float32 GEMM ceiling (2048³), cores={pin}: {c['jax_gemm_flops'] / 1e9:.0f} GFLOP/s in jax, "
                  f"{c['torch_gemm_flops'] / 1e9:.0f} in torch (load {_load(c['load_avg_before'])})."
                  for pin, c in result.get("gemm_ceiling", {}).items()]
    for r in result["runs"]:
        lines.append(f"| {r['preset']} | {r['pin']} | {r['system']} | {r['variant'] or '-'} | {r['step_s']:.3f} "
                     f"| {r['tokens_per_s']:.0f} | {r.get('model_flops_per_s', 0) / 1e9:.0f} "
                     f"| {r['peak_step_mib']:.0f} | {r['peak_run_mib']:.0f} "
                     f"| {r['loss_first']:.6f} | {_load(r['load_avg_before'])} → {_load(r['load_avg_after'])} |")
    lines += ["", "| preset | cores | arlm attention/remat/chunk | speed × transformers "
              "| peak step arlm / transformers MiB | first-loss rel. diff | load avg (1 min) of these runs |",
              "|---|---|---|---:|---|---:|---|"]
    for s in result["summary"]:
        loads = ", ".join(f"{la[0]:.2f}" for la in s["load_avg"])
        lines.append(f"| {s['preset']} | {s['pin']} | {s['variant']} | {s['speedup']:.2f}× "
                     f"| {s['arlm_peak_step_mib']:.0f} / {s['hf_peak_step_mib']:.0f} ({s['peak_ratio']:.2f}) "
                     f"| {s['loss_rel_diff']:.1e} | {loads} |")
    return "\n".join(lines) + "\n"


def compare_hf(presets: list[str], batch: int, seq: int, steps: int, warmup: int, pins: list[str],
               variants: list[str], repeats: int = 1, adamw: AdamW = AdamW(), workdir: str | None = None,
               timeout_s: float = 3600.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """arlm against transformers on CPU: for each preset and pin mode, `repeats` rounds of fresh-process runs
    (`run_order`), every run recorded with its load average; returns {"runs", "summary", ...}."""
    import transformers
    available = sorted(os.sched_getaffinity(0))
    cpu_sets = {"one": {available[0]}, "both": set(available)}
    unknown = set(pins) - set(cpu_sets)
    if unknown:
        raise ValueError(f"--pin takes one and/or both; got {sorted(unknown)}")
    for v in variants:
        ArlmVariant.parse(v)
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="bench_train_hf_")
    root = workdir or tmp.name
    runs: list[dict[str, Any]] = []
    ceilings: dict[str, dict[str, Any]] = {}
    flops: dict[str, float] = {}
    try:
        for preset in presets:
            config = PRESETS[preset](seq)
            shapes = jax.eval_shape(lambda c=config: arlm.init_params(c, jax.random.PRNGKey(0)))
            flops[preset] = model_flops_per_token(config, shapes, seq)
            hf_dir = write_hf_weights(config, os.path.join(root, f"hf_{preset}_seq{seq}"))
            gc.collect()
            for pin in pins:
                if pin not in ceilings:
                    spec = {"preset": preset, "pin": pin, "system": "gemm", "variant": None, "batch": 0, "seq": 0}
                    ceilings[pin] = run_isolated(spec, cpu_sets[pin], timeout_s)
                    log(f"cores={pin}: float32 GEMM ceiling {ceilings[pin]['jax_gemm_flops'] / 1e9:.0f} GFLOP/s "
                        f"(jax), {ceilings[pin]['torch_gemm_flops'] / 1e9:.0f} GFLOP/s (torch), "
                        f"load {_load(ceilings[pin]['load_avg_before'])}")
                for repeat in range(repeats):
                    for system, variant in run_order(variants, repeat):
                        spec = {"preset": preset, "pin": pin, "system": system, "variant": variant, "batch": batch,
                                "seq": seq, "steps": steps, "warmup": warmup, "hf_dir": hf_dir,
                                "adamw": dataclasses.asdict(adamw)}
                        r = run_isolated(spec, cpu_sets[pin], timeout_s)
                        r.update(repeat=repeat, model_flops_per_s=r["tokens_per_s"] * flops[preset])
                        runs.append(r)
                        log(f"{preset} {pin:>4} {system:>12} {variant or '':>18}: {r['step_s']:.3f} s/step, "
                            f"{r['tokens_per_s']:.0f} tokens/s, peak +{r['peak_step_mib']:.0f} MiB "
                            f"(run +{r['peak_run_mib']:.0f}), loss {r['loss_first']:.6f}, "
                            f"load {_load(r['load_avg_before'])} → {_load(r['load_avg_after'])}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    summary = summarise(runs)
    for s in summary:
        log(f"{s['preset']} {s['pin']:>4} arlm {s['variant']}: {s['speedup']:.2f}× transformers' speed, peak "
            f"{s['arlm_peak_step_mib']:.0f} vs {s['hf_peak_step_mib']:.0f} MiB, first loss rel. diff "
            f"{s['loss_rel_diff']:.1e}{'' if s['loss_agrees'] else '  (DISAGREES)'}")
    return {"batch": batch, "seq": seq, "steps": steps, "warmup": warmup, "pins": pins, "variants": variants,
            "repeats": repeats, "adamw": dataclasses.asdict(adamw), "cpus": len(available),
            "one_core_env": {"XLA_FLAGS": ONE_CORE_XLA_FLAGS, **ONE_THREAD_ENV, "torch.set_num_threads": 1},
            "jax_version": jax.__version__, "transformers_version": transformers.__version__,
            "flops_per_token": flops, "gemm_ceiling": ceilings, "runs": runs, "summary": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="gpt2_124m,llama_124m,smollm2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--attention", default="fused", choices=("reference", "fused"))
    ap.add_argument("--remat", default="none", choices=("none", "full", "dots"))
    ap.add_argument("--logits-chunk", type=int, default=0, help="pretrain_loss's logits_chunk (0: whole logits)")
    ap.add_argument("--depths", default="2,4,8,16", help="compile time against depth, on the first preset")
    ap.add_argument("--outdir", default="runs/bench_train")
    ap.add_argument("--compare-hf", action="store_true",
                    help="only the side by side with transformers on CPU (float32), each run in its own process")
    ap.add_argument("--pin", default="one,both", help="with --compare-hf: one (one core each) and/or both (all cores)")
    ap.add_argument("--arlm-variants", default=DEFAULT_VARIANTS,
                    help="with --compare-hf: arlm settings attention/remat/logits_chunk, comma-separated")
    ap.add_argument("--warmup", type=int, default=1, help="with --compare-hf: untimed steps before the timed ones")
    ap.add_argument("--repeats", type=int, default=1, help="with --compare-hf: rounds of alternating runs")
    ap.add_argument("--timeout", type=float, default=3600.0, help="with --compare-hf: seconds allowed per run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        result = worker(json.loads(args.worker))
        print(WORKER_MARK + json.dumps(result), flush=True)
        return result
    os.makedirs(args.outdir, exist_ok=True)
    presets = [p for p in args.presets.split(",") if p]
    if args.compare_hf:
        if args.dtype != "float32":
            raise SystemExit("--compare-hf runs float32 (transformers' side is float32): pass --dtype float32")
        out = {"load_avg": os.getloadavg(),
               "compare_hf": compare_hf(presets, args.batch, args.seq, args.steps, args.warmup,
                                        [p for p in args.pin.split(",") if p],
                                        [v for v in args.arlm_variants.split(",") if v], args.repeats,
                                        timeout_s=args.timeout)}
        with open(os.path.join(args.outdir, "bench_train.json"), "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)
        table = markdown_table(out["compare_hf"])
        with open(os.path.join(args.outdir, "bench_train.md"), "w", encoding="utf-8") as f:
            f.write(table)
        print(table, flush=True)
        return out
    device = jax.devices()[0]
    peak = device_peak_flops(device.device_kind)
    peak_source = "table (bf16 dense)"
    if peak is None and device.platform == "cpu":
        peak, peak_source = cpu_gemm_peak(), "measured float32 GEMM"
    out = {"device": device.device_kind, "platform": device.platform, "peak_flops": peak, "peak_source": peak_source,
           "dtype": args.dtype, "attention": args.attention, "remat": args.remat, "logits_chunk": args.logits_chunk,
           "batch": args.batch, "seq": args.seq, "load_avg": os.getloadavg(), "results": {}}
    for name in presets:
        cfg = PRESETS[name](args.seq).replace(dtype=args.dtype, attention_impl=args.attention, remat=args.remat)
        out["results"][name] = bench_step(cfg, args.batch, args.seq, args.steps, peak, args.logits_chunk)
        r = out["results"][name]
        print(f"{name}: {r['tokens_per_s']:.0f} tokens/s, {r['flops_per_token'] / 1e9:.2f} GFLOP/token, "
              f"MFU {r['mfu']:.3f}, compile {r['compile_s']:.1f} s", flush=True)
    if args.depths and presets:
        base = PRESETS[presets[0]](args.seq).replace(dtype=args.dtype, attention_impl=args.attention,
                                                      remat=args.remat)
        out["compile_vs_depth"] = compile_time_vs_depth(base, [int(d) for d in args.depths.split(",")],
                                                        args.batch, args.seq)
    with open(os.path.join(args.outdir, "bench_train.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
