"""`experiments/bench_train.py`: the FLOPs formula against a hand count, the peak table, and one tiny
run writing its JSON (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

import arlm
from arlm.config import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", os.path.join(HERE, "..", "experiments",
                                                                              "bench_train.py"))
    module = importlib.util.module_from_spec(spec)
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
