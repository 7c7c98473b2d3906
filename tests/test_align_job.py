"""`experiments/align.py`'s job, end to end on tiny budgets: the CPU default's pipeline (SFT-ed start
model, reward model, every method, metrics, plots, samples, summary) and the SmolLM2 config."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import pytest

from arlm.jobs.align import METHODS, run_alignment
from arlm.train.metrics import read_metrics
from tests._hf_oracle import gguf_path_or_skip

HERE = os.path.dirname(os.path.abspath(__file__))


def _config(name: str):
    path = os.path.join(HERE, "..", "experiments", "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"align_cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _shrink(c, workdir: str):
    c.workdir = workdir
    c.iterations, c.eval_every = 2, 1
    c.rollout.prompts, c.rollout.k = 2, 4
    c.preferences.prompts, c.preferences.k = 64, 4
    c.reward_model.steps, c.reward_model.batch_size = 2, 2
    c.dpo.batch_pairs = 2
    c.eval.problems, c.eval.k, c.eval.samples = 8, 2, 3
    c.mesh.num_devices = 1
    return c


def _check_outputs(workdir: str, methods, iterations: int = 2) -> dict:
    for name in ("metrics.jsonl", "reward_vs_step.png", "kl_vs_step.png", "frontier.png", "samples.txt",
                 "summary.json"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0, name
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert set(summary["methods"]) == set(methods)
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    for m in methods:
        steps = [r["step"] for r in records if r["split"] == m]
        assert steps[0] == 0 and steps[-1] == iterations and steps == sorted(set(steps)), (m, steps)
        assert summary["methods"][m]["kl"] >= 0
    start = [r for r in records if r["step"] == 0]
    assert all(r["kl"] == 0.0 for r in start)         # π_θ = π_ref before any update
    text = open(os.path.join(workdir, "samples.txt")).read()
    assert all(f"## {m}" in text for m in methods)
    return summary


@pytest.mark.slow
def test_align_cpu_default_raises_verifier_success(tmp_path, monkeypatch):
    """The acceptance run itself: the CPU default config (≈2 min), every method must raise the
    verifier's success on held-out problems, for sampled answers (E_{y~π_θ}[r], eq. 9's reward term;
    228 problems × 4 samples) and not lose more than noise for greedy ones. The same run checks the
    job's outputs: metrics, plots, samples and summary for every method."""
    monkeypatch.setenv("MPLBACKEND", "Agg")
    c = _config("align")
    c.workdir = str(tmp_path)
    c.mesh.num_devices = 1              # as `python experiments/align.py` runs on a 1-device CPU
    summary = run_alignment(c)
    _check_outputs(c.workdir, c.methods, iterations=c.iterations)
    assert 0.0 <= summary["start"]["success_greedy"] <= 1.0
    assert "heldout_accuracy" in summary["methods"]["rlhf_ppo"]
    for m, s in summary["methods"].items():
        assert s["success_sampled"] > summary["start"]["success_sampled"], (m, s)
        assert s["gain_greedy"] > -0.02, (m, s)
        assert 0 < s["kl"] < 2.0, (m, s)
    # save_policies: π_ref and every final policy load back and answer as the summary says
    from arlm.jobs.align import greedy_success, load_policies, task_io
    policies = load_policies(c.workdir)
    assert list(policies) == ["ref", *c.methods]
    io = task_io(c)
    eval_problems = list({p.prompt: p for p in io.task.problems(c.eval.problems, "test")}.values())
    for name, want in (("ref", summary["start"]), ("dpo", summary["methods"]["dpo"])):
        model_cfg, params = policies[name]
        r, _ = greedy_success(io, model_cfg, params, eval_problems, jax.random.PRNGKey(0))
        assert float(r.mean()) == pytest.approx(want["success_greedy"], abs=1e-6), name


def test_align_job_rejects_unknown_method(tmp_path):
    c = _shrink(_config("align"), str(tmp_path))
    c.start.steps = 1
    c.methods = ("dpo_typo",)
    with pytest.raises(ValueError, match="unknown method 'dpo_typo'"):
        run_alignment(c)
    assert set(METHODS) >= set(_config("align").methods)


@pytest.mark.slow
def test_align_job_smollm2_config_runs(tmp_path):
    """The SmolLM2-135M-Instruct config, two iterations with LoRA on CPU of one offline method (DPO, on
    pairs sampled from the model) and one on-policy method (GRPO, verifier rewards): a smoke run of the
    real-model path (the real budget needs a GPU; every method runs in the CPU default's test)."""
    gguf_path_or_skip("smollm2-135m-instruct")
    c = _shrink(_config("align_smollm2"), str(tmp_path))
    c.methods = ("dpo", "rlvr_grpo")
    c.task.max_operand, c.task.max_new_tokens = 20, 6
    c.preferences.prompts = 24
    run_alignment(c)
    summary = _check_outputs(c.workdir, c.methods)
    assert summary["start"]["model"] == "smollm2-135m-instruct"


@pytest.mark.slow
def test_sft_start_stops_at_the_first_check_that_reaches_the_target():
    """π_ref of the CPU default is SFT-ed until its greedy answers solve `target_success` of the probe
    problems: the run stops at the first check that reaches it, so one check earlier it had not."""
    from arlm.jobs.align import _task_and_model, greedy_success

    def start(**fields):
        c = _config("align")
        c.mesh.num_devices = 1
        c.start.update(fields)
        io, model_cfg, params, info = _task_and_model(c)
        probe = io.task.problems(c.start.pool, "train")[:c.start.probe]
        return info, float(greedy_success(io, model_cfg, params, probe, jax.random.PRNGKey(0))[0].mean())

    info, success = start(target_success=0.3)
    assert info["sft_probe_success"] == success >= 0.3          # re-measured on the returned params
    steps = info["sft_steps"]
    assert steps % 25 == 0 and 25 <= steps < 600, info
    earlier, earlier_success = start(target_success=0.0, steps=steps - 25)
    assert earlier == {"sft_steps": steps - 25} and earlier_success < 0.3
    capped, capped_success = start(target_success=1.01, steps=30)   # unreachable: stops at the cap
    assert capped == {"sft_steps": 30, "sft_probe_success": capped_success}
