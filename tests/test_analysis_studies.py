"""`experiments/phenomena.py`'s studies end to end on a tiny byte-level model: each writes summary.json
with the fields the issue names and its plot; plus one slow run on SmolLM2 per claim (the figures
of the closing note), marked slow."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
from _params import random_params

import arlm
from arlm.data.tokenizers import ByteTokenizer
from arlm.jobs.phenomena import STUDIES, run_study

HERE = os.path.dirname(os.path.abspath(__file__))


def _config(**overrides):
    path = os.path.join(HERE, "..", "experiments", "configs", "phenomena.py")
    spec = importlib.util.spec_from_file_location("phenomena_cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    for k, v in overrides.items():
        c[k] = v
    return c


TINY_BUDGET = dict(n_items=6, batch_size=8, samples_per_item=2, taus=(0.0, 1.0), max_new_tokens=4,
                   layers=(1, 2), offsets=(2,), k=2, steps=4, eps=(0.1,), normalisations=("raw", "relative"),
                   ks=(0, 1, 2), n_queries=4, tasks=("antonyms",), icl_contexts=2, icl_length=64,
                   cot_items=2, n_chains=2, prompt="The cat sat on")

REQUIRED = {
    "trace": {"prob_sum", "top", "residual_norms", "sampled"},
    "temperature": {"tau", "accuracy", "distinct_2", "ci95", "error_injection"},
    "drift": {"layers", "top_singular_values", "fraction_near_unit", "perturbation"},
    "sycophancy": {"baseline_accuracy", "conditions"},
    "icl": {"k", "accuracy", "ci95", "random_label_accuracy", "icl_score"},
    "cot_rag": {"none", "retrieved", "distractor", "cot", "hidden_state_retrieval_accuracy"},
}


@pytest.fixture(scope="module")
def tiny_model():
    cfg = arlm.ModelConfig.llama(vocab_size=257, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=512)
    return arlm.LoadedModel(cfg, random_params(cfg, std=0.3), ByteTokenizer())


# The three cheapest run in the quick subset; the others' pieces have quick unit tests of their own.
QUICK = ("sycophancy", "temperature", "trace")


@pytest.mark.parametrize("study", [s if s in QUICK else pytest.param(s, marks=pytest.mark.slow)
                                   for s in sorted(STUDIES)])
def test_study_writes_summary_and_plot(study, tiny_model, tmp_path):
    cfg = _config(study=study, workdir=str(tmp_path), **TINY_BUDGET)
    summary = run_study(cfg, model=tiny_model)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert REQUIRED[study] <= set(on_disk) and {"claim", "verdict"} <= set(on_disk)
    assert (tmp_path / f"{study}.png").stat().st_size > 10_000
    assert on_disk["verdict"] == summary["verdict"]
    if study == "sycophancy":
        for cond in on_disk["conditions"].values():
            assert {"flip_rate", "n", "ci95"} <= set(cond)


def test_run_study_rejects_bad_config(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown study"):
        run_study(_config(study="vibes", workdir=str(tmp_path)), model=tiny_model)
    with pytest.raises(ValueError, match="size"):
        run_study(_config(size="huge", workdir=str(tmp_path)), model=tiny_model)


def test_user_items_file_is_used(tiny_model, tmp_path):
    items = tmp_path / "mine.jsonl"
    items.write_text("".join(json.dumps({"input": f"a{i}", "output": f"b{i}"}) + "\n" for i in range(5)))
    cfg = _config(study="icl", workdir=str(tmp_path), **{**TINY_BUDGET, "item_file": str(items)})
    summary = run_study(cfg, model=tiny_model)
    assert list(summary["tasks"]) == [str(items)]
    assert all(t["prompt"].startswith("a") for t in summary["tasks"][str(items)]["examples"])


@pytest.mark.slow
def test_continual_study_writes_summary_and_frontier(tmp_path):
    """The training study on a tiny budget: every arm of every seed, the per-arm intervals, the
    equal-learning comparison, summary.json and the frontier plot."""
    from arlm.jobs.phenomena import TRAINING_STUDIES

    cfg = _config(study="continual", workdir=str(tmp_path))
    cfg.continual.update(dict(seeds=(0, 1), d_model=16, n_heads=2, d_ff=32, seq_len=16, batch_size=4,
                              steps_a=6, steps_b=3, corpus_chars=20_000, b_problems=500, val_windows=4,
                              fisher_batches=1, lams_l2=(0.1,), lams_ewc=(10.0, 1e4), lams_representation=(1.0,),
                              lora_ranks=(2,)))
    assert "continual" in TRAINING_STUDIES
    summary = run_study(cfg)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert {"claim", "verdict", "arms", "at_equal_learning", "runs"} <= set(on_disk)
    assert (tmp_path / "continual.png").stat().st_size > 10_000
    names = [a["arm"] for a in on_disk["arms"]]
    assert names == ["none λ=0", "l2 λ=0.1", "ewc λ=10", "ewc λ=10000", "representation λ=1", "lora r=2"]
    for arm in on_disk["arms"]:
        assert arm["forgetting"]["n"] == 2 and arm["forgetting"]["lo"] <= arm["forgetting"]["mean"] <= arm[
            "forgetting"]["hi"]
    for run in summary["runs"]:
        by_name = {a["arm"]: a for a in run["arms"]}
        # forgetting and learning are differences of the losses this run reports
        for a in run["arms"]:
            assert abs(a["forgetting"] - (a["loss_a"] - run["loss_a_anchor"])) < 1e-9
            assert abs(a["learning"] - (run["loss_b_anchor"] - a["loss_b"])) < 1e-9
        assert by_name["lora r=2"]["lora_rank"] == 2 and by_name["none λ=0"]["lam"] == 0
    assert set(on_disk["at_equal_learning"]) == {"l2", "ewc", "representation", "lora"}


@pytest.mark.slow
def test_contractive_study_writes_summary_and_plot(tmp_path):
    cfg = _config(study="contractive", workdir=str(tmp_path))
    cfg.contractive.update(dict(seeds=(0, 1), gains=(1.0, 0.7), d_model=16, n_layers=2, n_heads=2, d_ff=32,
                                seq_len=24, batch_size=4, steps=4, corpus_chars=20_000, val_windows=4,
                                jacobian_windows=1, lags=(0, 8), inject_lags=(1, 4)))
    summary = run_study(cfg)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert {"claim", "verdict", "gains", "lags", "inject_lags"} <= set(on_disk)
    assert (tmp_path / "contractive.png").stat().st_size > 10_000
    assert [g["gain"] for g in on_disk["gains"]] == [1.0, 0.7]
    for g in summary["gains"]:
        assert len(g["top_sigma"]) == 2 and len(g["excess"]) == 2 and g["loss"]["n"] == 2
        losses = [r["loss"] for r in g["runs"]]          # the interval is over these per-seed values
        assert g["loss"]["mean"] == pytest.approx(sum(losses) / 2) and g["loss"]["lo"] <= min(losses)
    assert "γ = 0.7" in on_disk["verdict"]


@pytest.mark.slow
def test_alignment_drift_study_aligns_saves_and_measures_each_policy(tmp_path):
    cfg = _config(study="alignment_drift", workdir=str(tmp_path))
    a = cfg.alignment_drift.align
    a.methods = ("dpo", "rlvr_grpo")
    a.iterations, a.eval_every = 2, 1
    a.rollout.prompts, a.rollout.k = 2, 4
    a.preferences.prompts, a.preferences.k = 64, 4
    a.dpo.batch_pairs = 2
    a.eval.problems, a.eval.k = 8, 2
    a.start.steps, a.start.target_success = 20, 0.0
    a.mesh.num_devices = 1
    cfg.alignment_drift.update(dict(seeds=(0,), eval_problems=24, jacobian_problems=2, lags=(0, 1, 3)))
    s = run_study(cfg)
    assert (tmp_path / "alignment_drift.png").stat().st_size > 10_000
    assert json.load(open(tmp_path / "summary.json"))["verdict"] == s["verdict"]
    assert list(s["policies"]) == ["ref", "dpo", "rlvr_grpo"]
    for seed, run in zip((0,), s["runs"]):
        assert os.path.isdir(os.path.join(tmp_path, f"align_seed{seed}", "policies", "rlvr_grpo"))
        for name, m in run["policies"].items():
            assert m["hall_sampled"]["n"] == m["hall_greedy"]["n"] == s["eval_problems"]
            assert len(m["top_sigma"]) == 3 and all(x > 0 for x in m["top_sigma"])
        assert run["rlvr_recovery"]["n"] == run["policies"]["rlvr_grpo"]["recovery"]["n"]
    # measuring saved runs again (align_dir) gives the same numbers without training
    cfg2 = _config(study="alignment_drift", workdir=str(tmp_path / "again"))
    cfg2.alignment_drift.update(dict(seeds=(0,), eval_problems=24, jacobian_problems=2, lags=(0, 1, 3),
                                     align_dir=str(tmp_path / "align_seed{seed}")))
    cfg2.alignment_drift.align = cfg.alignment_drift.align
    again = run_study(cfg2)
    assert again["runs"][0]["policies"] == s["runs"][0]["policies"]


def test_every_study_has_a_plot_and_every_training_study_a_config_and_a_gpu_version():
    from arlm.analysis import plots
    from arlm.jobs.phenomena import TRAINING_STUDIES
    cfg = _config()
    assert set(STUDIES) | set(TRAINING_STUDIES) == set(plots.PLOTS)
    assert set(TRAINING_STUDIES) == {"continual", "alignment_drift", "sycophancy_frontier", "icl_emergence",
                                     "contractive"}
    for study in TRAINING_STUDIES:
        assert study in cfg and study in cfg.large, study
        assert set(cfg.large[study]) == set(cfg[study]), study      # the GPU version replaces every field
