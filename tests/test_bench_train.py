"""`experiments/bench_train.py`: the FLOPs formula against a hand count, the peak table, one tiny run
writing its JSON; `pretrain_loss(logits_chunk=...)` (the memory-lean loss it benchmarks) against the
whole-logits loss; and the side by side with transformers on a tiny llama: the same weights and AdamW
give the same losses, and the isolated, pinned runs report sane numbers. No timing is asserted."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from arlm.config import ModelConfig
from arlm.objectives.lm import pretrain_loss

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "..", "experiments",
                                                                              "bench_train.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module          # its dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_matmul_params_and_flops_match_a_hand_count(bench):
    v, d, L, h, kv, f, t = 50, 32, 3, 4, 2, 48, 16
    k = d // h
    cfg = ModelConfig.llama(vocab_size=v, d_model=d, n_layers=L, n_heads=h, n_kv_heads=kv, d_ff=f, max_seq_len=t,
                            qkv_bias=True)
    params = arlm.init_params(cfg, jax.random.PRNGKey(0))
    per_layer = d * h * k + 2 * d * kv * k + h * k * d + 3 * d * f        # wq, wk, wv, wo, SwiGLU's three
    n = L * per_layer + v * d
    assert bench.matmul_params(cfg, params) == n
    assert bench.model_flops_per_token(cfg, params, t) == 6 * n + 12 * L * t * h * k
    moe = ModelConfig.llama(vocab_size=v, d_model=d, n_layers=L, n_heads=h, d_ff=f, max_seq_len=t, n_experts=4,
                            moe_top_k=1)
    per_layer_moe = 4 * d * d + d * 4 + 3 * d * f                         # attention, router, one expert of four
    assert bench.matmul_params(moe, arlm.init_params(moe, jax.random.PRNGKey(0))) == L * per_layer_moe + v * d


def test_peak_table_and_a_tiny_run(bench, tmp_path):
    assert bench.device_peak_flops("NVIDIA H200") == 989e12
    assert bench.device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.device_peak_flops("TPU v5 lite") == 197e12 and bench.device_peak_flops("cpu") is None
    out = bench.main(["--presets", "tiny", "--batch", "2", "--seq", "32", "--steps", "2", "--dtype", "float32",
                      "--depths", "1,2", "--outdir", str(tmp_path)])
    on_disk = json.loads((tmp_path / "bench_train.json").read_text())
    r = on_disk["results"]["tiny"]
    assert on_disk["peak_source"] == "measured float32 GEMM" and on_disk["peak_flops"] > 0
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["xla_bytes"] > 0
    assert [c["n_layers"] for c in out["compile_vs_depth"]] == [1, 2]


# --------------------------------------------------------------------------- pretrain_loss(logits_chunk=...)

CHUNK_CONFIGS = {      # a tied llama is the benchmark's own case (test_transformers_trains_the_same_weights...)
    "llama_untied_softcap": ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                              d_ff=64, max_seq_len=64, tie_embeddings=False, logit_softcap=5.0),
    "gpt2": ModelConfig.gpt2(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
    "moe": ModelConfig.llama(vocab_size=97, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=64,
                             n_experts=4, moe_top_k=2),
}


def _lm_batch(vocab: int, b: int = 3, t: int = 32) -> dict:
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (b, t + 1)), jnp.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


@pytest.mark.parametrize("name", sorted(CHUNK_CONFIGS))
def test_chunked_logits_give_the_same_loss_and_gradient(name):
    cfg = CHUNK_CONFIGS[name]
    params = arlm.init_params(cfg, jax.random.PRNGKey(1))
    batch = _lm_batch(cfg.vocab_size)

    def loss_and_grad(chunk: int):
        return jax.jit(jax.value_and_grad(lambda p: pretrain_loss(cfg, p, batch, logits_chunk=chunk)[0]))(params)

    (l0, g0), (l1, g1) = loss_and_grad(0), loss_and_grad(8)            # whole logits; four chunks of 8
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    value = jax.jit(lambda p: pretrain_loss(cfg, p, batch, logits_chunk=16)[0])(params)   # no gradient
    assert float(value) == pytest.approx(float(l0), rel=1e-6)
    jax.eval_shape(lambda p: pretrain_loss(cfg, p, batch, logits_chunk=64), params)         # ≥ T: one chunk
    with pytest.raises(ValueError, match="divisor"):
        jax.eval_shape(lambda p: pretrain_loss(cfg, p, batch, logits_chunk=5), params)


def test_chunked_logits_need_less_temporary_memory():
    cfg = ModelConfig.llama(vocab_size=4096, d_model=32, n_layers=1, n_heads=4, d_ff=64, max_seq_len=128)
    params = arlm.init_params(cfg, jax.random.PRNGKey(0))
    batch = _lm_batch(cfg.vocab_size, 4, 128)

    def temp_bytes(chunk: int) -> int:
        fn = jax.jit(jax.grad(lambda p, b: pretrain_loss(cfg, p, b, logits_chunk=chunk)[0]))
        return fn.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    whole, chunked = temp_bytes(0), temp_bytes(16)
    logits_bytes = 4 * 128 * 4096 * 4
    assert chunked < whole - 2 * logits_bytes, (whole, chunked)


# --------------------------------------------------------------------------- side by side with transformers

TINY_SEQ = 32


def _hf_dir(bench, preset: str, tmp_path_factory) -> str:
    pytest.importorskip("transformers")
    return bench.write_hf_weights(bench.PRESETS[preset](TINY_SEQ), str(tmp_path_factory.mktemp(f"hf_{preset}")))


@pytest.fixture(scope="module")
def tiny_hf_dir(bench, tmp_path_factory):
    return _hf_dir(bench, "tiny", tmp_path_factory)


@pytest.mark.parametrize("preset", ["tiny", "tiny_gpt2"])
def test_transformers_trains_the_same_weights_with_the_same_adamw(bench, preset, tmp_path_factory):
    """Same file, same batch: equal first losses, and equal losses after AdamW steps (a large lr and weight
    decay so that a mismatch in the optimizer's settings shows: measured here, torch with weight decay 0,
    b1 0.8, b2 0.99 or eps 1e-6 instead moves the losses by 4e-4, 2e-3, 7e-5, 1e-4 relative; matched, 1e-6)."""
    hf_dir = _hf_dir(bench, preset, tmp_path_factory)
    adamw = bench.AdamW(lr=1e-2, weight_decay=0.1)
    cfg = bench.PRESETS[preset](TINY_SEQ)
    tokens = bench.random_tokens(cfg.vocab_size, 2, TINY_SEQ)
    hf_step = bench.hf_train_step(bench.load_hf_model(hf_dir), adamw, tokens)
    hf = [hf_step() for _ in range(3)]
    assert hf[1] < hf[0] - 0.05                      # the steps move the loss: the comparison has teeth
    for variant in ("reference/none/0", "fused/dots/16"):
        v = bench.ArlmVariant.parse(variant)
        config = v.apply(cfg)
        step, info = bench.compile_train_step(config, bench.load_arlm_params(config, hf_dir), adamw.for_optax(),
                                              tokens, v.logits_chunk)
        ours = [step() for _ in range(3)]
        np.testing.assert_allclose(ours, hf, rtol=1e-5, err_msg=variant)
        assert info["compile_s"] > 0 and info["xla_bytes"] > 0


def test_isolated_runs_pin_and_measure(bench, tiny_hf_dir):
    """Each system in its own process on one core: the mask holds, one torch thread, sane memory figures,
    equal first losses, load averages recorded."""
    core = min(os.sched_getaffinity(0))
    results = {}
    for system, variant in (("arlm", "fused/dots/16"), ("transformers", None)):
        spec = {"preset": "tiny", "pin": "one", "system": system, "variant": variant, "batch": 2, "seq": TINY_SEQ,
                "steps": 2, "warmup": 1, "hf_dir": tiny_hf_dir, "adamw": dataclasses.asdict(bench.AdamW())}
        r = results[system] = bench.run_isolated(spec, {core}, timeout_s=300)
        assert r["cpus"] == [core] and r["cpu_per_wall"] < 1.3
        assert r["step_s"] > 0 and r["tokens_per_s"] > 0 and len(r["step_times"]) == 2
        assert 50 < r["baseline_mib"] < 4000 and 0 <= r["peak_step_mib"] <= r["peak_run_mib"] < 4000
        assert len(r["load_avg_before"]) == len(r["load_avg_after"]) == 3
    assert results["transformers"]["threads"] == 1
    assert results["arlm"]["loss_first"] == pytest.approx(results["transformers"]["loss_first"], rel=1e-5)
    result = {"runs": list(results.values()), "summary": bench.summarise(list(results.values())), "cpus": 1,
              "transformers_version": "x", "jax_version": "y", "batch": 2, "seq": TINY_SEQ, "steps": 2, "warmup": 1,
              "adamw": {}}
    (s,) = result["summary"]
    assert s["loss_agrees"] and s["speedup"] > 0 and s["variant"] == "fused/dots/16"
    assert "| tiny | one | arlm | fused/dots/16 |" in bench.markdown_table(result)


def test_run_order_alternates(bench):
    assert bench.run_order(["a", "b"], 0) == [("arlm", "a"), ("transformers", None), ("arlm", "b")]
    assert bench.run_order(["a", "b"], 1) == [("arlm", "b"), ("transformers", None), ("arlm", "a")]
    assert bench.ArlmVariant.parse("fused/dots/64") == bench.ArlmVariant("fused", "dots", 64)
    with pytest.raises(ValueError, match="attention/remat/logits_chunk"):
        bench.ArlmVariant.parse("fused/dots")
