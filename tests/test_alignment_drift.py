"""Next check 2 (`arlm.analysis.alignment_drift`): Hall(θ), error-injection recovery and the Jacobian
spectrum of a policy against independent references (a Python argmax loop over `apply_model`,
central finite differences), and the align job's saved policies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from arlm.alignment.task_io import char_task
from arlm.alignment.tasks import ArithmeticTask, ArithmeticTokenizer
from arlm.analysis import alignment_drift as ad
from arlm.analysis.drift import top_singular_values_at_lags
from arlm.config import ModelConfig
from arlm.jobs.align import load_policies, save_policy
from arlm.model import apply_model, embed_tokens

TOK = ArithmeticTokenizer()


@pytest.fixture(scope="module")
def setup():
    io = char_task(ArithmeticTask(max_operand=49, ops=("+",), seed=0), max_new_tokens=4)
    cfg = ModelConfig.gpt2(vocab_size=TOK.vocab_size, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16)
    params = arlm.init_params(cfg, jax.random.PRNGKey(3))
    problems = list({p.prompt: p for p in io.task.problems(40, "test")}.values())
    return io, cfg, params, problems


_APPLY = jax.jit(apply_model, static_argnums=0)


def _greedy_loop(cfg, params, prompt, n, eos):
    """Independent greedy decoding: one full forward per step, argmax of the last logits."""
    ids = list(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(np.asarray(_APPLY(cfg, params, jnp.asarray([ids], jnp.int32)).logits_BxTxV)[0, -1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


def test_recovered_reads_only_the_digits_after_the_forced_one():
    assert ad.recovered("2", "42") and ad.recovered("2 and more", "42")
    assert not ad.recovered("3", "42") and not ad.recovered("23", "42") and not ad.recovered("", "42")
    assert ad.recovered("05", "105") and not ad.recovered("5", "105")


def test_injection_prefixes_force_a_wrong_first_digit_on_right_multi_digit_answers(setup):
    io, _, _, problems = setup
    two = [p for p in problems if len(p.answer) >= 2][:6]
    one = [p for p in problems if len(p.answer) == 1][:2]
    rows = two + one
    greedy = [TOK.encode(p.answer, eos=True) for p in rows]       # every answer right
    greedy[1] = TOK.encode("0", eos=True)                          # one wrong: skipped
    prefixes, kept = ad.injection_prefixes(io, rows, greedy, np.random.default_rng(0))
    assert kept == [0, 2, 3, 4, 5]                                   # not the wrong one, not the 1-digit ones
    for pre, i in zip(prefixes, kept):
        prompt = io.encode_prompt(rows[i])
        assert pre[:len(prompt)] == prompt and len(pre) == len(prompt) + 1
        forced = TOK.decode([pre[-1]])
        assert forced.isdigit() and forced != rows[i].answer[0] and forced != "0"


def test_responses_match_a_python_greedy_loop(setup):
    io, cfg, params, problems = setup
    prompts = [io.encode_prompt(p) for p in problems[:6]]
    prompts[1] = prompts[1] + TOK.encode("4")                      # ragged, as the forced prefixes are
    got = ad.responses(io, cfg, params, prompts, jax.random.PRNGKey(0), batch_size=4)
    assert got == [_greedy_loop(cfg, params, p, io.max_new_tokens, io.eos_id) for p in prompts]


def _stub_policy(io, recovering: bool):
    """A policy that knows addition: after "a+b=" it writes the answer; after a forced first digit it writes
    the rest of the right answer (recovering) or a wrong next digit (propagating the error)."""
    def responses(io_, config, params, prompts, key, *, tau=0.0, batch_size=256):
        out = []
        for ids in prompts:
            text = TOK.decode(ids)
            head, tail = text.split("=")
            answer = str(eval(head))
            reply = answer if not tail else (answer[1:] if recovering else str((int(answer[1]) + 1) % 10))
            out.append(TOK.encode(reply, eos=True))
        return out
    return responses


def test_error_recovery_and_hallucination_with_stub_policies(setup, monkeypatch):
    io, cfg, params, problems = setup
    key = jax.random.PRNGKey(0)
    n_multi = sum(len(p.answer) >= 2 for p in problems)
    monkeypatch.setattr(ad, "responses", _stub_policy(io, recovering=True))
    assert ad.hallucination(io, cfg, params, problems, key, tau=1.0).value == 0.0
    rec = ad.error_recovery(io, cfg, params, problems, key, seed=0)
    assert rec["n"] == n_multi and rec["k"] == n_multi
    ex = rec["examples"][0]
    assert ex["forced"] != ex["answer"][0] and ex["continuation"] == ex["answer"][1:]
    monkeypatch.setattr(ad, "responses", _stub_policy(io, recovering=False))
    assert ad.error_recovery(io, cfg, params, problems, key, seed=0)["k"] == 0
    wrong = [type(p)(prompt=p.prompt, answer=p.answer + "1", a=p.a, b=p.b, op=p.op) for p in problems[:10]]
    hall = ad.hallucination(io, cfg, params, problems[:10] + wrong, key, tau=1.0)
    assert (hall.k, hall.n) == (10, 20)
    assert ad.error_recovery(io, cfg, params, wrong, key)["n"] == 0     # no right answer: nothing injected
    pooled = ad.pooled([{"k": 3, "n": 4}, {"k": 1, "n": 6}])
    assert (pooled["k"], pooled["n"]) == (4, 10)


def test_top_singular_value_matches_finite_differences():
    cfg = ModelConfig.llama(vocab_size=32, d_model=8, n_layers=2, n_heads=2, d_ff=16, max_seq_len=16)
    params = arlm.init_params(cfg, jax.random.PRNGKey(1))
    tokens = np.random.default_rng(0).integers(0, 32, 9).astype(np.int32)
    lags = (0, 2, 5)
    sig = top_singular_values_at_lags(cfg, params, tokens, lags)
    emb = np.asarray(embed_tokens(cfg, params, jnp.asarray(tokens)[None])[0], np.float64)
    t = len(tokens) - 1

    last_hidden_jit = jax.jit(
        lambda e: apply_model(cfg, params, embeddings=e[None], return_hidden=True).hidden_states[-1][0, t])

    def last_hidden(e):
        return np.asarray(last_hidden_jit(jnp.asarray(e, jnp.float32)), np.float64)

    eps = 1e-2
    for lag, s_val in zip(lags, sig):
        s = t - lag
        cols = []
        for d in range(cfg.d_model):
            up, dn = emb.copy(), emb.copy()
            up[s, d] += eps
            dn[s, d] -= eps
            cols.append((last_hidden(up) - last_hidden(dn)) / (2 * eps))
        want = np.linalg.svd(np.stack(cols, 1), compute_uv=False)[0]
        assert s_val == pytest.approx(want, rel=2e-2)


def test_saved_policies_load_back_with_the_same_logits(setup, tmp_path):
    io, cfg, params, _ = setup
    save_policy(str(tmp_path), "ref", cfg, params)
    shifted = jax.tree_util.tree_map(lambda x: x * 1.01, params)
    save_policy(str(tmp_path), "dpo", cfg, shifted)
    loaded = load_policies(str(tmp_path))
    assert list(loaded) == ["ref", "dpo"]
    tokens = jnp.asarray([io.encode_prompt(p) for p in io.task.problems(4, "test")][0])[None]
    for name, want in (("ref", params), ("dpo", shifted)):
        c, p = loaded[name]
        np.testing.assert_allclose(np.asarray(apply_model(c, p, tokens).logits_BxTxV),
                                   np.asarray(apply_model(cfg, want, tokens).logits_BxTxV), rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="save_policies"):
        load_policies(str(tmp_path / "nothing"))
