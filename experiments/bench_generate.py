"""Benchmark KV-cache generation (eq. 17): per-token cost vs t, and SmolLM2-135M decode speed.

    python experiments/bench_generate.py [--quick] [--outdir runs/bench_generate]

(i)   A random Llama model (d=256, L=4, Δ=2048): the cost of producing the next token
      after t tokens, with the KV cache (one `forward_with_cache` step over t slots) and
      without it (`arlm.forward` over all t tokens, last logits), for t = 64 … 2048;
      log-log slopes, and total generation time (measured `arlm.generate` with the
      cache; the cache-free total integrated from the per-token curve).
(ii)  SmolLM2-135M-Instruct: `arlm.generate` (greedy, EOS ignored) against transformers'
      `generate(do_sample=False, min_new_tokens=max_new_tokens=N)` on the same float32
      weights, batch 1 and 8, interleaved repeats, medians; the achieved fraction of the
      memory-bandwidth floor at batch 1.
(iii) On a GPU, the same figures against the device's peak bandwidth.

Writes bench_generate.json, bench_generate.md and cache_scaling.png into --outdir.
Timings exclude compilation (every shape is run once before it is timed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory for torch too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import arlm  # noqa: E402
from arlm.config import ModelConfig  # noqa: E402
from arlm.inference import GREEDY, forward_with_cache, init_cache  # noqa: E402

# Peak memory bandwidth (bytes/s) by substring of jax's device_kind (first match wins).
GPU_PEAK_BW = [
    ("GH200", 4.0e12), ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
    ("L40", 0.864e12), ("L4", 0.3e12), ("A10G", 0.6e12), ("A10", 0.6e12), ("RTX 4090", 1.008e12),
    ("V100", 0.9e12), ("T4", 0.32e12),
]


def gpu_peak_bandwidth(device_kind: str) -> float | None:
    for name, bw in GPU_PEAK_BW:
        if name.lower() in device_kind.lower():
            return bw
    return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def loglog_slope(x, y) -> float:
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


# --------------------------------------------------------------------------------------------
# Memory bandwidth
# --------------------------------------------------------------------------------------------

def host_copy_bandwidth(mbytes: int = 512, repeats: int = 8) -> dict[str, float]:
    """np.copyto of an `mbytes` float32 array; bandwidth = (bytes read + bytes written) / best time."""
    src = np.ones(mbytes * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    best = min(timed(lambda: np.copyto(dst, src)) for _ in range(repeats))
    best_sum = min(timed(lambda: src.sum()) for _ in range(repeats))
    return dict(array_bytes=src.nbytes, copy_seconds=best, copy_bytes_per_s=2 * src.nbytes / best,
                sum_read_bytes_per_s=src.nbytes / best_sum)


def device_copy_bandwidth(mbytes: int = 1024, repeats: int = 10) -> dict[str, float]:
    """x ↦ x + 1 over an `mbytes` float32 device array; (read + write) / best time."""
    x = jnp.ones((mbytes * 2**20 // 4,), jnp.float32)
    f = jax.jit(lambda a: a + 1.0)
    jax.block_until_ready(f(x))
    best = min(timed(lambda: f(x)) for _ in range(repeats))
    return dict(array_bytes=int(x.nbytes), copy_seconds=best, copy_bytes_per_s=2 * x.nbytes / best)


# --------------------------------------------------------------------------------------------
# (i) Per-token cost with and without the cache
# --------------------------------------------------------------------------------------------

def scaling_benchmark(lengths: list[int], repeats: int, target_s: float, total_lengths: list[int]) -> dict:
    cfg = ModelConfig.llama(vocab_size=4096, d_model=256, n_layers=4, n_heads=4, n_kv_heads=4, d_ff=768,
                            max_seq_len=max(2048, max(lengths)))
    params = arlm.init_params(cfg, jax.random.PRNGKey(0))
    n_params = arlm.count_params(params)

    @jax.jit
    def cached_steps(params, cache, tok_Bx1, k):
        """k decode steps, each writing slot t-1 and attending to all t slots (index reset every step)."""
        def body(_, carry):
            c, tok = carry
            logits, c2 = forward_with_cache(cfg, params, c, tok)
            return c2.replace(index=c.index), jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
        return jax.lax.fori_loop(0, k, body, (cache, tok_Bx1))[1]

    @jax.jit
    def uncached_steps(params, tokens_BxT, k):
        """k cache-free steps: the whole t-token window through the model, last logits → argmax."""
        def body(_, toks):
            logits = arlm.forward(cfg, params, toks)[:, -1]
            return toks.at[:, -1].set(jnp.argmax(logits, -1).astype(jnp.int32))
        return jax.lax.fori_loop(0, k, body, tokens_BxT)

    rng = np.random.default_rng(0)
    rows = []
    for t in lengths:
        tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, t)), jnp.int32)
        cache_t = init_cache(cfg, 1, t).replace(index=jnp.int32(t - 1))                    # exactly t slots
        cache_max = init_cache(cfg, 1, cfg.max_seq_len).replace(index=jnp.int32(t - 1))   # fixed Δ slots
        tok = tokens[:, -1:]
        cases = {
            "cached": lambda k: cached_steps(params, cache_t, tok, jnp.int32(k)),
            "cached_fixed_window": lambda k: cached_steps(params, cache_max, tok, jnp.int32(k)),
            "uncached": lambda k: uncached_steps(params, tokens, jnp.int32(k)),
        }
        ks = {}
        for name, fn in cases.items():                 # compile, then size k so one run takes ~target_s
            jax.block_until_ready(fn(1))
            one = min(timed(lambda: fn(1)) for _ in range(2))
            ks[name] = int(np.clip(round(target_s / max(one, 1e-6)), 1, 256))
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for r in range(repeats):                        # interleaved
            for name, fn in (cases.items() if r % 2 == 0 else reversed(list(cases.items()))):
                samples[name].append(timed(lambda: fn(ks[name])) / ks[name])
        row = dict(t=t, steps_per_sample=ks)
        for name, s in samples.items():
            row[f"{name}_s_per_token"] = statistics.median(s)
            row[f"{name}_s_per_token_min"] = min(s)
        rows.append(row)
        log(f"  t={t:5d}  cached {row['cached_s_per_token'] * 1e3:8.3f} ms   fixed-Δ cache "
            f"{row['cached_fixed_window_s_per_token'] * 1e3:8.3f} ms   no cache "
            f"{row['uncached_s_per_token'] * 1e3:8.3f} ms")

    # Total time to produce a sequence of length T from an 8-token prompt: measured with arlm.generate
    # (cache of T slots), and integrated from the per-token curves (Σ_{t=8}^{T-1} cost(t), log-log interp.).
    ts = np.array([r["t"] for r in rows], float)

    def integrate(key: str, T: int) -> float:
        y = np.array([r[key] for r in rows], float)
        grid = np.arange(8, T)
        return float(np.exp(np.interp(np.log(grid), np.log(ts), np.log(y))).sum())

    totals = []
    prompt = rng.integers(0, cfg.vocab_size, (1, 8)).tolist()
    for T in total_lengths:
        n = T - 8
        run = lambda: arlm.generate(cfg, params, prompt, key=jax.random.PRNGKey(0), max_new_tokens=n,  # noqa: E731
                                    eos_id=None).tokens_BxN
        jax.block_until_ready(run())
        measured = statistics.median(timed(run) for _ in range(2))
        totals.append(dict(T=T, new_tokens=n, cached_generate_measured_s=measured,
                           cached_integrated_s=integrate("cached_s_per_token", T),
                           uncached_integrated_s=integrate("uncached_s_per_token", T)))
        log(f"  total T={T:5d}: arlm.generate {measured:.3f} s   integrated: cached "
            f"{totals[-1]['cached_integrated_s']:.3f} s, no cache {totals[-1]['uncached_integrated_s']:.3f} s")

    def slopes(key: str, xs, ys) -> dict[str, float]:
        tail = max(2, min(3, len(xs)))
        return {f"{key}_all": loglog_slope(xs, ys), f"{key}_tail{tail}": loglog_slope(xs[-tail:], ys[-tail:])}

    fits = {}
    for key in ("cached", "cached_fixed_window", "uncached"):
        fits.update(slopes(f"per_token_{key}", ts, [r[f"{key}_s_per_token"] for r in rows]))
    tt = [x["T"] for x in totals]
    if len(tt) >= 2:
        fits.update(slopes("total_cached_measured", tt, [x["cached_generate_measured_s"] for x in totals]))
        fits.update(slopes("total_uncached_integrated", tt, [x["uncached_integrated_s"] for x in totals]))
    return dict(model=cfg.to_dict(), n_params=n_params, per_token=rows, totals=totals, loglog_slopes=fits,
                notes=("per-token cost at t = one step producing token t+1 from t tokens of context. "
                       "'cached': forward_with_cache over a cache of exactly t slots; 'cached_fixed_window': "
                       "the same step with a Δ-slot cache (masked beyond t), which is what a single "
                       "preallocated cache costs; 'uncached': arlm.forward over the t-token window. "
                       "Each sample runs k identical steps in a compiled fori_loop (argmax fed back), "
                       "time/k; medians over interleaved repeats. Totals: 8-token prompt, T-8 new tokens; "
                       "'integrated' sums the interpolated per-token curve over t = 8..T-1."))


def _plain_ticks(ax) -> None:
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.xaxis.set_major_locator(LogLocator(base=2))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_scaling(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, totals = result["per_token"], result["totals"]
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    sl = result["loglog_slopes"]
    ax.loglog(t, [r["uncached_s_per_token"] * 1e3 for r in rows], "o-",
              label=f"no cache: forward over t tokens (slope {sl['per_token_uncached_all']:.2f})")
    ax.loglog(t, [r["cached_s_per_token"] * 1e3 for r in rows], "s-",
              label=f"KV cache of t slots (slope {sl['per_token_cached_all']:.2f})")
    ax.loglog(t, [r["cached_fixed_window_s_per_token"] * 1e3 for r in rows], "^--", alpha=0.7,
              label="KV cache of Δ slots (masked)")
    _plain_ticks(ax)
    ax.set_xlabel("context length t (tokens)")
    ax.set_ylabel("time per generated token (ms)")
    ax.set_title("per-token cost")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    if totals:
        T = [x["T"] for x in totals]
        ax.loglog(T, [x["uncached_integrated_s"] for x in totals], "o-", label="no cache (Σ per-token, estimated)")
        ax.loglog(T, [x["cached_integrated_s"] for x in totals], "s:", label="KV cache (Σ per-token, estimated)")
        ax.loglog(T, [x["cached_generate_measured_s"] for x in totals], "s-",
                  label="arlm.generate (measured)")
    _plain_ticks(ax)
    ax.set_xlabel("generated sequence length T")
    ax.set_ylabel("total generation time (s)")
    ax.set_title("total cost of a length-T sequence")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    cfg = result["model"]
    fig.suptitle(f"random Llama d={cfg['d_model']} L={cfg['n_layers']} Δ={cfg['max_seq_len']} "
                 f"({result['n_params'] / 1e6:.1f}M params), {jax.devices()[0].platform}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# (ii)/(iii) SmolLM2-135M: arlm.generate vs transformers.generate
# --------------------------------------------------------------------------------------------

def load_transformers(gguf_path: str, device: str):
    import functools
    import importlib

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:                                  # silence the GGUF converter's own progress bar
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
    except ImportError:
        pass
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32)
    return model.eval().to(device)


def set_hf_attention(model, impl: str) -> str:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl
    return model.config._attn_implementation


def smollm_benchmark(args, bw: dict, gpu: dict | None) -> dict:
    import torch

    from arlm.checkpoints import resolve

    path = resolve(args.model)
    t0 = time.perf_counter()
    loaded = arlm.load(args.model)
    cfg = loaded.config
    host_params = loaded.params
    params = jax.device_put(host_params)         # arlm.load returns numpy leaves; upload them once
    jax.block_until_ready(params)
    n_params = arlm.count_params(params)
    weight_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params)))
    log(f"arlm loaded {args.model} in {time.perf_counter() - t0:.1f} s: {n_params / 1e6:.1f}M params, "
        f"{weight_bytes / 1e6:.0f} MB")

    torch_device = "cuda" if gpu is not None and torch.cuda.is_available() else "cpu"
    hf = None
    if not args.skip_hf:
        t0 = time.perf_counter()
        hf = load_transformers(path, torch_device)
        log(f"transformers loaded in {time.perf_counter() - t0:.1f} s on {torch_device} "
            f"(torch threads {torch.get_num_threads()})")

    n_new, p_len = args.new_tokens, args.prompt_len
    rng = np.random.default_rng(1234)
    prompts = {b: rng.integers(100, 20000, (b, p_len)).astype(np.int32) for b in args.batches}

    def arlm_run(b: int, n: int, p=None) -> np.ndarray:
        out = arlm.generate(cfg, params if p is None else p, prompts[b], key=jax.random.PRNGKey(0),
                            max_new_tokens=n, sampler=GREEDY, eos_id=None)
        return np.asarray(jax.block_until_ready(out.tokens_BxN))

    def hf_run(b: int, n: int, impl: str) -> np.ndarray:
        set_hf_attention(hf, impl)
        x = torch.tensor(prompts[b], dtype=torch.long, device=torch_device)
        with torch.no_grad():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                              min_new_tokens=n, num_beams=1, temperature=None, top_p=None, top_k=None,
                              pad_token_id=0)
        if torch_device == "cuda":
            torch.cuda.synchronize()
        return out[:, p_len:].cpu().numpy()

    runners: dict[str, Callable[[int, int], np.ndarray]] = {"arlm": arlm_run}
    for impl in ([] if hf is None else args.hf_attn):
        runners[f"transformers_{impl}"] = lambda b, n, impl=impl: hf_run(b, n, impl)

    # Warm up every (system, batch, length) and check the greedy tokens agree.
    agreement = {}
    for b in args.batches:
        t0 = time.perf_counter()
        ref = arlm_run(b, n_new)
        arlm_run(b, 1)
        log(f"arlm.generate compiled for batch {b} in {time.perf_counter() - t0:.1f} s")
        for name, run in runners.items():
            if name == "arlm":
                continue
            toks = run(b, n_new)
            run(b, 1)
            agree = toks == ref
            first = [int(np.argmin(row)) if not row.all() else None for row in agree]
            agreement[f"{name}_batch{b}"] = dict(token_match_fraction=float(agree.mean()),
                                                 first_mismatch_per_row=first)

    # Interleaved timed repeats (order alternates each repeat); N new tokens and 1 new token.
    samples: dict[tuple[str, int, int], list[float]] = {}
    loadavg_per_repeat = []
    for r in range(args.repeats):
        order = list(runners.items()) if r % 2 == 0 else list(reversed(list(runners.items())))
        for b in args.batches:
            for name, run in order:
                for n in (n_new, 1):
                    gc.collect()
                    time.sleep(0.05)
                    samples.setdefault((name, b, n), []).append(timed(lambda: run(b, n)))
        loadavg_per_repeat.append(round(os.getloadavg()[0], 2))
        log(f"  repeat {r + 1}/{args.repeats}: " + "  ".join(
            f"{name}@{b} {b * n_new / samples[(name, b, n_new)][-1]:.1f} tok/s"
            for b in args.batches for name in runners))

    # The one-off cost of passing arlm.load's numpy params straight to generate (re-uploaded every call).
    host_overhead = None
    if args.host_params_check:
        b = args.batches[0]
        arlm_run(b, n_new, host_params)
        dev, host = [], []
        for _ in range(2):
            dev.append(timed(lambda: arlm_run(b, n_new)))
            host.append(timed(lambda: arlm_run(b, n_new, host_params)))
        host_overhead = dict(batch=b, device_params_s=statistics.median(dev),
                             host_numpy_params_s=statistics.median(host),
                             overhead_s_per_call=statistics.median(host) - statistics.median(dev))

    rows = []
    for b in args.batches:
        row: dict[str, Any] = dict(batch=b, prompt_len=p_len, new_tokens=n_new)
        for name in runners:
            full = statistics.median(samples[(name, b, n_new)])
            one = statistics.median(samples[(name, b, 1)])
            row[name] = dict(
                seconds_median=full, seconds_all=samples[(name, b, n_new)],
                tokens_per_s=b * n_new / full,
                tokens_per_s_best=b * n_new / min(samples[(name, b, n_new)]),
                first_token_seconds_median=one,
                decode_s_per_step=(full - one) / max(n_new - 1, 1),
                decode_tokens_per_s=b * max(n_new - 1, 1) / max(full - one, 1e-9))
        for name in runners:
            if name != "arlm":
                row[f"ratio_arlm_over_{name}"] = row["arlm"]["tokens_per_s"] / row[name]["tokens_per_s"]
                row[f"ratio_best_arlm_over_{name}"] = (row["arlm"]["tokens_per_s_best"]
                                                       / row[name]["tokens_per_s_best"])
                row[f"decode_ratio_arlm_over_{name}"] = (row["arlm"]["decode_tokens_per_s"]
                                                         / row[name]["decode_tokens_per_s"])
        row["loadavg"] = loadavg_per_repeat
        rows.append(row)

    prefill = None
    if args.prefill_len:
        prefill = prefill_benchmark(cfg, params, hf, torch_device, args.prefill_len, args.repeats)

    # Bandwidth floor at batch 1: every decode step reads all float32 weights once.
    bandwidth: dict[str, Any] = dict(weight_bytes_per_step=weight_bytes)
    row1 = next((r for r in rows if r["batch"] == 1), None)
    if row1 is not None:
        for key in ("tokens_per_s", "decode_tokens_per_s"):
            achieved = row1["arlm"][key] * weight_bytes
            bandwidth[f"arlm_achieved_bytes_per_s_from_{key}"] = achieved
            ref = gpu["measured"]["copy_bytes_per_s"] if gpu is not None else bw["copy_bytes_per_s"]
            bandwidth[f"fraction_of_measured_copy_bw_from_{key}"] = achieved / ref
            bandwidth[f"fraction_of_half_copy_bw_from_{key}"] = achieved / (ref / 2)
            if gpu is not None and gpu.get("peak_bytes_per_s"):
                bandwidth[f"fraction_of_peak_from_{key}"] = achieved / gpu["peak_bytes_per_s"]
            for name in runners:
                if name != "arlm":
                    bandwidth[f"{name}_fraction_of_measured_copy_bw_from_{key}"] = (
                        row1[name][key] * weight_bytes / ref)
        bandwidth["floor_tokens_per_s_at_measured_bw"] = (
            (gpu["measured"]["copy_bytes_per_s"] if gpu is not None else bw["copy_bytes_per_s"]) / weight_bytes)
    # Does the while loop (sampling, log-probs, stop check) add anything to the forward step? Time the bare
    # forward_with_cache step over the same (P+N)-slot cache in a compiled fori_loop, argmax fed back.
    b = args.batches[0]
    cache = init_cache(cfg, b, p_len + n_new)
    _, cache = jax.jit(lambda p, c, t: forward_with_cache(cfg, p, c, t, last_logits_only=True))(
        params, cache, jnp.asarray(prompts[b]))

    @jax.jit
    def bare_steps(params, cache, tok):
        def body(_, carry):
            c, tok = carry
            logits, c2 = forward_with_cache(cfg, params, c, tok)
            return c2.replace(index=c.index), jnp.argmax(logits[:, -1], -1).astype(jnp.int32)[:, None]
        return jax.lax.fori_loop(0, n_new, body, (cache, jnp.asarray(prompts[b][:, -1:])))[1]

    jax.block_until_ready(bare_steps(params, cache, jnp.asarray(prompts[b][:, -1:])))
    bare = statistics.median(timed(lambda: bare_steps(params, cache, jnp.asarray(prompts[b][:, -1:])))
                             for _ in range(3)) / n_new
    loop = dict(batch=b, bare_forward_with_cache_s_per_step=bare,
                generate_decode_s_per_step=rows[0]["arlm"]["decode_s_per_step"],
                generate_over_bare=rows[0]["arlm"]["decode_s_per_step"] / bare)
    log(f"  batch {b}: bare forward_with_cache step {bare * 1e3:.1f} ms, generate decode step "
        f"{loop['generate_decode_s_per_step'] * 1e3:.1f} ms")

    profile = None
    if args.profile and jax.devices()[0].platform == "cpu":
        try:
            profile = profile_generate(lambda: arlm_run(b, n_new), cfg, n_new, os.path.join(args.outdir, "trace"),
                                       generate_hlo_text(cfg, params, prompts[b], n_new))
        except Exception as err:  # the profiler is a diagnostic; never fail the benchmark on it
            profile = dict(error=repr(err))
    return dict(model=args.model, n_params=n_params, weight_bytes=weight_bytes, torch_device=torch_device,
                greedy_agreement=agreement, rows=rows, prefill=prefill, bandwidth=bandwidth,
                host_params_overhead=host_overhead, loop_overhead=loop, cpu_profile=profile)


def prefill_benchmark(cfg: ModelConfig, params: Any, hf: Any, torch_device: str, length: int,
                      repeats: int) -> dict[str, Any]:
    """One forward pass over a 1×`length` prompt, all logits: compiled `arlm.forward` against
    transformers' `model(x).logits` (no grad), interleaved repeats; the logits are checked to agree."""
    import torch

    tokens = np.random.default_rng(7).integers(100, 20000, (1, length)).astype(np.int32)
    fwd = jax.jit(lambda p, x: arlm.forward(cfg, p, x))
    x_jax, x_torch = jnp.asarray(tokens), torch.tensor(tokens, dtype=torch.long, device=torch_device)

    def hf_forward():
        with torch.no_grad():
            return hf(x_torch).logits

    ours = np.asarray(jax.block_until_ready(fwd(params, x_jax)))
    runs: dict[str, Callable[[], Any]] = {"arlm": lambda: fwd(params, x_jax)}
    out: dict[str, Any] = dict(tokens=length)
    if hf is not None:
        theirs = hf_forward().float().cpu().numpy()
        out["max_abs_logit_diff"] = float(np.max(np.abs(ours - theirs)))
        runs["transformers"] = hf_forward
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(repeats):
        for name, run in (runs.items() if r % 2 == 0 else reversed(list(runs.items()))):
            samples[name].append(timed(run))
    for name, xs in samples.items():
        out[f"{name}_seconds_median"] = statistics.median(xs)
    if hf is not None:
        out["ratio_arlm_over_transformers"] = out["transformers_seconds_median"] / out["arlm_seconds_median"]
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    log(f"  prefill 1x{length}: arlm {out['arlm_seconds_median'] * 1e3:.0f} ms" + (
        f", transformers {out['transformers_seconds_median'] * 1e3:.0f} ms "
        f"(arlm {out['ratio_arlm_over_transformers']:.2f}x faster)" if hf is not None else ""))
    return out


def profile_generate(run: Callable[[], Any], cfg: ModelConfig, n_steps: int, trace_dir: str,
                     hlo_text: str) -> dict:
    """XLA:CPU thread time of one generate call, by op category (op names come from the compiled HLO)."""
    import collections
    import glob
    import shutil

    shutil.rmtree(trace_dir, ignore_errors=True)
    jax.profiler.start_trace(trace_dir)
    try:
        run()
    finally:
        jax.profiler.stop_trace()
    data = jax.profiler.ProfileData.from_file(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"),
                                                        recursive=True)[0])
    shutil.rmtree(trace_dir, ignore_errors=True)
    d, f, h, n, k = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    weight_slice_sizes = {d * h * k, d * n * k, d * f}
    per_op: collections.Counter = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if "XLA" not in line.name:
                continue
            for ev in line.events:
                name = ev.name
                if name.startswith(("ThunkExecutor", "while", "$")) or " " in name:
                    continue
                per_op[name] += ev.duration_ns
    shapes = _hlo_output_sizes(hlo_text)

    def category(name: str) -> str:
        size = shapes.get(name)
        if "dot" in name and size and size % cfg.vocab_size == 0:
            return "unembedding matvec (V x d)"
        if name.startswith("dot") or name.endswith("dot_fusion"):
            return "weight matvec/matmul"
        if name.startswith("ynn_fusion"):
            return "attention dots (and prefill matmuls)"
        if "dynamic-slice" in name and "update" not in name and size in weight_slice_sizes:
            return "per-layer weight slice copies (scan over stacked params)"
        if "dynamic-slice" in name or "dynamic-update-slice" in name or name.startswith(("copy", "wrapped_broadcast")):
            return "KV-cache slice / update / layout copies"
        return "elementwise, norms, softmax, sampling"

    by_cat: collections.Counter = collections.Counter()
    for name, ns in per_op.items():
        by_cat[category(name)] += ns
    total = sum(by_cat.values()) or 1
    return dict(steps=n_steps, thread_seconds_total=total / 1e9,
                categories={c: dict(thread_ms_per_step=v / 1e6 / n_steps, fraction=v / total)
                            for c, v in by_cat.most_common()},
                top_ops={name: dict(thread_ms_per_step=v / 1e6 / n_steps, category=category(name))
                         for name, v in per_op.most_common(15)},
                note="thread time summed over XLA's worker threads (ops on 2 threads overlap in wall time); "
                     "one arlm.generate call including its prefill; categories are inferred from HLO op names "
                     "and output sizes.")


def generate_hlo_text(cfg: ModelConfig, params: Any, prompt_BxP: np.ndarray, n_new: int) -> str:
    """The optimized HLO of the program `arlm.generate` runs for these shapes (greedy, no stop ids)."""
    gen = sys.modules["arlm.inference.decoding"]
    prompt, start = gen.pad_prompts(cfg, prompt_BxP, n_new)
    return gen._generate.lower(cfg, params, jnp.asarray(prompt), jnp.asarray(start), jax.random.PRNGKey(0),
                               jnp.asarray([-1], jnp.int32), sampler=GREEDY, max_new_tokens=n_new,
                               pad_id=0).compile().as_text()


def _hlo_output_sizes(text: str) -> dict[str, int]:
    """Element counts of every instruction in an HLO module's text (op name → size)."""
    import re

    sizes = {}
    if text:
        for m in re.finditer(r"%([\w.\-]+) = [a-z0-9]+\[([\d,]*)\]", text):
            dims = [int(x) for x in m.group(2).split(",") if x]
            sizes[m.group(1)] = int(np.prod(dims)) if dims else 1
    return sizes


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# bench_generate ({env['platform']}, {env['device_kind']}, "
             f"{'quick' if result['args']['quick'] else 'full'} run)", ""]
    sc = result.get("scaling")
    if sc:
        lines += ["## (i) per-token time vs context length t (random Llama "
                  f"d={sc['model']['d_model']}, L={sc['model']['n_layers']}, Δ={sc['model']['max_seq_len']})", "",
                  "| t | KV cache, t slots (ms) | KV cache, Δ slots (ms) | no cache (ms) | no cache / cache |",
                  "|---:|---:|---:|---:|---:|"]
        for r in sc["per_token"]:
            lines.append(f"| {r['t']} | {r['cached_s_per_token'] * 1e3:.3f} | "
                         f"{r['cached_fixed_window_s_per_token'] * 1e3:.3f} | {r['uncached_s_per_token'] * 1e3:.3f} | "
                         f"{r['uncached_s_per_token'] / r['cached_s_per_token']:.1f}× |")
        s = sc["loglog_slopes"]
        lines += ["", "log-log slopes of per-token time vs t: " + ", ".join(
            f"{k.replace('per_token_', '')} {v:.2f}" for k, v in s.items() if k.startswith("per_token")), ""]
        if sc["totals"]:
            lines += ["| T | arlm.generate total (s, measured) | cached Σ (s, est.) | no cache Σ (s, est.) |",
                      "|---:|---:|---:|---:|"]
            for x in sc["totals"]:
                lines.append(f"| {x['T']} | {x['cached_generate_measured_s']:.3f} | {x['cached_integrated_s']:.3f} | "
                             f"{x['uncached_integrated_s']:.3f} |")
            lines.append("")
    sm = result.get("smollm2")
    if sm:
        others = [k for k in sm["rows"][0] if k.startswith("transformers_")]
        lines += [f"## (ii) {sm['model']} decode, {sm['rows'][0]['new_tokens']} new tokens, "
                  f"{sm['rows'][0]['prompt_len']}-token prompt, greedy, medians of {result['args']['repeats']}", "",
                  "| batch | system | tokens/s (end-to-end) | best run tokens/s | decode tokens/s "
                  "| arlm ÷ this (e2e) | arlm ÷ this (best runs) | arlm ÷ this (decode) |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|"]
        for r in sm["rows"]:
            for name in ["arlm"] + others:
                fmt = lambda v: '' if v is None else f'{v:.2f}×'  # noqa: E731
                lines.append(f"| {r['batch']} | {name} | {r[name]['tokens_per_s']:.1f} | "
                             f"{r[name]['tokens_per_s_best']:.1f} | {r[name]['decode_tokens_per_s']:.1f} | "
                             f"{fmt(r.get(f'ratio_arlm_over_{name}'))} | "
                             f"{fmt(r.get(f'ratio_best_arlm_over_{name}'))} | "
                             f"{fmt(r.get(f'decode_ratio_arlm_over_{name}'))} |")
        pf = sm.get("prefill")
        if pf:
            lines += ["", f"Prefill, one forward pass over 1×{pf['tokens']} tokens (all logits): arlm "
                      f"{pf['arlm_seconds_median'] * 1e3:.0f} ms" + (
                          f", transformers {pf['transformers_seconds_median'] * 1e3:.0f} ms, arlm "
                          f"{pf['ratio_arlm_over_transformers']:.2f}× faster (max |Δ logit| "
                          f"{pf['max_abs_logit_diff']:.1e})" if "transformers_seconds_median" in pf else "")
                      + f"; load average {pf['loadavg']}."]
        lines += ["", "Load average (1 min) after each repeat: " + "; ".join(
            f"batch {r['batch']}: {r['loadavg']}" for r in sm["rows"])]
        bw = sm["bandwidth"]
        meas = result["gpu"]["measured"] if result.get("gpu") else result["host_bandwidth"]
        lines += ["", f"Weights read per decode step: {bw['weight_bytes_per_step'] / 1e6:.0f} MB (float32). "
                  f"Measured copy bandwidth (bytes read + written): {meas['copy_bytes_per_s'] / 1e9:.1f} GB/s "
                  f"→ floor {bw.get('floor_tokens_per_s_at_measured_bw', float('nan')):.1f} tokens/s at batch 1."]
        if "fraction_of_measured_copy_bw_from_tokens_per_s" in bw:
            lines.append(f"arlm at batch 1 reaches {bw['fraction_of_measured_copy_bw_from_tokens_per_s']:.0%} of "
                         f"it end-to-end, {bw['fraction_of_measured_copy_bw_from_decode_tokens_per_s']:.0%} "
                         "in the decode steps alone.")
        if "fraction_of_peak_from_tokens_per_s" in bw:
            lines.append(f"Against the device's peak ({result['gpu']['peak_bytes_per_s'] / 1e12:.2f} TB/s): "
                         f"{bw['fraction_of_peak_from_tokens_per_s']:.0%} end-to-end, "
                         f"{bw['fraction_of_peak_from_decode_tokens_per_s']:.0%} decode.")
        lo = sm.get("loop_overhead")
        if lo:
            lines.append(f"Batch {lo['batch']}: a bare forward_with_cache step (compiled fori_loop over the same "
                         f"cache) takes {lo['bare_forward_with_cache_s_per_step'] * 1e3:.1f} ms; "
                         "a generate decode step "
                         f"{lo['generate_decode_s_per_step'] * 1e3:.1f} ms (×{lo['generate_over_bare']:.2f}).")
        prof = sm.get("cpu_profile")
        if prof and "categories" in prof:
            lines += ["", f"XLA:CPU thread time of one batch-{lo['batch'] if lo else 1} generate call "
                      f"(prefill + {prof['steps']} steps), per step:", "",
                      "| category | thread ms / step | share |", "|---|---:|---:|"]
            for c, v in prof["categories"].items():
                lines.append(f"| {c} | {v['thread_ms_per_step']:.2f} | {v['fraction']:.0%} |")
            lines.append("")
        if sm.get("host_params_overhead"):
            h = sm["host_params_overhead"]
            lines.append(f"Passing arlm.load's numpy params straight to generate costs "
                         f"{h['overhead_s_per_call'] * 1e3:.0f} ms more per call (re-upload); timings above use "
                         "device-resident params.")
        lines.append("")
    if result["args"].get("one_core"):
        lines.append("Run pinned to one core (CPU 0; one torch thread).")
    lines.append(f"Load average before/after: {env['loadavg_before']} / {env.get('loadavg_after')} "
                 f"on {env['cpu_count']} CPUs.")
    return "\n".join(lines) + "\n"


def pin_to_one_core() -> None:
    """Run everything on CPU 0: the affinity mask (XLA:CPU sizes its thread pool from it when the backend
    starts, so call this before the first computation) and one torch / OpenMP thread."""
    os.sched_setaffinity(0, {0})
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import torch
        torch.set_num_threads(1)
    except ImportError:
        pass


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fast smoke run (short lengths, few tokens)")
    ap.add_argument("--outdir", default=os.path.join(ROOT, "runs", "bench_generate"))
    ap.add_argument("--lengths", type=str, default="64,128,256,512,1024,2048")
    ap.add_argument("--total-lengths", type=str, default="64,128,256,512,1024")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batches", type=str, default="1,8")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hf-attn", type=str, default="sdpa,eager",
                    help="transformers attention implementations to time (sdpa is its default)")
    ap.add_argument("--prefill-len", type=int, default=512,
                    help="also time one forward pass over a 1×N prompt against transformers (0: skip)")
    ap.add_argument("--one-core", action="store_true",
                    help="pin this process (arlm and transformers alike) to CPU 0 with one torch thread")
    ap.add_argument("--skip-scaling", action="store_true")
    ap.add_argument("--skip-smollm", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--no-host-params-check", dest="host_params_check", action="store_false")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the XLA:CPU op-time breakdown of one generate call")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.total_lengths = "32,64,128", "32,128"
        args.batches, args.new_tokens, args.repeats, args.hf_attn = "1,2", 8, 2, "sdpa"
        args.prefill_len = min(args.prefill_len, 64)
        args.host_params_check = False
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.total_lengths = [int(x) for x in args.total_lengths.split(",") if x]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.hf_attn = [x for x in args.hf_attn.split(",") if x]
    if args.one_core:
        pin_to_one_core()
    os.makedirs(args.outdir, exist_ok=True)
    wall0 = time.perf_counter()

    dev = jax.devices()[0]
    env = dict(platform=dev.platform, device_kind=dev.device_kind, n_devices=jax.device_count(),
               jax=jax.__version__, python=platform.python_version(), machine=platform.machine(),
               cpu_count=os.cpu_count(), loadavg_before=[round(x, 2) for x in os.getloadavg()])
    try:
        import torch
        import transformers
        env.update(torch=torch.__version__, transformers=transformers.__version__,
                   torch_threads=torch.get_num_threads())
    except ImportError:
        args.skip_hf = True
    result: dict[str, Any] = dict(args=vars(args), env=env)

    log("host memory bandwidth (np.copyto, 512 MB)")
    result["host_bandwidth"] = host_copy_bandwidth(128 if args.quick else 512)
    log(f"  copy {result['host_bandwidth']['copy_bytes_per_s'] / 1e9:.1f} GB/s (read + write)")
    gpu = None
    if dev.platform == "gpu":
        gpu = dict(device_kind=dev.device_kind, peak_bytes_per_s=gpu_peak_bandwidth(dev.device_kind),
                   measured=device_copy_bandwidth(256 if args.quick else 1024))
        log(f"GPU {dev.device_kind}: copy {gpu['measured']['copy_bytes_per_s'] / 1e9:.0f} GB/s, peak "
            f"{(gpu['peak_bytes_per_s'] or float('nan')) / 1e9:.0f} GB/s")
    result["gpu"] = gpu

    if not args.skip_scaling:
        log("(i) per-token cost with and without the KV cache")
        result["scaling"] = scaling_benchmark(args.lengths, repeats=3 if args.quick else 5,
                                              target_s=0.03 if args.quick else 0.1,
                                              total_lengths=args.total_lengths)
        plot_scaling(result["scaling"], os.path.join(args.outdir, "cache_scaling.png"))
    if not args.skip_smollm:
        log(f"(ii) {args.model}: arlm.generate vs transformers")
        try:
            result["smollm2"] = smollm_benchmark(args, result["host_bandwidth"], gpu)
        except FileNotFoundError as err:
            result["smollm2"] = None
            result["smollm2_skipped"] = str(err)
            log(f"  skipped: {err}")

    env["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_seconds"] = time.perf_counter() - wall0
    with open(os.path.join(args.outdir, "bench_generate.json"), "w") as f:
        json.dump(result, f, indent=2, default=float)
    md = markdown(result)
    with open(os.path.join(args.outdir, "bench_generate.md"), "w") as f:
        f.write(md)
    print(md)
    log(f"wrote {args.outdir}/bench_generate.json, bench_generate.md, cache_scaling.png "
        f"in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
