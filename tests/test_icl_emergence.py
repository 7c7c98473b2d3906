"""The icl_emergence study (open question 4): its recall task, its metrics and a tiny end-to-end run."""

from __future__ import annotations

import functools
import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arlm.analysis import icl_emergence as ie
from arlm.model import init_params

TASK = ie.RecallTask(n_keys=6, n_values=5, n_pairs=4, n_queries=5)
TINY = types.SimpleNamespace(seeds=(0, 1), depths=(1,), widths=(16,), n_heads=2, ff_mult=2, n_keys=4, n_values=4,
                             n_pairs=2, n_queries=2, batch_size=8, learning_rate=1e-3, eval_steps=(3, 0),
                             eval_sequences=16, margin=2.0)


def test_every_answer_is_the_value_paired_with_its_key_earlier_in_the_sequence():
    d = ie.recall_sequences(TASK, 200, np.random.default_rng(3))
    tokens = d["tokens_BxS"]
    k, q = TASK.n_pairs, TASK.n_queries
    assert tokens.shape == (200, 1 + 2 * (k + q)) and tokens.dtype == np.int32
    assert (tokens[:, 0] == ie.BOS).all()
    keys, values = tokens[:, 1:1 + 2 * k:2], tokens[:, 2:2 + 2 * k:2]
    queries, answers = tokens[:, 1 + 2 * k::2], tokens[:, 2 + 2 * k::2]
    assert ((keys >= 1) & (keys < 1 + TASK.n_keys)).all() and ((queries >= 1) & (queries < 1 + TASK.n_keys)).all()
    assert ((values >= 1 + TASK.n_keys) & (values < TASK.vocab_size)).all()
    assert ((answers >= 1 + TASK.n_keys) & (answers < TASK.vocab_size)).all()
    for b in range(len(tokens)):
        assert len(set(keys[b])) == k and len(set(values[b])) == k          # a mapping: distinct keys and values
        mapping = dict(zip(keys[b].tolist(), values[b].tolist()))
        for x, y in zip(queries[b], answers[b]):
            assert mapping[int(x)] == int(y)                                    # only the context determines y
    np.testing.assert_array_equal(keys, d["keys_BxK"])
    np.testing.assert_array_equal(answers, d["answers_BxQ"])
    # fresh mappings: the sequences do not share one
    assert len({tuple(r) for r in np.concatenate([keys, values], 1).tolist()}) > 150
    again = ie.recall_sequences(TASK, 200, np.random.default_rng(3))["tokens_BxS"]
    np.testing.assert_array_equal(tokens, again)
    assert not np.array_equal(tokens, ie.recall_sequences(TASK, 200, np.random.default_rng(4))["tokens_BxS"])


def test_masks_pick_the_first_values_and_the_answers_among_the_targets():
    batch = ie.eval_batch(TASK, 7, seed=0)
    assert batch["inputs"].shape == batch["targets"].shape == (7, TASK.seq_len)
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    d = ie.recall_sequences(TASK, 7, np.random.default_rng(0))
    np.testing.assert_array_equal(batch["targets"][batch["answer_mask_BxT"]].reshape(7, -1), d["answers_BxQ"])
    np.testing.assert_array_equal(batch["targets"][batch["first_mask_BxT"]].reshape(7, -1), d["values_BxK"])
    assert not (batch["answer_mask_BxT"] & batch["first_mask_BxT"]).any()


def test_reference_scores():
    task = ie.RecallTask(n_keys=8, n_values=8, n_pairs=4, n_queries=8)
    assert task.vocab_size == 17 and task.seq_len == 24 and task.chance == 0.25
    assert task.ideal_score == pytest.approx(-np.mean(np.log([8, 7, 6, 5])))
    assert task.binding_free_score == pytest.approx(math.log(4) - np.mean(np.log([8, 7, 6, 5])))
    with pytest.raises(ValueError, match="n_pairs"):
        ie.RecallTask(n_keys=3, n_values=8, n_pairs=4)


def _numpy_metrics(logits: np.ndarray, batch: dict) -> dict:
    """An independent reference: log-softmax and argmax in float64 numpy."""
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    lp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    a, f = batch["answer_mask_BxT"], batch["first_mask_BxT"]
    hits = logits.argmax(-1)[a] == batch["targets"][a]
    return {"accuracy": hits.mean(), "k": int(hits.sum()), "answer_loss": -lp[a].mean(), "first_loss": -lp[f].mean(),
            "icl_score": -lp[a].mean() + lp[f].mean(), "loss": -lp.mean()}


def _metrics(logits: np.ndarray, batch: dict) -> dict:
    logp, pred = ie.logp_and_argmax(jnp.asarray(logits), jnp.asarray(batch["targets"]))
    return ie.icl_metrics(np.asarray(logp), np.asarray(pred), batch)


def test_metrics_match_numpy_on_random_oracle_and_uniform_logits():
    batch = ie.eval_batch(TASK, 9, seed=1)
    shape = (*batch["targets"].shape, TASK.vocab_size)
    logits = np.random.default_rng(0).normal(size=shape).astype(np.float32) * 3
    got, want = _metrics(logits, batch), _numpy_metrics(logits, batch)
    for key in ("accuracy", "answer_loss", "first_loss", "icl_score", "loss"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), key
    assert got["k"] == want["k"] and got["n"] == 9 * TASK.n_queries
    lo, hi = got["ci95"]
    assert 0 <= lo <= got["accuracy"] <= hi <= 1

    # perfect recall, uniform elsewhere: S = 0 − log V
    recall = 30.0 * np.eye(TASK.vocab_size, dtype=np.float32)[batch["targets"]] * batch["answer_mask_BxT"][..., None]
    m = _metrics(recall, batch)
    assert m["accuracy"] == 1.0 and m["ci95"][1] == 1.0 and m["answer_loss"] < 1e-6
    assert m["first_loss"] == pytest.approx(math.log(TASK.vocab_size), rel=1e-6)
    assert m["icl_score"] == pytest.approx(-math.log(TASK.vocab_size), rel=1e-5)

    m = _metrics(np.zeros(shape, np.float32), batch)
    assert m["accuracy"] == 0.0                       # argmax of a tie is BOS, never a value
    for key in ("answer_loss", "first_loss", "loss"):
        assert m[key] == pytest.approx(math.log(TASK.vocab_size), rel=1e-6)
    assert m["icl_score"] == pytest.approx(0.0, abs=1e-6)


def test_the_model_path_of_a_zero_model_is_uniform():
    task = ie.task_of(TINY)                            # the end-to-end run's model and batch shape: one compile
    config = ie.model_config(TINY, task, 1, 16)
    shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.PRNGKey(0))
    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
    m = ie.accuracy_and_score(config, zeros, ie.eval_batch(task, TINY.eval_sequences, seed=2))
    assert m["loss"] == pytest.approx(math.log(task.vocab_size), rel=1e-6) and m["accuracy"] == 0.0


def test_emergence_is_the_first_step_whose_wilson_lower_bound_clears_the_threshold():
    curve = [{"ci95": [0.1, 0.3]}, {"ci95": [0.45, 0.6]}, {"ci95": [0.6, 0.8]}, {"ci95": [0.2, 0.9]}]
    assert ie.emergence_step([0, 10, 20, 30], curve, 0.5) == 20
    assert ie.emergence_step([0, 10, 20, 30], curve, 0.7) is None
    runs = [{"emergence_step": 20, "curve": [{"accuracy": 0.1, "icl_score": 0.0, "answer_loss": 1.0, "first_loss": 1.0,
                                              "loss": 1.0, "ci95": [0.0, 0.2]}]},
            {"emergence_step": None, "curve": [{"accuracy": 0.3, "icl_score": -0.5, "answer_loss": 0.5,
                                                "first_loss": 1.0, "loss": 0.8, "ci95": [0.2, 0.4]}]}]
    point = ie.summarize_point(2, 32, runs, 1)
    assert point["emergence"] == {"step": None, "per_seed": [20, None], "seeds_emerged": 1}
    assert point["mean"]["accuracy"][0]["mean"] == pytest.approx(0.2)
    assert ie.summarize_point(2, 32, [runs[0], runs[0]], 1)["emergence"]["step"] == 20


@pytest.mark.slow
def test_training_in_chunks_keeps_one_adam_state():
    task = ie.task_of(TINY)
    config = ie.model_config(TINY, task, 1, 16)
    trainer = ie.checkpoint_runner(config, TINY.learning_rate)
    init = ie.fresh_params(config, 0)

    def train(chunks):
        rng = np.random.default_rng(0)
        batches = iter(lambda: ie.lm_batch(task, TINY.batch_size, rng), None)
        state = trainer.start(init)
        for n in chunks:
            state = trainer.advance(state, batches, n)
        return state

    whole, chunked = train([5]), train([2, 0, 3])
    assert int(chunked.step) == 5
    for a, b in zip(jax.tree_util.tree_leaves(whole.params), jax.tree_util.tree_leaves(chunked.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_tiny_run_has_the_summary_structure_and_compiles_once_per_config(tmp_path):
    config = ie.model_config(TINY, ie.task_of(TINY), 1, 16)
    scorer_before = ie._scorer(config)._cache_size()          # other tests may have scored this config already
    calls = []
    s = ie.run(TINY, progress=lambda: calls.append(1))
    assert len(calls) == len(TINY.depths) * len(TINY.widths) * len(TINY.seeds)
    assert s["eval_steps"] == [0, 3] and s["chance"] == 0.5 and s["threshold"] == 1.0
    assert [(p["n_layers"], p["d_model"]) for p in s["grid"]] == [(1, 16)]
    for point in s["grid"]:
        assert [r["seed"] for r in point["runs"]] == [0, 1]
        for run in point["runs"]:
            assert len(run["curve"]) == 2
            for c in run["curve"]:
                assert all(np.isfinite(c[k]) for k in ("accuracy", "icl_score", "answer_loss", "first_loss", "loss"))
                assert 0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1
                assert c["n"] == TINY.eval_sequences * TINY.n_queries
            assert run["emergence_step"] is None             # the threshold 2 × 1/2 cannot be exceeded
        assert point["emergence"]["step"] is None and point["emergence"]["seeds_emerged"] == 0
        assert set(point["mean"]) == {"accuracy", "icl_score", "answer_loss", "first_loss", "loss"}
        assert all(np.isfinite(x["mean"]) and x["n"] == 2 for x in point["mean"]["accuracy"])
    trainer = ie.checkpoint_runner(config, TINY.learning_rate)         # one compiled step and scorer for all seeds
    assert len(trainer._steps) == 1 and next(iter(trainer._steps.values()))._cache_size() == 1
    assert ie._scorer(config)._cache_size() <= scorer_before + 1
    assert "open question 4" in s["claim"] and "eq. 21" in s["claim"]
    assert "no ICL within 3 steps" in s["verdict"]
    json.dumps(s)                                                # JSON-serialisable

    from arlm.analysis import plots
    plots.save("icl_emergence", s, str(tmp_path / "icl_emergence.png"))
    assert (tmp_path / "icl_emergence.png").stat().st_size > 10_000
