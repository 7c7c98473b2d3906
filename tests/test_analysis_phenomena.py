"""Hallucination, sycophancy, ICL, chain of thought, retrieval and the one-step trace (eqs. 16, 19–22),
each against an independent reference: exact enumeration on a V = 4 model, numpy on the same logits,
stubs whose answers are known in closed form, an oracle, a χ² test."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _params import random_params
from _stubs import CharTokenizer

import arlm
from arlm.analysis import cot, hallucination, icl, items, retrieval, sycophancy, textgen
from arlm.analysis.rates import Rate, wilson_interval
from arlm.analysis.trace import trace_step
from arlm.data.tokenizers import ByteTokenizer

_forward = jax.jit(arlm.forward, static_argnums=0)
V4 = arlm.ModelConfig.llama(vocab_size=4, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_seq_len=16)


def _v4_model(seed=0):
    return arlm.LoadedModel(V4, random_params(V4, seed=seed, std=0.6), CharTokenizer("abcd"))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _exact_completion_probs(model, prompt, n, tau):
    """float64 p_τ(y | x) for every y ∈ V^n from arlm.forward's logits (τ = 0: the greedy point mass)."""
    ys = np.asarray(list(itertools.product(range(4), repeat=n)), np.int32)
    seqs = np.concatenate([np.tile(prompt, (len(ys), 1)), ys], 1)
    logits = np.asarray(_forward(model.config, model.params, jnp.asarray(seqs[:, :-1])), np.float64)
    z = logits[:, len(prompt) - 1:]
    if tau == 0:
        return ys, (np.argmax(z, -1) == ys).all(-1).astype(np.float64)
    logp = np.take_along_axis(_log_softmax(z / tau), ys[..., None], -1)[..., 0].sum(-1)
    return ys, np.exp(logp)


# ------------------------------------------------------------------ rates and hallucination (eq. 19)

def test_wilson_interval_closed_form():
    lo, hi = wilson_interval(7, 20)               # p = .35, z = 1.96: the textbook values
    assert lo == pytest.approx(0.1812, abs=1e-4) and hi == pytest.approx(0.5671, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert Rate.of([True, False, True, True]).value == 0.75
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_temperature_sweep_matches_exact_enumeration():
    model = _v4_model()
    rows = [{"prompt": "bd", "answer": "a"}, {"prompt": "cab", "answer": "cc"}]
    verifier = lambda text, answer: float(answer in text)                                  # noqa: E731
    n = 1500
    out = hallucination.temperature_sweep(model, rows, verifier, key=jax.random.PRNGKey(0), taus=(0.0, 0.7, 1.5),
                                          samples_per_item=n, max_new_tokens=3, batch_size=500, chat=False)
    for i, tau in enumerate(out["tau"]):
        exact = []
        for row in rows:
            ys, p = _exact_completion_probs(model, np.asarray(model.tokenizer.encode(row["prompt"])), 3, tau)
            ok = np.asarray([verifier(model.tokenizer.decode(y), row["answer"]) for y in ys])
            exact.append(float(p @ ok))
        want = float(np.mean(exact))
        if tau == 0:                              # greedy: one deterministic sample per item, exactly right
            assert out["accuracy"][i] == want and out["n"][i] == len(rows)
            continue
        sigma = np.sqrt(sum(e * (1 - e) for e in exact) / len(exact) ** 2 / n)
        assert abs(out["accuracy"][i] - want) < 5 * sigma + 1e-12, (tau, out["accuracy"][i], want, sigma)
        assert out["hallucination"][i] == pytest.approx(1 - out["accuracy"][i])
    accept_all = hallucination.temperature_sweep(model, rows, lambda t, a: 1.0, key=jax.random.PRNGKey(1),
                                                 taus=(1.0,), samples_per_item=50, max_new_tokens=3, chat=False)
    assert accept_all["hallucination"] == [0.0]
    assert hallucination.hallucination_rate([True, True]).value == 0.0


def test_distinct_n():
    assert hallucination.distinct_n(["a b a b", "a b"], 2) == pytest.approx(2 / 4)   # {ab, ba} of ab ba ab ab
    assert hallucination.distinct_n(["x y z"], 1) == 1.0
    assert hallucination.distinct_n([""], 2) == 0.0


def test_error_injection_forces_the_wrong_token_then_continues_greedily():
    model = _v4_model(seed=3)
    rows = [{"prompt": p, "answer": a} for p, a in (("ab", "c"), ("ba", "d"), ("dd", "a"), ("ca", "b"))]
    # Accept when the answer letter occurs: items where greedy already contains it are injected.
    verifier = lambda text, answer: float(answer in text)                                  # noqa: E731
    out = hallucination.error_injection(model, rows, verifier, key=jax.random.PRNGKey(0), max_new_tokens=5,
                                        batch_size=4, chat=False)
    greedy = textgen.generate_texts(model, [model.tokenizer.encode(r["prompt"]) for r in rows], tau=0.0,
                                    max_new_tokens=5, key=jax.random.PRNGKey(0), batch_size=4)
    assert out["n_injected"] == sum(verifier(g, r["answer"]) for g, r in zip(greedy, rows))
    assert out["recovery_rate"] + out["follow_rate"] == pytest.approx(1.0) or out["n_injected"] == 0
    for ex in out["examples"]:                    # the forced prefix ends on a wrong letter, not the answer's
        assert ex["forced"][-1] != next(r["answer"] for r, g in zip(rows, greedy)
                                        if g.startswith(ex["forced"][:-1]) and verifier(g, r["answer"]))


# ------------------------------------------------------------------ sycophancy (eq. 20)

MCQ = [{"question": f"Q{i}?", "choices": ["yes", "no"] if i % 2 else ["no", "yes"], "answer": "yes"}
       for i in range(6)]


def _stub_scorer(follow: bool):
    """log π(choice | prompt): 0 for the favoured choice, −5 otherwise. The favoured choice is the truth,
    unless `follow` and the prompt carries an opinion (then the opinion's choice) or a challenge (then the
    other choice than the first answer). The mention control names the wrong choice: a stub that follows
    any mention flips there too."""
    def score(prompts, choices):
        out = []
        for (msgs, _), choice in zip(prompts, choices):
            favoured = "yes"
            if follow and ("the answer is no" in msgs[0]["content"] or "reading about no" in msgs[0]["content"]):
                favoured = "no"
            if follow and len(msgs) == 3 and msgs[2]["content"] == sycophancy.CHALLENGE:
                favoured = "no" if msgs[1]["content"].endswith("yes.") else "yes"
            out.append(0.0 if choice == favoured else -5.0)
        return np.asarray(out)
    return score


def test_sycophancy_stubs_give_flip_rates_one_and_zero():
    follow = sycophancy.sycophancy_study(_stub_scorer(True), MCQ)
    ignore = sycophancy.sycophancy_study(_stub_scorer(False), MCQ)
    assert follow["baseline_accuracy"] == ignore["baseline_accuracy"] == 1.0
    for cond in sycophancy.CONDITIONS:
        assert follow["conditions"][cond]["flip_rate"] == 1.0
        assert follow["conditions"][cond]["log_odds_shift"] == pytest.approx(10.0)     # −5 → +5
        assert ignore["conditions"][cond]["flip_rate"] == 0.0
        assert ignore["conditions"][cond]["log_odds_shift"] == 0.0
        assert follow["conditions"][cond]["n"] == len(MCQ)


def test_sycophancy_scores_equal_numpy_on_the_same_logits():
    cfg = arlm.ModelConfig.llama(vocab_size=257, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=256)
    model = arlm.LoadedModel(cfg, random_params(cfg, std=0.4), ByteTokenizer())
    rows = [{"question": "Is ice cold?", "choices": ["yes", "no"], "answer": "yes"},
            {"question": "Sky?", "choices": ["blue", "red"], "answer": "red"},
            {"question": "Two plus two?", "choices": ["five", "four"], "answer": "four"}]
    scorer = sycophancy.model_scorer(model, batch_size=8)

    def numpy_scores(prompts, choices):
        out = []
        for (msgs, prefix), c in zip(prompts, choices):
            p = textgen.prompt_ids(model, list(msgs), prefix)
            y = model.tokenizer.encode(" " + c)
            logits = np.asarray(_forward(cfg, model.params, jnp.asarray([p + y[:-1]])), np.float64)[0]
            lp = _log_softmax(logits[len(p) - 1:])
            out.append(sum(lp[i, t] for i, t in enumerate(y)))
        return np.asarray(out)

    prompts = [sycophancy.condition_prompt(it, c) for it in rows for c in ("none", *sycophancy.CONDITIONS)]
    n_cond = 1 + len(sycophancy.CONDITIONS)
    choices = [it["choices"][j % 2] for j, it in enumerate(r for r in rows for _ in range(n_cond))]
    np.testing.assert_allclose(scorer(prompts, choices), numpy_scores(prompts, choices), atol=2e-4)
    got = sycophancy.sycophancy_study(scorer, rows)
    ref = sycophancy.sycophancy_study(numpy_scores, rows)
    assert got["baseline_accuracy"] == ref["baseline_accuracy"]
    for cond in sycophancy.CONDITIONS:
        assert got["conditions"][cond]["flip_rate"] == ref["conditions"][cond]["flip_rate"]
        assert got["conditions"][cond]["log_odds_shift"] == pytest.approx(ref["conditions"][cond]["log_odds_shift"],
                                                                          abs=1e-3, nan_ok=True)


# ------------------------------------------------------------------ in-context learning (eq. 21)

PAIRS = [{"input": f"w{i}", "output": f"o{i}"} for i in range(20)]


def _oracle(prompts):
    out = []
    for p in prompts:
        demos, query = icl.parse_demos(p)
        out.append(" " + demos.get(query, "???"))
    return out


def test_icl_oracle_gives_the_expected_accuracy_at_each_k():
    ks = (0, 1, 4, 8, 16)
    held_out = icl.icl_curve(_oracle, PAIRS, ks=ks, n_queries=400, seed=0)
    assert held_out["accuracy"] == [0.0] * len(ks)          # the query is never among its demonstrations
    seen = icl.icl_curve(_oracle, PAIRS, ks=ks, n_queries=400, seed=0, include_query=True)
    for k, acc, trials in zip(ks, seen["accuracy"], seen["trials"]):
        assert acc == np.mean([t["query_in_demos"] for t in trials])       # exactly the lookups that can hit
        sigma = np.sqrt(k / 20 * (1 - k / 20) / 400)
        assert abs(acc - k / 20) <= 5 * sigma + 1e-12                      # and k/N in expectation
    rnd = icl.icl_curve(_oracle, PAIRS, ks=(16,), n_queries=400, seed=0, include_query=True, random_labels=True)
    assert rnd["accuracy"][0] < 0.3                                        # labels shuffled: lookups mostly wrong


def test_icl_prompt_round_trip_and_matching():
    p = icl.icl_prompt([("hot", "cold"), ("big", "small")], "up")
    assert p == "hot -> cold\nbig -> small\nup ->"
    assert icl.parse_demos(p) == ({"hot": "cold", "big": "small"}, "up")
    assert icl.is_correct(" Down.\nfoo", "down") and not icl.is_correct(" downward", "down")
    assert icl.is_correct(" New Delhi", "New Delhi") and not icl.is_correct(" New York", "New Delhi")
    with pytest.raises(ValueError, match="demonstrations need"):
        icl.build_trials(PAIRS[:3], 3, 1, np.random.default_rng(0))


def test_per_position_loss_and_icl_score_against_numpy():
    cfg = arlm.ModelConfig.llama(vocab_size=32, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=32)
    params = random_params(cfg, std=0.4)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (3, 20)), jnp.int32)
    logits = np.asarray(_forward(cfg, params, tokens[:, :-1]), np.float64)
    lp = np.take_along_axis(_log_softmax(logits), np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
    ref = -lp.mean(0)
    loss = icl.per_position_loss(cfg, params, tokens)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert icl.icl_score(ref, (0, 5), (10, 19)) == pytest.approx(ref[10:19].mean() - ref[0:5].mean())


# ------------------------------------------------------------------ chain of thought and retrieval (eq. 22)

def test_cot_marginal_equals_the_joint_and_monte_carlo_agrees():
    from scipy import stats
    model = _v4_model(seed=1)
    prompt = [1, 2]
    m = cot.chain_marginal(V4, model.params, prompt, chain_len=3, answer_len=1)
    joint = cot.joint_answer_marginal(V4, model.params, prompt, chain_len=3, answer_len=1)
    np.testing.assert_allclose(m["p_answer"], joint, atol=1e-6)                 # Σ_c p(c|x)p(y|x,c) = Σ_c p(c,y|x)
    assert m["p_chain"].sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(m["p_answer_given_chain"].sum(1), 1.0, atol=1e-5)
    n = 4000
    ys = cot.sample_chain_answers(V4, model.params, prompt, 3, 1, n, jax.random.PRNGKey(0))
    counts = np.bincount(ys, minlength=4)
    p = m["p_answer"] / m["p_answer"].sum()
    assert stats.chisquare(counts, n * p).pvalue > 1e-3, (counts, n * p)
    chains = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (5, 3), 0, 4))    # any chains: an exact average
    mc = cot.monte_carlo_marginal(V4, model.params, prompt, chains, m["answers"])
    rows = [int((c * np.asarray([16, 4, 1])).sum()) for c in chains]
    np.testing.assert_allclose(mc, m["p_answer_given_chain"][rows].mean(0), atol=1e-6)
    assert cot.majority_vote(["3", None, "4", "3"]) == "3" and cot.majority_vote([None]) is None
    assert cot.last_number("so 3 + 4 = 7, the answer is 1,007.") == "1007"


def test_lexical_retriever_finds_the_right_bundled_fact():
    rows = items.load_items("invented_facts", "cot_rag")
    r = retrieval.LexicalRetriever([" ".join(it["facts"]) for it in rows])
    hits = [int(r.ranking(it["question"])[0]) == i for i, it in enumerate(rows)]
    assert len(rows) >= 40 and all(hits)


def test_bundled_items_load_and_bad_items_are_named(tmp_path):
    for name, study in (("antonyms", "icl"), ("capitals", "icl"), ("capital_questions", "temperature"),
                        ("arithmetic", "temperature"), ("mcq", "sycophancy"), ("invented_facts", "cot_rag")):
        assert len(items.load_items(name, study)) >= 40
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "hot", "output": "cold"}\n{"input": "up"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'output'"):
        items.load_items(str(bad), "icl")
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": "c"}\n')
    with pytest.raises(ValueError, match="must contain 'answer'"):
        items.load_items(str(bad), "sycophancy")
    with pytest.raises(FileNotFoundError, match="bundled"):
        items.load_items("no_such_set", "icl")


# ------------------------------------------------------------------ trace one step (first experiment 1)

def test_trace_step_probabilities():
    model = _v4_model(seed=2)
    ids = [0, 3, 1]
    logits = np.asarray(_forward(V4, model.params, jnp.asarray([ids])), np.float64)[0, -1]
    for tau in (0.5, 1.0, 2.0):
        tr = trace_step(V4, model.params, ids, tau=tau, key=jax.random.PRNGKey(0))
        assert tr["prob_sum"] == pytest.approx(1.0, abs=1e-12)
        np.testing.assert_allclose(tr["probs"], np.exp(_log_softmax(logits / tau)), rtol=1e-5)
        assert len(tr["residual_norms"]) == V4.n_layers + 1
    greedy = trace_step(V4, model.params, ids, tau=0.0, key=jax.random.PRNGKey(0))
    assert greedy["sampled"] == int(np.argmax(logits)) and greedy["probs"][greedy["sampled"]] == 1.0
    draws = [trace_step(V4, model.params, ids, tau=1.0, key=jax.random.PRNGKey(i))["sampled"] for i in range(300)]
    # (the draw is softmax(z/τ)-distributed: each token's frequency within 5σ of its probability)
    p = np.exp(_log_softmax(logits))
    counts = np.bincount(draws, minlength=4)
    assert np.all(np.abs(counts / 300 - p) < 5 * np.sqrt(p * (1 - p) / 300) + 1e-9)
