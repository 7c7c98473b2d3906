"""One device check for an H100 or H200, prepared to finish inside 8 minutes; writes one JSON.

    python experiments/device_check.py [--out PATH] [--budget-s 480] [--wheelhouse DIR]
        [--install auto|never|force] [--stages logits,train_gpt2,...] [--cpu-smoke]

Stages, in order; each has its own time limit and ends in the JSON with a status (ok, failed, timeout,
skipped) and its error, whatever happens to the others:

  env          python, jax and its plugins, the devices jax sees, nvidia-smi, the git commit.
  install      only when jax sees no GPU but nvidia-smi does (or with --install force):
               `pip install "jax[cudaNN]==<installed jax>"` (NN from nvidia-smi's CUDA version),
               first from a local wheelhouse (--wheelhouse or $ARLM_WHEELHOUSE, with --no-index), then
               from the index with a short timeout. Failures are recorded; the machine may have no
               network at all.
  logits       the same float32 parameters (SmolLM2-135M through `arlm.load` when installed, else a
               random llama_124m) on the GPU and on jax.devices("cpu"): max |Δ logits| against the stated
               tolerance, and argmax agreement. The float32, precision="highest" variants decide `passed`;
               the default-precision (TF32 on a GPU) and bfloat16 variants are recorded for information.
  train_gpt2, train_llama
               `bench_train.bench_step` on the gpt2_124m / llama_124m presets, bfloat16, fused
               attention, no remat, sequence 1024, batch 16 (halved on out-of-memory): tokens/s,
               model FLOPs per token, MFU against the device's bf16 peak, compile time, memory.
  decode_b1, decode_b64
               `arlm.generate` (greedy) on llama_124m in bfloat16, fused attention, parameters cast to
               bfloat16, batch 1 and 64: end-to-end and decode-step tokens/s against the
               memory-bandwidth floor (below).

Decode floor. One decode step reads every weight once (in the compute dtype; a lookup table, the
untied input embedding or learned positions, only the B rows it gathers) and the whole KV cache,
2 · L · B · S · N_kv · d_head elements with S = padded prompt + new tokens slots, since a step attends
over all S preallocated slots (masked). floor seconds/step = bytes / bandwidth, floor tokens/s =
B / that; fraction = achieved tokens/s / floor tokens/s, against the device's peak bandwidth
(bench_generate.GPU_PEAK_BW) and against a measured device copy (bench_generate.device_copy_bandwidth).

Stages run in child processes (this script with --stage NAME), so each limit is a hard one, a
crash or hang costs only its own stage, and a jax installed by the install stage is the one the
children import; this process never imports jax. --cpu-smoke (alias --quick) runs tiny presets on
the CPU in this process, in well under a minute, and is what tests/test_device_check.py runs.

The JSON is rewritten after every stage, so whatever finishes is kept if the run is cut short;
default path $OUT/device_check.json when $OUT is set, else runs/device_check/device_check.json.
The children's output goes to the .log beside it. Exit status 0 when no stage failed or timed out,
every chosen measurement ran, and the logits check passed (summary.all_ok); 1 otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from types import ModuleType
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(ROOT, "experiments")
SCRIPT = os.path.abspath(__file__)
SCHEMA = "arlm.device_check/1"

MEASUREMENT_STAGES = ("logits", "train_gpt2", "train_llama", "decode_b1", "decode_b64")
# Hard limits per stage (seconds); each is also cut to what is left of --budget-s.
STAGE_CAPS_S = {"env": 90, "install": 150, "logits": 90, "train_gpt2": 120, "train_llama": 120,
                "decode_b1": 120, "decode_b64": 120}
BUDGET_RESERVE_S = 10            # kept back for writing the JSON and the summary
MIN_STAGE_S = 15                 # a stage that would get less is skipped

# Logits tolerance: |Δ| ≤ atol + rtol · max|reference logit|, per variant kind.
LOGITS_TOLERANCE = {"float32_highest": (1e-3, 1e-4), "float32_default": (5e-2, 1e-2), "bfloat16": (0.1, 5e-2)}
# (name, config changes, matmul precision or None for the default, tolerance kind, decides `passed`)
LOGITS_VARIANTS = [
    ("float32_reference_highest", {"attention_impl": "reference"}, "highest", "float32_highest", True),
    ("float32_fused_highest", {"attention_impl": "fused"}, "highest", "float32_highest", True),
    ("float32_fused_default_precision", {"attention_impl": "fused"}, None, "float32_default", False),
    ("bfloat16_fused", {"attention_impl": "fused", "dtype": "bfloat16"}, None, "bfloat16", False),
]
PRETRAINED_LOGITS_MODEL = "smollm2-135m-instruct"


# --------------------------------------------------------------------------------------------
# What each stage runs
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes each stage runs: the 124M configurations on a GPU, tiny ones for the CPU smoke run."""

    smoke: bool
    train_presets: dict[str, str]
    train_batch: int
    train_seq: int
    train_steps: int
    dtype: str
    attention: str
    decode_preset: str
    decode_batches: dict[str, int]
    prompt_len: int
    new_tokens: int
    repeats: int
    logits_model: str
    logits_batch: int
    logits_seq: int


def make_plan(args: argparse.Namespace) -> Plan:
    """The full plan, or the tiny CPU one for --cpu-smoke; command-line sizes override either."""
    if args.smoke:
        base = Plan(smoke=True, train_presets={"train_gpt2": "gpt2_tiny", "train_llama": "tiny"}, train_batch=2,
                    train_seq=32, train_steps=2, dtype="bfloat16", attention="fused", decode_preset="tiny",
                    decode_batches={"decode_b1": 1, "decode_b64": 64}, prompt_len=8, new_tokens=16, repeats=2,
                    logits_model="tiny", logits_batch=2, logits_seq=16)
    else:
        base = Plan(smoke=False, train_presets={"train_gpt2": "gpt2_124m", "train_llama": "llama_124m"},
                    train_batch=16, train_seq=1024, train_steps=10, dtype="bfloat16", attention="fused",
                    decode_preset="llama_124m", decode_batches={"decode_b1": 1, "decode_b64": 64}, prompt_len=128,
                    new_tokens=128, repeats=3, logits_model=PRETRAINED_LOGITS_MODEL, logits_batch=2,
                    logits_seq=128)
    overrides = {"train_batch": args.batch, "train_seq": args.seq, "train_steps": args.steps,
                 "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                 "logits_model": args.logits_model}
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


_MODULES: dict[str, ModuleType] = {}


def experiment_module(name: str) -> ModuleType:
    """experiments/<name>.py, loaded once (it imports jax: call only inside a stage)."""
    if name not in _MODULES:
        module_name = f"_device_check_{name}"
        spec = importlib.util.spec_from_file_location(module_name, os.path.join(EXPERIMENTS, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module            # dataclasses look their module up while it executes
        spec.loader.exec_module(module)
        _MODULES[name] = module
    return _MODULES[name]


def model_config(preset: str, seq: int) -> Any:
    """A bench_train preset at max_seq_len `seq`, or "gpt2_tiny" (the GPT-2 layout at the "tiny" size)."""
    from arlm.config import ModelConfig

    if preset == "gpt2_tiny":
        return ModelConfig.gpt2(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=seq)
    return experiment_module("bench_train").PRESETS[preset](seq)


# --------------------------------------------------------------------------------------------
# Pure helpers (no jax): tested directly
# --------------------------------------------------------------------------------------------

def tail(text: str, n: int = 2000) -> str:
    return text[-n:] if text else ""


def short_error(err: BaseException) -> str:
    return tail(f"{type(err).__name__}: {err}", 1500)


def run_command(cmd: list[str], timeout_s: float, keep: int = 2000) -> dict[str, Any]:
    """Run `cmd`, never raising: rc (None if it could not start or ran out of time), the last `keep`
    characters of its output, seconds."""
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"command": " ".join(cmd)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        rec.update(rc=proc.returncode, output_tail=tail((proc.stdout or "") + (proc.stderr or ""), keep))
    except subprocess.TimeoutExpired:
        rec.update(rc=None, error=f"timed out after {timeout_s:.0f} s")
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        rec.update(rc=None, error=short_error(err))
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def nvidia_smi_info(timeout_s: float = 20) -> dict[str, Any]:
    """GPU names, driver and CUDA version from nvidia-smi, or why they could not be read."""
    rec = run_command(["nvidia-smi"], timeout_s, keep=50_000)
    if rec["rc"] != 0:
        return {"available": False, "error": rec.get("error") or tail(rec.get("output_tail", ""), 300)}
    text = rec["output_tail"]
    info: dict[str, Any] = {"available": True}
    for key, label in (("driver_version", "Driver Version"), ("cuda_version", "CUDA Version")):
        m = re.search(label + r":\s*([\d.]+)", text)
        info[key] = m.group(1) if m else None
    names = run_command(["nvidia-smi", "-L"], timeout_s)
    info["gpus"] = [line.strip() for line in names.get("output_tail", "").splitlines() if line.strip()]
    return info


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def jax_cuda_spec(cuda_version: str | None, jax_version: str | None) -> str:
    """The pip requirement for jax's CUDA build: cuda13 when the driver offers CUDA ≥ 13, else cuda12,
    pinned to the installed jax so that flax and optax keep working."""
    major = int(cuda_version.split(".")[0]) if cuda_version and cuda_version.split(".")[0].isdigit() else 12
    extra = "cuda13" if major >= 13 else "cuda12"
    return f"jax[{extra}]=={jax_version}" if jax_version else f"jax[{extra}]"


def pip_attempts(spec: str, wheelhouse: str | None) -> list[tuple[str, list[str]]]:
    """(source, command) in the order tried: the local wheelhouse (no index), then the package index."""
    pip = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input"]
    attempts = []
    if wheelhouse:
        attempts.append(("wheelhouse", pip + ["--no-index", "--find-links", wheelhouse, spec]))
    attempts.append(("index", pip + ["--timeout", "10", "--retries", "0", spec]))
    return attempts


def install_skip_reason(mode: str, has_gpu: bool, smoke: bool, nvidia_smi: dict[str, Any]) -> str | None:
    """Why the install stage does not run, or None when it does: --install force always runs it;
    auto only when jax sees no GPU although nvidia-smi does (never in a CPU smoke run)."""
    if mode == "force":
        return None
    if mode == "never":
        return "--install never"
    if smoke:
        return "cpu smoke run"
    if has_gpu:
        return "jax already sees a GPU"
    if not nvidia_smi.get("available"):
        return "no NVIDIA GPU here (nvidia-smi: " + str(nvidia_smi.get("error") or "unavailable")[:200] + ")"
    return None


def install_gpu_jax(spec: str, wheelhouse: str | None, timeout_s: float) -> dict[str, Any]:
    """Try each pip source within `timeout_s` in all; status "ok" once one succeeds, else "failed".
    Never raises: every attempt's command, exit status and output tail are recorded."""
    deadline = time.monotonic() + timeout_s
    attempts = []
    for source, cmd in pip_attempts(spec, wheelhouse):
        left = deadline - time.monotonic()
        if source == "wheelhouse" and not os.path.isdir(wheelhouse):
            attempts.append({"source": source, "command": " ".join(cmd), "rc": None,
                             "error": f"wheelhouse {wheelhouse!r} is not a directory"})
            continue
        if left < 5:
            attempts.append({"source": source, "command": " ".join(cmd), "rc": None, "error": "no time left"})
            continue
        attempts.append({"source": source, **run_command(cmd, left)})
        if attempts[-1]["rc"] == 0:
            break
    ok = any(a["rc"] == 0 for a in attempts)
    return {"status": "ok" if ok else "failed", "spec": spec, "attempts": attempts,
            **({} if ok else {"error": "every install attempt failed (see attempts)"})}


def compare_logits(ref: Any, test: Any, atol: float, rtol: float) -> dict[str, Any]:
    """Max |Δ| of `test` against `ref` (…xV) with tolerance atol + rtol·max|ref|, and argmax agreement.

    passed: every value finite, max |Δ| within the tolerance, and the argmax equal at every position
    whose reference margin (top-1 − top-2) exceeds twice the tolerance (closer calls are near-ties
    that an error within the tolerance may flip; they are counted, not failed)."""
    import numpy as np

    ref = np.asarray(ref, np.float64)
    test = np.asarray(test, np.float64)
    if ref.shape != test.shape:
        return {"passed": False, "error": f"shape {test.shape} != reference {ref.shape}"}
    finite = bool(np.isfinite(ref).all() and np.isfinite(test).all())
    diff = np.abs(ref - test)
    max_abs = float(diff.max()) if finite else float("inf")
    tolerance = atol + rtol * float(np.abs(ref).max())
    top2 = np.sort(ref, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    disagree = np.argmax(ref, -1) != np.argmax(test, -1)
    decisive_disagreements = int((disagree & (margin > 2 * tolerance)).sum())
    within = finite and max_abs <= tolerance
    return {"max_abs_diff": max_abs, "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
            "reference_max_abs": float(np.abs(ref).max()), "atol": atol, "rtol": rtol, "tolerance": tolerance,
            "finite": finite, "within_tolerance": within, "positions": int(disagree.size),
            "argmax_agree_fraction": float(1.0 - disagree.mean()), "argmax_disagreements": int(disagree.sum()),
            "argmax_disagreements_beyond_near_ties": decisive_disagreements,
            "passed": bool(within and decisive_disagreements == 0)}


def lookup_tables(config: Any) -> list[str]:
    """Parameters a decode step only gathers rows from: learned positions, and the input embedding
    when it is not also the output projection."""
    tables = ["pos_embed"] if config.pos_embedding == "learned" else []
    return tables + ([] if config.tie_embeddings else ["embed"])


def decode_bytes_per_step(config: Any, param_sizes: dict[str, int], batch: int, cache_len: int) -> dict[str, int]:
    """Bytes one decode step must read at least (module docstring): weights in the compute dtype
    (B rows of each lookup table) and the k and v of all `cache_len` slots. `param_sizes` maps each
    top-level parameter name to its element count."""
    itemsize = config.compute_dtype.itemsize
    tables = [t for t in lookup_tables(config) if t in param_sizes]
    gathered = batch * config.d_model * len(tables)          # the rows a step looks up
    weight_elems = sum(param_sizes.values()) - sum(param_sizes[t] for t in tables) + gathered
    kv_elems = 2 * config.n_layers * batch * cache_len * config.n_kv_heads * config.head_dim
    return {"weight_bytes": weight_elems * itemsize, "kv_cache_bytes": kv_elems * itemsize,
            "total_bytes": (weight_elems + kv_elems) * itemsize, "itemsize": int(itemsize)}


def decode_floor(bytes_per_step: int, batch: int, bandwidth: float | None, achieved: dict[str, float | None]
                 ) -> dict[str, Any] | None:
    """The floor at `bandwidth` bytes/s and the achieved fraction of it for each tokens/s in `achieved`."""
    if not bandwidth:
        return None
    floor_s = bytes_per_step / bandwidth
    out: dict[str, Any] = {"bandwidth_bytes_per_s": bandwidth, "floor_s_per_step": floor_s,
                           "floor_tokens_per_s": batch / floor_s}
    for key, tok_s in achieved.items():
        out[f"fraction_of_floor_{key}"] = tok_s / (batch / floor_s) if tok_s else None
    return out


# --------------------------------------------------------------------------------------------
# Stages (these import jax)
# --------------------------------------------------------------------------------------------

def git_commit() -> str | None:
    rec = run_command(["git", "-C", ROOT, "rev-parse", "HEAD"], 10)
    return rec["output_tail"].strip() if rec["rc"] == 0 else None


def stage_env(plan: Plan) -> dict[str, Any]:
    """What this process's jax sees, its packages, nvidia-smi and the environment that steers them."""
    import jax

    devices = jax.devices()
    packages = {name: installed_version(name) for name in ("jax", "jaxlib", "flax", "optax", "numpy")}
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(("jax-cuda", "jax_cuda", "jax-rocm", "libtpu")):
            packages[name] = dist.version
    env_keys = ("JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_MEM_FRACTION", "ARLM_WHEELHOUSE")
    return {"python": sys.version.split()[0], "executable": sys.executable, "packages": packages,
            "backend": jax.default_backend(), "device_count": len(devices),
            "devices": [{"id": d.id, "platform": d.platform, "device_kind": d.device_kind} for d in devices[:8]],
            "device_kind": devices[0].device_kind, "platform": devices[0].platform,
            "has_gpu": any(d.platform == "gpu" for d in devices), "cpu_devices": len(jax.devices("cpu")),
            "environment": {k: os.environ[k] for k in env_keys if k in os.environ},
            "nvidia_smi": nvidia_smi_info(), "cpu_count": os.cpu_count(), "git_commit": git_commit()}


def is_out_of_memory(err: BaseException) -> bool:
    text = str(err)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def stage_train(plan: Plan, stage: str) -> dict[str, Any]:
    """bench_train.bench_step on the stage's preset; the batch is halved after an out-of-memory."""
    import gc

    import jax

    bench = experiment_module("bench_train")
    preset = plan.train_presets[stage]
    device = jax.devices()[0]
    peak = bench.device_peak_flops(device.device_kind)
    config = model_config(preset, plan.train_seq).replace(dtype=plan.dtype, attention_impl=plan.attention,
                                                          remat="none")
    batch, oom = plan.train_batch, []
    while True:
        try:
            result = bench.bench_step(config, batch, plan.train_seq, plan.train_steps, peak)
            break
        except Exception as err:  # an out-of-memory retries smaller; anything else fails the stage
            if not is_out_of_memory(err) or batch == 1:
                raise
            oom.append({"batch": batch, "error": short_error(err)})
            batch //= 2
            jax.clear_caches()
            gc.collect()
    return {"preset": preset, "device_kind": device.device_kind, "platform": device.platform, "batch": batch,
            "seq": plan.train_seq, "steps": plan.train_steps, "dtype": plan.dtype, "attention": plan.attention,
            "remat": "none", "peak_flops": peak, "peak_source": "bench_train.PEAK_FLOPS (bf16 dense)" if peak else None,
            "out_of_memory_retries": oom, **result}


def cast_floats(params: Any, dtype: Any) -> Any:
    """Every floating leaf in `dtype` (decode reads weights in the compute dtype)."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def top_level_sizes(params: Any) -> dict[str, int]:
    """Element count of each top-level parameter entry (embed, layers, final_norm, …)."""
    import jax

    return {name: int(sum(leaf.size for leaf in jax.tree.leaves(sub))) for name, sub in params.items()}


def time_generate(config: Any, params: Any, prompts: Any, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Compile, then time `arlm.generate` for `new_tokens` and for 1 token, interleaved; medians."""
    import jax
    import numpy as np

    import arlm

    def run(n: int) -> float:
        t0 = time.perf_counter()
        out = arlm.generate(config, params, prompts, key=jax.random.PRNGKey(0), max_new_tokens=n, eos_id=None)
        np.asarray(jax.block_until_ready(out.tokens_BxN))
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    run(new_tokens)
    run(1)
    compile_s = time.perf_counter() - t0
    full, one = [], []
    for _ in range(repeats):
        full.append(run(new_tokens))
        one.append(run(1))
    return {"compile_and_first_runs_s": compile_s, "seconds_all": full, "first_token_seconds_all": one,
            "seconds_median": statistics.median(full), "first_token_seconds_median": statistics.median(one)}


def stage_decode(plan: Plan, stage: str) -> dict[str, Any]:
    """Greedy `arlm.generate` at the stage's batch: tokens/s against the memory-bandwidth floor."""
    import jax
    import numpy as np

    import arlm
    from arlm.inference.decoding import pad_prompts

    bench_generate = experiment_module("bench_generate")
    batch, n = plan.decode_batches[stage], plan.new_tokens
    config = model_config(plan.decode_preset, plan.prompt_len + n).replace(dtype=plan.dtype,
                                                                          attention_impl=plan.attention)
    params = cast_floats(arlm.init_params(config, jax.random.PRNGKey(0)), config.compute_dtype)
    params = jax.block_until_ready(jax.device_put(params, jax.devices()[0]))
    prompts = np.random.default_rng(0).integers(0, config.vocab_size, (batch, plan.prompt_len)).astype(np.int32)
    cache_len = pad_prompts(config, prompts, n)[0].shape[1] + n
    timing = time_generate(config, params, prompts, n, plan.repeats)
    full, one = timing["seconds_median"], timing["first_token_seconds_median"]
    decode_s = (full - one) / max(n - 1, 1)
    achieved = {"end_to_end": batch * n / full, "decode": batch / decode_s if decode_s > 0 else None}
    nbytes = decode_bytes_per_step(config, top_level_sizes(params), batch, cache_len)
    device = jax.devices()[0]
    peak_bw = bench_generate.gpu_peak_bandwidth(device.device_kind) if device.platform == "gpu" else None
    copy_bw = bench_generate.device_copy_bandwidth(1024 if device.platform == "gpu" else 16, repeats=5)
    return {"preset": plan.decode_preset, "batch": batch, "prompt_len": plan.prompt_len, "new_tokens": n,
            "cache_len": cache_len, "dtype": plan.dtype, "attention": plan.attention, "params_dtype": plan.dtype,
            "device_kind": device.device_kind, "platform": device.platform, **timing,
            "tokens_per_s": achieved["end_to_end"], "decode_s_per_step": decode_s if decode_s > 0 else None,
            "decode_tokens_per_s": achieved["decode"], "bytes_per_step": nbytes,
            "floor_at_peak_bandwidth": decode_floor(nbytes["total_bytes"], batch, peak_bw, achieved),
            "floor_at_measured_copy_bandwidth": decode_floor(nbytes["total_bytes"], batch,
                                                             copy_bw["copy_bytes_per_s"], achieved),
            "measured_copy": copy_bw,
            "peak_bandwidth_source": "bench_generate.GPU_PEAK_BW" if peak_bw else None}


def logits_model(plan: Plan) -> tuple[Any, Any, dict[str, Any]]:
    """(float32 config, host params, description): the pretrained model when `arlm.load` finds it,
    else a random init of the preset (the plan's model if it is a preset, else llama_124m)."""
    import jax
    import numpy as np

    import arlm

    bench = experiment_module("bench_train")
    about: dict[str, Any] = {}
    if plan.logits_model in bench.PRESETS or plan.logits_model == "gpt2_tiny":
        preset = plan.logits_model
    else:
        try:
            loaded = arlm.load(plan.logits_model)
            config = loaded.config.replace(dtype="float32")
            about = {"model": plan.logits_model, "weights": "pretrained"}
            return config, jax.tree.map(np.asarray, loaded.params), about
        except Exception as err:  # not installed here (no network): fall back to random weights
            about = {"pretrained_unavailable": short_error(err)}
            preset = "llama_124m"
    config = model_config(preset, plan.logits_seq).replace(dtype="float32")
    params = jax.tree.map(np.asarray, arlm.init_params(config, jax.random.PRNGKey(0)))
    return config, params, {**about, "model": preset, "weights": "random init, PRNGKey(0)"}


def forward_on(config: Any, params: Any, tokens: Any, device: Any, precision: str | None) -> tuple[Any, list[str]]:
    """arlm.forward with params and tokens committed to `device`; (logits as numpy, devices it ran on)."""
    import contextlib

    import jax
    import numpy as np

    import arlm

    p, t = jax.device_put((params, tokens), device)
    scope = jax.default_matmul_precision(precision) if precision else contextlib.nullcontext()
    with scope:
        logits = jax.jit(lambda p_, t_: arlm.forward(config, p_, t_))(p, t)
    return np.asarray(logits), sorted(str(d) for d in logits.devices())


def reference_cpu_device(device: Any) -> Any:
    """A CPU device other than `device` when there is one (on a CPU-only run both are still two devices)."""
    import jax

    cpus = jax.devices("cpu")
    return next((d for d in reversed(cpus) if d != device), cpus[0])


def stage_logits(plan: Plan) -> dict[str, Any]:
    """The device's logits against a float32 CPU reference on the same parameters and tokens."""
    import jax
    import numpy as np

    config, params, about = logits_model(plan)
    seq = min(plan.logits_seq, config.max_seq_len)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (plan.logits_batch, seq)).astype(np.int32)
    device = jax.devices()[0]
    ref_device = reference_cpu_device(device)
    ref, ref_ran_on = forward_on(config.replace(attention_impl="reference"), params, tokens, ref_device, "highest")
    variants = {}
    for name, changes, precision, kind, gating in LOGITS_VARIANTS:
        atol, rtol = LOGITS_TOLERANCE[kind]
        try:
            test, ran_on = forward_on(config.replace(**changes), params, tokens, device, precision)
            variants[name] = {**compare_logits(ref, test, atol, rtol), "ran_on": ran_on}
        except Exception as err:  # one variant failing (e.g. fused unsupported) is recorded, not fatal
            variants[name] = {"passed": False, "error": short_error(err)}
        variants[name].update(gating=gating, precision=precision or "default", **changes)
    return {**about, "device": str(device), "reference_device": str(ref_device), "reference_ran_on": ref_ran_on,
            "tokens_shape": list(tokens.shape), "vocab_size": config.vocab_size,
            "reference": "float32, attention_impl='reference', precision='highest', on the CPU",
            "tolerance_rule": "|Δ| ≤ atol + rtol · max|reference logit|; argmax must agree wherever the reference's "
                              "top-1 − top-2 margin exceeds 2 · tolerance",
            "passed": all(v["passed"] for v in variants.values() if v["gating"]), "variants": variants}


def run_stage_body(name: str, plan: Plan) -> dict[str, Any]:
    if name == "env":
        return stage_env(plan)
    if name == "logits":
        return stage_logits(plan)
    if name.startswith("train_"):
        return stage_train(plan, name)
    if name.startswith("decode_"):
        return stage_decode(plan, name)
    raise ValueError(f"unknown stage {name!r}")


# --------------------------------------------------------------------------------------------
# Running stages: here, or in a child process with a hard time limit
# --------------------------------------------------------------------------------------------

def run_here(name: str, plan: Plan) -> dict[str, Any]:
    """The stage in this process: {"status": "ok", "result": …} or {"status": "failed", "error": …}."""
    try:
        return {"status": "ok", "result": run_stage_body(name, plan)}
    except Exception as err:  # recorded in the JSON; the next stage still runs
        return {"status": "failed", "error": short_error(err), "traceback": tail(traceback.format_exc(), 4000)}


def file_tail(path: str, n: int = 3000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return tail(f.read(), n)
    except OSError:
        return ""


def run_in_child(name: str, argv: list[str], timeout_s: float, log_path: str) -> dict[str, Any]:
    """The stage in a fresh python (this script with --stage), killed after `timeout_s`; its output is
    appended to `log_path`, its result read back from a JSON file it writes."""
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        result_path = os.path.join(tmp, "stage.json")
        cmd = [sys.executable, "-u", SCRIPT, *argv, "--stage", name, "--stage-json", result_path]
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n===== stage {name} (limit {timeout_s:.0f} s) =====\n")
            log.flush()
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s, cwd=ROOT,
                                      env={**os.environ, "PYTHONUNBUFFERED": "1"})
            except subprocess.TimeoutExpired:
                return {"status": "timeout", "error": f"killed after {timeout_s:.0f} s",
                        "log_tail": file_tail(log_path)}
            except (OSError, subprocess.SubprocessError) as err:
                return {"status": "failed", "error": short_error(err)}
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as f:
                rec = json.load(f)
        else:
            rec = {"status": "failed", "error": f"the stage's process exited with status {proc.returncode} "
                                                "and no result"}
        rec["rc"] = proc.returncode
        if rec["status"] != "ok":
            rec["log_tail"] = file_tail(log_path)
        return rec


class Budget:
    """The time left of --budget-s, and each stage's share of it."""

    def __init__(self, total_s: float):
        self.total_s = total_s
        self.end = time.monotonic() + total_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def stage_limit(self, cap_s: float) -> float | None:
        """min(cap, what is left less the reserve); None when that is under MIN_STAGE_S."""
        limit = min(cap_s, self.left() - BUDGET_RESERVE_S)
        return limit if limit >= min(MIN_STAGE_S, cap_s) else None


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------

def default_out() -> str:
    if os.environ.get("OUT"):
        return os.path.join(os.environ["OUT"], "device_check.json")
    return os.path.join(ROOT, "runs", "device_check", "device_check.json")


def write_json(report: dict[str, Any], path: str) -> None:
    """Write atomically (a reader never sees half a file); non-finite floats become null."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(json_safe(report), f, indent=1, default=str)
    os.replace(tmp, path)


def json_safe(value: Any) -> Any:
    """NaN and ±inf as None (strict JSON), recursively."""
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """Each stage's status, the headline numbers, and all_ok: no stage failed or timed out, none chosen
    was skipped (no GPU, out of budget), and the logits check did not fail."""
    stages = report["stages"]
    status = {name: rec.get("status") for name, rec in stages.items()}
    logits = stages.get("logits", {})
    logits_passed = logits.get("result", {}).get("passed") if logits.get("status") == "ok" else None
    headline: dict[str, Any] = {"logits_passed": logits_passed}
    for name, rec in stages.items():
        r = rec.get("result") or {}
        if name.startswith("train_") and rec.get("status") == "ok":
            headline[name] = {"tokens_per_s": r.get("tokens_per_s"), "mfu": r.get("mfu"), "batch": r.get("batch")}
        if name.startswith("decode_") and rec.get("status") == "ok":
            floor = r.get("floor_at_peak_bandwidth") or r.get("floor_at_measured_copy_bandwidth") or {}
            headline[name] = {"decode_tokens_per_s": r.get("decode_tokens_per_s"),
                              "floor_tokens_per_s": floor.get("floor_tokens_per_s"),
                              "fraction_of_floor": floor.get("fraction_of_floor_decode")}
    bad = [n for n, s in status.items() if s in ("failed", "timeout")]
    unmeasured = [n for n in MEASUREMENT_STAGES if status.get(n) == "skipped"
                  and not str(stages[n].get("reason", "")).startswith("not selected")]
    return {"status": status, "failed_or_timed_out": bad, "skipped_unmeasured": unmeasured, "headline": headline,
            "all_ok": not bad and not unmeasured and logits_passed is not False}


def stage_line(name: str, rec: dict[str, Any]) -> str:
    """One line of the human summary."""
    status, r = rec.get("status"), rec.get("result") or {}
    head = f"{name:12s} {status:8s} {rec.get('seconds', 0):6.1f} s  "
    if status != "ok":
        return head + str(rec.get("reason") or rec.get("error") or "")[:160]
    if name == "env":
        return head + f"{r.get('device_kind')} ({r.get('platform')}), jax {r.get('packages', {}).get('jax')}"
    if name == "install":
        return head + str(r.get("spec"))
    if name == "logits":
        worst = max((v.get("max_abs_diff") or 0.0 for v in r["variants"].values() if v.get("gating")), default=0.0)
        return head + f"passed={r['passed']} ({r.get('model')}), float32 max |Δ| {worst:.2e} on {r.get('device')}"
    if name.startswith("train_"):
        mfu = "n/a" if r.get("mfu") is None else f"{r['mfu']:.3f}"
        return head + (f"{r['preset']} b={r['batch']}: {r['tokens_per_s']:.0f} tok/s, MFU {mfu}, "
                       f"compile {r['compile_s']:.1f} s")
    floor = r.get("floor_at_peak_bandwidth") or r.get("floor_at_measured_copy_bandwidth") or {}
    dec = r.get("decode_tokens_per_s")
    frac = floor.get("fraction_of_floor_decode")
    return head + (f"b={r['batch']}: {r['tokens_per_s']:.0f} tok/s end-to-end, decode "
                   f"{'n/a' if dec is None else f'{dec:.0f}'} tok/s; floor {floor.get('floor_tokens_per_s', 0):.0f} "
                   f"tok/s, {'n/a' if frac is None else f'{frac:.1%}'} of it")


def summary_text(report: dict[str, Any]) -> str:
    lines = [f"device_check ({report['mode']}, {report.get('wall_s', 0):.0f} s of {report['budget_s']:.0f} s) "
             f"→ {report['out']}"]
    lines += [stage_line(name, rec) for name, rec in report["stages"].items()]
    lines.append(f"all_ok: {report['summary']['all_ok']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="the JSON (default $OUT/device_check.json or "
                                                "runs/device_check/device_check.json)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="the whole run's time limit in seconds")
    ap.add_argument("--cpu-smoke", "--quick", dest="smoke", action="store_true",
                    help="tiny presets, few steps, on the CPU in this process (what the tests run)")
    ap.add_argument("--stages", default=",".join(MEASUREMENT_STAGES),
                    help="measurement stages to run (env and install always come first)")
    ap.add_argument("--install", choices=("auto", "never", "force"), default="auto",
                    help="auto: install jax's CUDA build when jax sees no GPU but nvidia-smi does "
                         "(never in --cpu-smoke)")
    ap.add_argument("--wheelhouse", default=os.environ.get("ARLM_WHEELHOUSE"),
                    help="a folder of wheels for the install (pip --no-index --find-links)")
    ap.add_argument("--jax-spec", default=None, help="the pip requirement to install (default: jax[cudaNN] "
                                                     "pinned to the installed jax)")
    ap.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                    help="each stage in its own process with a hard limit (default unless --cpu-smoke)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="every stage in this process (limits then only skip stages that have no time left)")
    ap.add_argument("--allow-cpu", action="store_true", help="run the measurement stages without a GPU")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default 16; smoke 2)")
    ap.add_argument("--seq", type=int, default=None, help="training sequence length (default 1024)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps (default 10)")
    ap.add_argument("--prompt-len", type=int, default=None, help="decode prompt tokens (default 128)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode new tokens (default 128)")
    ap.add_argument("--repeats", type=int, default=None, help="timed generate repeats (default 3)")
    ap.add_argument("--logits-model", default=None,
                    help=f"a bench_train preset or a model arlm.load knows (default {PRETRAINED_LOGITS_MODEL}, "
                         "falling back to a random llama_124m)")
    ap.add_argument("--stage", default=None, help=argparse.SUPPRESS)          # internal: run one stage here
    ap.add_argument("--stage-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.isolate is None:
        args.isolate = not args.smoke
    unknown = set(s for s in args.stages.split(",") if s) - set(MEASUREMENT_STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; choose from {', '.join(MEASUREMENT_STAGES)}")
    return args


def child_main(args: argparse.Namespace) -> dict[str, Any]:
    """--stage NAME: run it here and write {"status", "result" | "error"} to --stage-json."""
    t0 = time.perf_counter()
    rec = run_here(args.stage, make_plan(args))
    rec["child_seconds"] = round(time.perf_counter() - t0, 2)
    write_json(rec, args.stage_json)
    return rec


class Run:
    """One device check: the report, where it is written, the budget, and how stages are run."""

    def __init__(self, args: argparse.Namespace, argv: list[str]):
        self.args, self.argv = args, argv
        self.plan = make_plan(args)
        self.out = os.path.abspath(args.out or default_out())
        self.log = os.path.splitext(self.out)[0] + ".log"
        self.budget = Budget(args.budget_s)
        self.t0 = time.perf_counter()
        self.report: dict[str, Any] = {
            "schema": SCHEMA, "mode": "cpu-smoke" if args.smoke else "full", "argv": argv, "out": self.out,
            "log": self.log if args.isolate else None, "isolated_stages": args.isolate, "budget_s": args.budget_s,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "plan": dataclasses.asdict(self.plan),
            "stage_caps_s": STAGE_CAPS_S, "logits_tolerance": {k: {"atol": a, "rtol": r}
                                                                for k, (a, r) in LOGITS_TOLERANCE.items()},
            "stages": {}}

    def record(self, name: str, rec: dict[str, Any]) -> dict[str, Any]:
        self.report["stages"][name] = rec
        self.save()
        return rec

    def save(self) -> None:
        self.report["wall_s"] = round(time.perf_counter() - self.t0, 2)
        self.report["summary"] = summarize(self.report)
        write_json(self.report, self.out)

    def skip(self, name: str, reason: str) -> dict[str, Any]:
        return self.record(name, {"status": "skipped", "reason": reason, "seconds": 0.0})

    def stage(self, name: str) -> dict[str, Any]:
        """Run a jax stage within its limit, here or in a child; record and return it."""
        limit = self.budget.stage_limit(STAGE_CAPS_S[name])
        if limit is None:
            return self.skip(name, f"out of budget ({self.budget.left():.0f} s left)")
        print(f"[device_check] {name} (limit {limit:.0f} s)", flush=True)
        t0 = time.perf_counter()
        rec = (run_in_child(name, self.argv, limit, self.log) if self.args.isolate
               else run_here(name, self.plan))
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        rec["limit_s"] = round(limit, 1)
        return self.record(name, rec)

    def install(self, env: dict[str, Any]) -> bool:
        """The install stage; returns whether jax sees a GPU afterwards."""
        has_gpu = bool(env.get("result", {}).get("has_gpu"))
        smi = env.get("result", {}).get("nvidia_smi") or ({} if has_gpu or self.args.smoke else nvidia_smi_info())
        reason = install_skip_reason(self.args.install, has_gpu, self.args.smoke, smi)
        limit = self.budget.stage_limit(STAGE_CAPS_S["install"])
        if reason or limit is None:
            self.skip("install", reason or "out of budget")
            return has_gpu
        spec = self.args.jax_spec or jax_cuda_spec(smi.get("cuda_version"), installed_version("jax"))
        print(f"[device_check] install {spec} (limit {limit:.0f} s)", flush=True)
        t0 = time.perf_counter()
        result = install_gpu_jax(spec, self.args.wheelhouse, limit)
        rec = {"status": result.pop("status"), "result": result, "seconds": 0.0, "limit_s": round(limit, 1)}
        if "error" in result:
            rec["error"] = result.pop("error")
        if rec["status"] == "ok":
            has_gpu = self.probe_after_install(result, has_gpu)
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        self.record("install", rec)
        return has_gpu

    def probe_after_install(self, result: dict[str, Any], has_gpu: bool) -> bool:
        """A fresh process's view of jax after a successful install (this one cannot re-import it)."""
        if not self.args.isolate:
            result["note"] = "jax was already imported in this process: the new build takes effect in a new one"
            return has_gpu
        probe = run_in_child("env", self.argv, STAGE_CAPS_S["env"], self.log)
        result["env_after"] = probe
        return bool(probe.get("result", {}).get("has_gpu"))

    def measure(self, has_gpu: bool) -> None:
        chosen = [s for s in self.args.stages.split(",") if s]
        for name in MEASUREMENT_STAGES:
            if name not in chosen:
                self.skip(name, "not selected (--stages)")
            elif not (has_gpu or self.args.smoke or self.args.allow_cpu):
                self.skip(name, "jax sees no GPU (use --allow-cpu to measure anyway)")
            else:
                self.stage(name)

    def execute(self) -> dict[str, Any]:
        """All stages; the JSON is written whatever happens, then the summary printed."""
        try:
            env = self.stage("env")
            self.measure(self.install(env))
        except Exception as err:  # a bug here must still leave a JSON behind
            self.report["error"] = short_error(err)
            self.report["traceback"] = tail(traceback.format_exc(), 4000)
        finally:
            self.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            self.save()
        print(summary_text(self.report), flush=True)
        return self.report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the device check (or, with --stage, one stage for a parent run) and return its report."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.stage:
        return child_main(args)
    return Run(args, argv).execute()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)       # unwinds through Run.execute's finally, which writes the JSON


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    report = main()
    if "--stage" in sys.argv:
        raise SystemExit(0)
    raise SystemExit(0 if report.get("summary", {}).get("all_ok") else 1)
