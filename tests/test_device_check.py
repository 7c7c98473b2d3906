"""`experiments/device_check.py` on the CPU: the logits comparison against injected differences, the
decode floor's byte count against a hand count, the install stage failing without raising, stage
failures and time limits recorded in the JSON, and the --cpu-smoke run of every stage (slow: each
compiles train steps or decode loops). No timing is asserted."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import arlm
from arlm.config import ModelConfig

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ("env", "install", "logits", "train_gpt2", "train_llama", "decode_b1", "decode_b64")


@pytest.fixture(scope="module")
def dc():
    path = os.path.join(HERE, "..", "experiments", "device_check.py")
    spec = importlib.util.spec_from_file_location("device_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["device_check"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("device_check", None)


def run_main(dc, tmp_path, *argv: str) -> tuple[dict, dict]:
    """main() into tmp_path; (its returned report, the JSON on disk)."""
    out = tmp_path / "device_check.json"
    report = dc.main(["--out", str(out), *argv])
    return report, json.loads(out.read_text())


def assert_every_stage_has_a_status(on_disk: dict) -> None:
    assert tuple(on_disk["stages"]) == STAGES
    for name, rec in on_disk["stages"].items():
        assert rec["status"] in ("ok", "failed", "timeout", "skipped"), name
        if rec["status"] == "skipped":
            assert rec["reason"]
        if rec["status"] in ("failed", "timeout"):
            assert rec["error"]
    assert set(on_disk["summary"]["status"]) == set(STAGES)


# --------------------------------------------------------------------------------------------
# The logits comparison
# --------------------------------------------------------------------------------------------

def test_compare_logits_passes_small_errors_and_fails_injected_ones(dc):
    ref = np.random.default_rng(0).normal(0.0, 2.0, (3, 7, 50))
    atol, rtol = 1e-3, 1e-4
    tol = atol + rtol * np.abs(ref).max()
    same = dc.compare_logits(ref, ref, atol, rtol)
    assert same["passed"] and same["max_abs_diff"] == 0.0 and same["argmax_agree_fraction"] == 1.0
    assert same["tolerance"] == pytest.approx(tol)
    assert dc.compare_logits(ref, ref + 0.5 * tol, atol, rtol)["passed"]

    bad = ref.copy()
    bad[1, 2, 3] += 10 * tol                                     # one logit off by ten tolerances
    r = dc.compare_logits(ref, bad, atol, rtol)
    assert not r["passed"] and not r["within_tolerance"] and r["max_abs_diff"] == pytest.approx(10 * tol)

    nan = ref.copy()
    nan[0, 0, 0] = np.nan
    r = dc.compare_logits(ref, nan, atol, rtol)
    assert not r["passed"] and not r["finite"]
    assert not dc.compare_logits(ref, ref[:, :-1], atol, rtol)["passed"]          # shapes differ


def test_argmax_flips_fail_unless_they_are_near_ties(dc):
    ref = np.zeros((2, 5))
    ref[0, 1], ref[1, 2], ref[1, 3] = 5.0, 1.0, 1.0 - 1e-6         # row 1: a near-tie between 2 and 3
    atol, rtol = 1e-3, 0.0
    near_tie = ref.copy()
    near_tie[1, 3] += 2e-6                                       # within tolerance, flips the argmax
    r = dc.compare_logits(ref, near_tie, atol, rtol)
    assert r["argmax_disagreements"] == 1 and r["argmax_disagreements_beyond_near_ties"] == 0 and r["passed"]
    decisive = ref.copy()
    decisive[0, 4] = 6.0                                          # a clear winner moved: far out of tolerance
    r = dc.compare_logits(ref, decisive, atol, rtol)
    assert r["argmax_disagreements_beyond_near_ties"] == 1 and not r["passed"]
    assert r["argmax_agree_fraction"] == 0.5


# --------------------------------------------------------------------------------------------
# The decode floor
# --------------------------------------------------------------------------------------------

def param_sizes(dc, config: ModelConfig) -> dict[str, int]:
    return dc.top_level_sizes(jax.eval_shape(lambda: arlm.init_params(config, jax.random.PRNGKey(0))))


def test_decode_bytes_match_a_hand_count_llama_gqa(dc):
    v, d, L, h, kv, f = 50, 32, 3, 4, 2, 48
    k = d // h
    cfg = ModelConfig.llama(vocab_size=v, d_model=d, n_layers=L, n_heads=h, n_kv_heads=kv, d_ff=f, max_seq_len=64,
                            dtype="bfloat16")
    per_layer = d * h * k + 2 * d * kv * k + h * k * d + 3 * d * f + 2 * d     # wq, wk, wv, wo, SwiGLU, 2 norms
    weights = L * per_layer + v * d + d                                        # tied embedding, final norm
    batch, slots = 5, 24
    got = dc.decode_bytes_per_step(cfg, param_sizes(dc, cfg), batch, slots)
    assert got["itemsize"] == 2
    assert got["weight_bytes"] == 2 * weights
    assert got["kv_cache_bytes"] == 2 * (2 * L * batch * slots * kv * k)
    assert got["total_bytes"] == got["weight_bytes"] + got["kv_cache_bytes"]


def test_decode_bytes_count_only_the_gathered_rows_of_lookup_tables(dc):
    v, d, L, f, window = 40, 16, 2, 64, 32
    cfg = ModelConfig.gpt2(vocab_size=v, d_model=d, n_layers=L, n_heads=2, d_ff=f, max_seq_len=window,
                           tie_embeddings=False)
    per_layer = 4 * d * d + 4 * d + 2 * 2 * d + d * f + f + f * d + d   # q k v o + biases, 2 LayerNorms, MLP
    dense = L * per_layer + 2 * d + d * v                                # final LayerNorm, untied unembedding
    batch = 3
    got = dc.decode_bytes_per_step(cfg, param_sizes(dc, cfg), batch, 8)
    assert dc.lookup_tables(cfg) == ["pos_embed", "embed"]
    assert got["itemsize"] == 4                                          # float32 config
    assert got["weight_bytes"] == 4 * (dense + 2 * batch * d)           # B rows of positions and of embed
    tied = cfg.replace(tie_embeddings=True)
    assert dc.lookup_tables(tied) == ["pos_embed"]


def test_decode_floor_arithmetic(dc):
    floor = dc.decode_floor(1000, 4, 1e6, {"decode": 2000.0, "end_to_end": None})
    assert floor["floor_s_per_step"] == pytest.approx(1e-3)
    assert floor["floor_tokens_per_s"] == pytest.approx(4000.0)
    assert floor["fraction_of_floor_decode"] == pytest.approx(0.5)
    assert floor["fraction_of_floor_end_to_end"] is None
    assert dc.decode_floor(1000, 4, None, {"decode": 1.0}) is None


# --------------------------------------------------------------------------------------------
# Install, stage failures, limits
# --------------------------------------------------------------------------------------------

def test_install_spec_and_order(dc, tmp_path):
    assert dc.jax_cuda_spec("13.0", "0.11.2") == "jax[cuda13]==0.11.2"
    assert dc.jax_cuda_spec("12.4", "0.10.2") == "jax[cuda12]==0.10.2"
    assert dc.jax_cuda_spec(None, None) == "jax[cuda12]"
    attempts = dc.pip_attempts("jax[cuda12]", str(tmp_path))
    assert [a[0] for a in attempts] == ["wheelhouse", "index"]
    assert "--no-index" in attempts[0][1] and str(tmp_path) in attempts[0][1]
    assert [a[0] for a in dc.pip_attempts("jax[cuda12]", None)] == ["index"]


def test_when_the_install_runs(dc):
    gpu_seen = {"available": True, "cuda_version": "13.0"}
    assert dc.install_skip_reason("auto", False, False, gpu_seen) is None           # jax blind, a GPU there
    assert dc.install_skip_reason("auto", True, False, gpu_seen) == "jax already sees a GPU"
    assert dc.install_skip_reason("auto", False, True, gpu_seen) == "cpu smoke run"
    assert dc.install_skip_reason("auto", False, False, {"available": False, "error": "x"}).startswith("no NVIDIA")
    assert dc.install_skip_reason("never", False, False, gpu_seen) == "--install never"
    assert dc.install_skip_reason("force", True, True, {}) is None


@pytest.mark.parametrize("failure", ["exit_status", "no_pip", "timeout"])
def test_a_failing_install_is_recorded_not_raised(dc, tmp_path, monkeypatch, failure):
    calls = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(cmd)
        if failure == "no_pip":
            raise FileNotFoundError(2, "No such file or directory", cmd[0])
        if failure == "timeout":
            raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"))
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    result = dc.install_gpu_jax("jax[cuda12]==0.0", str(tmp_path), timeout_s=30)
    assert result["status"] == "failed" and result["error"]
    assert [a["source"] for a in result["attempts"]] == ["wheelhouse", "index"]
    assert all(a["rc"] != 0 for a in result["attempts"])
    assert sum("pip" in c for c in calls) == 2

    report, on_disk = run_main(dc, tmp_path, "--cpu-smoke", "--install", "force", "--stages", "",
                               "--wheelhouse", str(tmp_path / "missing"))
    assert_every_stage_has_a_status(on_disk)
    install = on_disk["stages"]["install"]
    assert install["status"] == "failed" and install["error"]
    assert "not a directory" in install["result"]["attempts"][0]["error"]        # the missing wheelhouse
    assert on_disk["stages"]["env"]["status"] == "ok"
    assert on_disk["stages"]["env"]["result"]["nvidia_smi"]["available"] is False
    assert all(on_disk["stages"][s]["status"] == "skipped" for s in STAGES[2:])
    assert on_disk["summary"]["all_ok"] is False and "install" in on_disk["summary"]["failed_or_timed_out"]
    assert report["summary"] == on_disk["summary"]


def test_a_failing_stage_is_recorded_and_the_others_still_run(dc, tmp_path, monkeypatch):
    def broken(plan):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(dc, "stage_logits", broken)
    _, on_disk = run_main(dc, tmp_path, "--cpu-smoke", "--stages", "logits")
    assert_every_stage_has_a_status(on_disk)
    logits = on_disk["stages"]["logits"]
    assert logits["status"] == "failed" and "injected failure" in logits["error"] and logits["traceback"]
    assert on_disk["stages"]["install"]["reason"] == "cpu smoke run"
    assert on_disk["summary"]["all_ok"] is False


def test_without_a_gpu_the_full_run_skips_its_measurements_and_is_not_ok(dc, tmp_path):
    _, on_disk = run_main(dc, tmp_path, "--no-isolate", "--install", "never", "--stages", "logits,decode_b1")
    assert_every_stage_has_a_status(on_disk)
    assert on_disk["mode"] == "full" and on_disk["stages"]["env"]["result"]["has_gpu"] is False
    assert on_disk["stages"]["logits"]["reason"].startswith("jax sees no GPU")
    assert on_disk["stages"]["train_gpt2"]["reason"].startswith("not selected")
    assert on_disk["summary"]["skipped_unmeasured"] == ["logits", "decode_b1"]
    assert on_disk["summary"]["all_ok"] is False


def test_a_stage_past_its_limit_is_killed_and_recorded(dc, tmp_path):
    log = tmp_path / "stage.log"
    rec = dc.run_in_child("env", ["--cpu-smoke"], 0.5, str(log))
    assert rec["status"] == "timeout" and "killed after" in rec["error"]
    assert "stage env" in log.read_text()


def test_budget_and_strict_json(dc, tmp_path):
    assert dc.Budget(1000).stage_limit(30) == 30
    assert dc.Budget(100).stage_limit(300) == pytest.approx(100 - dc.BUDGET_RESERVE_S, abs=1)
    assert dc.Budget(20).stage_limit(300) is None                       # 10 s would be left: skip
    path = tmp_path / "x.json"
    dc.write_json({"a": float("nan"), "b": [float("inf"), 1.5]}, str(path))
    assert json.loads(path.read_text()) == {"a": None, "b": [None, 1.5]}


# --------------------------------------------------------------------------------------------
# The --cpu-smoke run, stage by stage (each compiles models: slow)
# --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_logits_compares_two_cpu_devices(dc, tmp_path):
    _, on_disk = run_main(dc, tmp_path, "--cpu-smoke", "--stages", "logits")
    assert_every_stage_has_a_status(on_disk)
    assert on_disk["stages"]["env"]["status"] == "ok"
    r = on_disk["stages"]["logits"]["result"]
    assert on_disk["stages"]["logits"]["status"] == "ok" and r["passed"] is True
    assert r["reference_ran_on"] == [r["reference_device"]] and r["reference_device"].startswith("cpu")
    if len(jax.devices("cpu")) > 1:                     # tests/conftest.py: 8 host devices
        assert r["reference_device"] != r["device"]
    for name, v in r["variants"].items():
        assert v["ran_on"] == [r["device"]], name
        assert v["passed"], name
        if name.startswith("float32"):
            assert v["max_abs_diff"] <= 1e-6 and v["argmax_agree_fraction"] == 1.0, name
    assert r["variants"]["bfloat16_fused"]["max_abs_diff"] > 0            # bf16 differs, within its tolerance
    assert on_disk["summary"]["headline"]["logits_passed"] is True and on_disk["summary"]["all_ok"] is True


@pytest.mark.slow
def test_smoke_decode_against_the_hand_counted_floor(dc, tmp_path):
    _, on_disk = run_main(dc, tmp_path, "--cpu-smoke", "--stages", "decode_b1,decode_b64")
    assert_every_stage_has_a_status(on_disk)
    # the smoke preset "tiny": V=256, d=64, L=2, H=N_kv=4, d_head=16, d_ff=128, tied; bfloat16
    weights = 256 * 64 + 64 + 2 * (4 * 64 * 64 + 3 * 64 * 128 + 2 * 64)
    for stage, batch in (("decode_b1", 1), ("decode_b64", 64)):
        rec = on_disk["stages"][stage]
        assert rec["status"] == "ok", rec.get("error")
        r = rec["result"]
        assert r["batch"] == batch and r["cache_len"] == 8 + 16
        assert r["bytes_per_step"]["weight_bytes"] == 2 * weights
        assert r["bytes_per_step"]["kv_cache_bytes"] == 2 * (2 * 2 * batch * 24 * 4 * 16)
        assert r["tokens_per_s"] > 0 and r["seconds_median"] > 0
        assert r["floor_at_peak_bandwidth"] is None                        # no peak bandwidth for a CPU
        floor = r["floor_at_measured_copy_bandwidth"]
        bw = r["measured_copy"]["copy_bytes_per_s"]
        assert bw > 0 and floor["bandwidth_bytes_per_s"] == bw
        assert floor["floor_tokens_per_s"] == pytest.approx(batch * bw / r["bytes_per_step"]["total_bytes"])
        assert 0 < floor["fraction_of_floor_end_to_end"] < 100
        assert r["decode_tokens_per_s"] is None or r["decode_tokens_per_s"] > 0
        frac = floor["fraction_of_floor_decode"]
        assert frac is None or 0 < frac < 100


@pytest.mark.slow
def test_smoke_train_both_presets(dc, tmp_path):
    _, on_disk = run_main(dc, tmp_path, "--cpu-smoke", "--stages", "train_gpt2,train_llama")
    assert_every_stage_has_a_status(on_disk)
    for stage, preset in (("train_gpt2", "gpt2_tiny"), ("train_llama", "tiny")):
        rec = on_disk["stages"][stage]
        assert rec["status"] == "ok", rec.get("error")
        r = rec["result"]
        assert r["preset"] == preset and r["dtype"] == "bfloat16" and r["attention"] == "fused"
        assert r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 and r["compile_s"] > 0
        assert r["mfu"] is None or r["mfu"] > 0                            # no bf16 peak for a CPU: None
        assert math.isfinite(r["loss"])
        assert on_disk["summary"]["headline"][stage]["tokens_per_s"] == r["tokens_per_s"]


@pytest.mark.slow
def test_isolated_stages_run_in_child_processes(dc, tmp_path):
    """The path a GPU run takes: each stage in its own process, results read back, output in the log."""
    _, on_disk = run_main(dc, tmp_path, "--cpu-smoke", "--isolate", "--stages", "logits")
    assert_every_stage_has_a_status(on_disk)
    for stage in ("env", "logits"):
        rec = on_disk["stages"][stage]
        assert rec["status"] == "ok" and rec["rc"] == 0, rec.get("log_tail")
    assert on_disk["stages"]["env"]["result"]["executable"] == sys.executable
    assert on_disk["stages"]["logits"]["result"]["passed"] is True
    log = (tmp_path / "device_check.log").read_text()
    assert "===== stage env" in log and "===== stage logits" in log
