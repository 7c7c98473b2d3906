"""Tests of KV-cache generation (eqs. 16–18): `forward_with_cache`, `arlm.generate`.

Every check compares the cached path against the cache-free model (`arlm.forward`, or the
cache-free loop `arlm.inference.simple.sample_tokens`) on each row's own, unpadded sequence.
Parameters are re-drawn at std 0.2 (as in test_model.py) so that attention and the next-token
distributions are far from uniform: a wrong position, mask or cache slot is an O(1) error.

Tolerances (all float32): logits and log-probs must satisfy
    max |cached − full| ≤ TOL · max(1, max |full|),    TOL = 1e-5;
measured errors are ~1e-7..1e-6 relative (printed with `pytest -s`).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _params import random_params

import arlm
from arlm import ModelConfig, Sampler
from arlm.inference import GREEDY, forward_with_cache, init_cache
from arlm.inference.simple import sample_tokens
from arlm.model.log_probs import token_log_probs

V, D, L, H, MAX_LEN = 37, 32, 2, 4, 16
TOL = 1e-5
PARAM_STD = 0.2

FAMILIES = {
    # GPT-2: learned positions (a wrong position offset under left-padding shows up here), LayerNorm, biases.
    "gpt2": ModelConfig.gpt2(vocab_size=V, d_model=D, n_layers=L, n_heads=H, max_seq_len=MAX_LEN),
    # Llama: RoPE, RMSNorm, SwiGLU, GQA (2 kv heads for 4 query heads), untied unembedding.
    "llama_gqa": ModelConfig.llama(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=2, d_ff=48,
                                   max_seq_len=MAX_LEN, tie_embeddings=False),
    # Llama with a mixture of experts (4 experts, top-2).
    "llama_moe": ModelConfig.llama(vocab_size=V, d_model=D, n_layers=L, n_heads=H, n_kv_heads=2, d_ff=24,
                                   max_seq_len=MAX_LEN, n_experts=4, moe_top_k=2, rope_theta=500.0),
}
NAMES = list(FAMILIES)



@functools.lru_cache(maxsize=None)
def model(name: str):
    config = FAMILIES[name]
    return config, random_params(config, seed=NAMES.index(name), std=PARAM_STD)


_forward = jax.jit(arlm.forward, static_argnums=0)
_fwc = jax.jit(forward_with_cache, static_argnums=0, static_argnames="last_logits_only")


def full_logits(config, params, seq) -> np.ndarray:
    """arlm.forward on one unpadded sequence: [T, V] float32 logits."""
    return np.asarray(_forward(config, params, jnp.asarray([seq], jnp.int32))[0])


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def random_prompts(seed: int, lengths) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, size=n).tolist() for n in lengths]


# ----------------------------------------------------------------------------------------------
# 1. Cached decoding reproduces the full forward pass, step by step
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_cached_logits_match_full_forward(name):
    """Teacher-forced: prefill ragged (left-padded) prompts, then feed the continuation through the
    cache, one token per step and (from the same prefilled cache) in chunks of 3; every step's
    logits equal arlm.forward on that row's unpadded sequence."""
    config, params = model(name)
    rng = np.random.default_rng(1)
    lengths = [5, 1, 7, 3]
    n = 6
    p = 8                                          # ≥ 1 padding slot in every row
    seqs = [rng.integers(0, V, size=ln + n) for ln in lengths]
    prompt = rng.integers(0, V, size=(len(lengths), p))   # junk in the padding: it must not leak
    start = np.array([p - ln for ln in lengths], np.int32)
    for b, ln in enumerate(lengths):
        prompt[b, p - ln:] = seqs[b][:ln]
    # causal, so refs[b][t] is arlm.forward's last logits on the growing sequence seqs[b][:t+1]
    # (checked without that assumption in the next test)
    refs = [full_logits(config, params, s) for s in seqs]

    cache0 = init_cache(config, len(lengths), p + n, jnp.asarray(start))
    last, _ = _fwc(config, params, cache0, jnp.asarray(prompt, jnp.int32), last_logits_only=True)
    logits, cache0 = _fwc(config, params, cache0, jnp.asarray(prompt, jnp.int32))
    assert logits.shape == (len(lengths), p, V) and last.shape == (len(lengths), 1, V)
    assert int(cache0.index) == p
    errs = {"prefill": 0.0, "1-token steps": 0.0, "3-token chunks": 0.0}
    for b, ln in enumerate(lengths):
        errs["prefill"] = max(errs["prefill"], rel_err(logits[b, p - ln:], refs[b][:ln]),
                              rel_err(last[b, 0], refs[b][ln - 1]))      # last_logits_only prefill

    for what, chunk in (("1-token steps", 1), ("3-token chunks", 3)):
        cache = cache0
        for done in range(0, n, chunk):
            step = np.stack([s[ln + done: ln + done + chunk] for s, ln in zip(seqs, lengths)])
            logits, cache = _fwc(config, params, cache, jnp.asarray(step, jnp.int32))
            assert logits.shape == (len(lengths), chunk, V)
            for b, ln in enumerate(lengths):
                errs[what] = max(errs[what], rel_err(logits[b], refs[b][ln + done: ln + done + chunk]))
        assert int(cache.index) == p + n
    print(f"\n[{name}] cached vs full logits, max rel err: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL


def test_cached_logits_match_growing_sequence_forward():
    """The same check without relying on causality of the reference: arlm.forward is re-run on the
    growing sequence x_{≤t} at every step (GPT-2, learned positions, one left-padded row)."""
    config, params = model("gpt2")
    rng = np.random.default_rng(2)
    seq = rng.integers(0, V, size=6).tolist()
    prompt_len, p = 3, 5
    cache = init_cache(config, 1, p + len(seq) - prompt_len, jnp.asarray([p - prompt_len]))
    padded = [0] * (p - prompt_len) + seq[:prompt_len]
    logits, cache = _fwc(config, params, cache, jnp.asarray([padded], jnp.int32), last_logits_only=True)
    errs = [rel_err(logits[0, 0], full_logits(config, params, seq[:prompt_len])[-1])]
    for t in range(prompt_len, len(seq)):
        logits, cache = _fwc(config, params, cache, jnp.asarray([[seq[t]]], jnp.int32))
        errs.append(rel_err(logits[0, 0], full_logits(config, params, seq[:t + 1])[-1]))
    print(f"\n[gpt2 growing] cached vs full logits: max rel err {max(errs):.2e}")
    assert max(errs) <= TOL


# ----------------------------------------------------------------------------------------------
# 2. Greedy decoding with the cache = greedy decoding without it; stop handling
# ----------------------------------------------------------------------------------------------

# One ragged batch and horizon shared by most tests below (so they share compiled decode loops).
PROMPTS = random_prompts(3, [3, 6, 1, 5])
N_NEW = 8


@functools.lru_cache(maxsize=None)
def greedy_free(name: str) -> np.ndarray:
    config, params = model(name)
    out = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(0), max_new_tokens=N_NEW)
    np.testing.assert_array_equal(out.lengths_B, [N_NEW] * len(PROMPTS))
    np.testing.assert_array_equal(out.prompt_lengths_B, [len(q) for q in PROMPTS])
    np.testing.assert_array_equal(out.sample_log_probs_BxN, 0.0)          # greedy: a point mass
    assert np.all(np.isfinite(out.log_probs_BxN)) and np.all(np.asarray(out.log_probs_BxN) < 0)
    return np.asarray(out.tokens_BxN)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_matches_cache_free_loop(name):
    config, params = model(name)
    tokens = greedy_free(name)
    assert tokens.shape == (len(PROMPTS), N_NEW)
    for b, prompt in enumerate(PROMPTS):
        ref = sample_tokens(config, params, prompt, N_NEW, jax.random.PRNGKey(0), temperature=0)
        assert tokens[b].tolist() == ref, f"row {b}"


@pytest.mark.parametrize("name,pad_id", [("gpt2", 0), ("llama_gqa", V), ("llama_moe", -1)])
def test_stop_tokens_end_rows_independently(name, pad_id):
    """Rows stop at their own first EOS/stop token (kept, and counted in lengths); later entries are
    pad_id with 0 log-prob; other rows go on exactly as without stops. pad_id need not be a valid id
    (it only marks padding: the prompt padding and stopped rows must not feed it to the model)."""
    config, params = model(name)
    free = greedy_free(name)
    eos, stop = int(free[0, 1]), int(free[1, 4])
    stops = {eos, stop}
    out = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(0), max_new_tokens=N_NEW,
                        eos_id=eos, stop_ids=[stop], pad_id=pad_id)
    tokens, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    logp, slogp = np.asarray(out.log_probs_BxN), np.asarray(out.sample_log_probs_BxN)
    for b in range(len(PROMPTS)):
        hits = [i for i in range(N_NEW) if free[b, i] in stops]
        length = hits[0] + 1 if hits else N_NEW
        assert lengths[b] == length, f"row {b}"
        assert tokens[b, :length].tolist() == free[b, :length].tolist()
        assert np.all(tokens[b, length:] == pad_id)
        if hits:
            assert tokens[b, length - 1] in stops
        assert np.all(logp[b, length:] == 0) and np.all(slogp[b, length:] == 0)
        assert np.all(np.isfinite(logp[b])) and np.all(logp[b, :length] < 0)
    assert lengths[0] <= 2 and len(set(lengths.tolist())) > 1, lengths   # rows really stop at different steps
    assert lengths.max() <= N_NEW


def test_max_new_tokens_respected():
    config, params = model("gpt2")
    out = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(0), max_new_tokens=1)
    assert out.tokens_BxN.shape == (len(PROMPTS), 1) and out.log_probs_BxN.shape == (len(PROMPTS), 1)
    np.testing.assert_array_equal(out.lengths_B, [1] * len(PROMPTS))
    np.testing.assert_array_equal(out.tokens_BxN[:, 0], greedy_free("gpt2")[:, 0])


# ----------------------------------------------------------------------------------------------
# 3. Returned log-probs = what a full forward pass recomputes
# ----------------------------------------------------------------------------------------------

def recomputed(config, params, prompts, tokens, lengths):
    """What a trainer recomputes: one forward pass over the concatenated prompt + completion
    (right-padded to a common length, positions from 0 in every row); returns per row the logits
    predicting each completion token [k, V] (float64) and token_log_probs of those tokens [k]."""
    width = max(len(q) for q in prompts) + tokens.shape[1]
    seq = np.zeros((len(prompts), width), np.int32)
    for b, (q, k) in enumerate(zip(prompts, lengths)):
        seq[b, :len(q) + k] = list(q) + tokens[b, :k].tolist()
    seq = jnp.asarray(seq)
    logits = _forward(config, params, seq)
    lp = np.asarray(token_log_probs(logits[:, :-1], seq[:, 1:]))
    logits = np.asarray(logits, np.float64)
    return [(logits[b, len(q) - 1: len(q) - 1 + k], lp[b, len(q) - 1: len(q) - 1 + k])
            for b, (q, k) in enumerate(zip(prompts, lengths))]


def _log_softmax64(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


SAMPLED = {"gpt2": Sampler(temperature=0.7), "llama_gqa": Sampler(temperature=0.7),
           "llama_moe": Sampler(temperature=0.7, top_k=5)}


@pytest.mark.parametrize("name", NAMES)
def test_log_probs_match_full_forward(name):
    """log_probs_BxN = token_log_probs of a full forward pass (τ = 1, no truncation); at τ = 1
    sample_log_probs = log_probs; at τ = 0.7 (± top-k) sample_log_probs = log_softmax(z/0.7) over
    the kept tokens."""
    config, params = model(name)
    errs = {}
    for sampler in (Sampler(temperature=1.0), SAMPLED[name]):
        out = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(7), max_new_tokens=N_NEW,
                            sampler=sampler, eos_id=5)
        tokens, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
        logp, slogp = np.asarray(out.log_probs_BxN), np.asarray(out.sample_log_probs_BxN)
        tag = f"T={sampler.temperature}" + (f",top_k={sampler.top_k}" if sampler.top_k else "")
        for b, (ref_logits, ref_lp) in enumerate(recomputed(config, params, PROMPTS, tokens, lengths)):
            k = int(lengths[b])
            errs[f"log_probs@{tag}"] = max(errs.get(f"log_probs@{tag}", 0), rel_err(logp[b, :k], ref_lp))
            np.testing.assert_array_equal(logp[b, k:], 0.0)
            np.testing.assert_array_equal(slogp[b, k:], 0.0)
            z = ref_logits / sampler.temperature
            if sampler.top_k is not None:
                kth = np.sort(z, -1)[:, -sampler.top_k][:, None]
                assert np.all(z[np.arange(k), tokens[b, :k]] >= kth[:, 0]), "sampled outside the top-k"
                z = np.where(z < kth, -np.inf, z)
            ref_slp = _log_softmax64(z)[np.arange(k), tokens[b, :k]]
            errs[f"sample_log_probs@{tag}"] = max(errs.get(f"sample_log_probs@{tag}", 0),
                                                 rel_err(slogp[b, :k], ref_slp))
            if sampler.temperature == 1.0 and sampler.top_k is None:
                np.testing.assert_allclose(slogp[b], logp[b], rtol=0, atol=1e-6)
    print(f"\n[{name}] log-prob max rel errs: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) <= TOL


# ----------------------------------------------------------------------------------------------
# 4. Reproducibility and streaming
# ----------------------------------------------------------------------------------------------

def test_same_key_same_samples_different_key_different():
    config, params = model("llama_moe")
    gen = functools.partial(arlm.generate, config, params, PROMPTS, max_new_tokens=N_NEW, sampler=Sampler(1.0))
    a, b, c = gen(key=jax.random.PRNGKey(0)), gen(key=jax.random.PRNGKey(0)), gen(key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(a.tokens_BxN, b.tokens_BxN)
    np.testing.assert_array_equal(a.log_probs_BxN, b.log_probs_BxN)
    assert np.any(np.asarray(a.tokens_BxN) != np.asarray(c.tokens_BxN))


def test_on_token_streams_every_step_in_order():
    config, params = model("gpt2")
    calls = []
    out = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(3), max_new_tokens=N_NEW,
                        sampler=Sampler(1.0), eos_id=2, stop_ids=[7, 11], pad_id=-1,
                        on_token=lambda i, tok, live: calls.append((i, tok.copy(), live.copy())))
    tokens, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    assert [c[0] for c in calls] == list(range(len(calls)))          # once per step, in order
    assert len(calls) == lengths.max()                                # the loop ends when every row stopped
    np.testing.assert_array_equal(np.stack([c[1] for c in calls], 1), tokens[:, :len(calls)])
    np.testing.assert_array_equal(np.stack([c[2] for c in calls], 1),
                                  np.arange(len(calls))[None, :] < lengths[:, None])
    assert np.all(tokens[:, len(calls):] == -1)
    # streaming drives the same compiled step: the same output as the lax.while_loop, bit for bit
    plain = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(3), max_new_tokens=N_NEW,
                          sampler=Sampler(1.0), eos_id=2, stop_ids=[7, 11], pad_id=-1)
    for field in ("tokens_BxN", "lengths_B", "log_probs_BxN", "sample_log_probs_BxN"):
        np.testing.assert_array_equal(np.asarray(getattr(plain, field)), np.asarray(getattr(out, field)), field)
    assert len(calls) == lengths.max()                                # the callback did not leak into it


def test_concurrent_streams_each_reach_their_own_callback():
    """Two generate calls streaming from two threads at once: every step reaches its own callback
    (nothing is shared between calls), and one compiled program serves both."""
    import threading

    config, params = model("gpt2")
    results, calls = {}, {0: [], 1: []}

    def run(k: int) -> None:
        results[k] = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(10 + k), max_new_tokens=N_NEW,
                                   sampler=Sampler(1.0), on_token=lambda i, tok, live: calls[k].append(tok.copy()))

    threads = [threading.Thread(target=run, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in (0, 1):
        tokens = np.asarray(results[k].tokens_BxN)
        np.testing.assert_array_equal(np.stack(calls[k], 1), tokens[:, :len(calls[k])])
    assert not np.array_equal(np.asarray(results[0].tokens_BxN), np.asarray(results[1].tokens_BxN))


def test_output_carries_the_padded_prompt_and_completion_mask_to_score_it():
    """prompt_BxP + tokens_BxN under completion_mask_BxN, re-scored by a full forward pass, give back
    the log-probs generate reported: a caller can score its own output with nothing else."""
    config, params = model("llama_gqa")
    out = arlm.generate(config, params, PROMPTS, key=jax.random.PRNGKey(5), max_new_tokens=N_NEW,
                        sampler=Sampler(1.0), eos_id=2, stop_ids=[7], pad_id=0)
    prompt, tokens = np.asarray(out.prompt_BxP), np.asarray(out.tokens_BxN)
    mask, lengths = np.asarray(out.completion_mask_BxN), np.asarray(out.lengths_B)
    np.testing.assert_array_equal(mask, np.arange(N_NEW)[None, :] < lengths[:, None])
    p = prompt.shape[1]
    for b, row in enumerate(PROMPTS):
        np.testing.assert_array_equal(prompt[b, p - len(row):], row)
        seq = [*row, *tokens[b, mask[b]].tolist()]
        log_probs = jax.nn.log_softmax(full_logits(config, params, seq), -1)
        ref = [log_probs[len(row) - 1 + j, t] for j, t in enumerate(tokens[b, mask[b]])]
        assert rel_err(np.asarray(out.log_probs_BxN)[b, mask[b]], ref) <= TOL


# ----------------------------------------------------------------------------------------------
# 5. Context overflow (eq. 18) and input validation
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])
def test_overflow_truncates_prompt_head_with_warning(name):
    config, params = model(name)
    n = 6
    room = MAX_LEN - n
    long, short = random_prompts(10, [room + 3, 4])
    with pytest.warns(UserWarning, match="context window"):
        out = arlm.generate(config, params, [long, short], key=jax.random.PRNGKey(0), max_new_tokens=n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ref = arlm.generate(config, params, [long[-room:], short], key=jax.random.PRNGKey(0), max_new_tokens=n,
                            overflow="error")                        # exactly Δ − max_new_tokens: fits
    np.testing.assert_array_equal(out.tokens_BxN, ref.tokens_BxN)
    np.testing.assert_array_equal(out.prompt_lengths_B, [room, 4])
    np.testing.assert_allclose(out.log_probs_BxN, ref.log_probs_BxN, rtol=0, atol=1e-6)
    # the dropped head has lost all influence
    other_head = [(t + 1) % V for t in long[:-room]] + long[-room:]
    with pytest.warns(UserWarning, match="context window"):
        out2 = arlm.generate(config, params, [other_head, short], key=jax.random.PRNGKey(0), max_new_tokens=n)
    np.testing.assert_array_equal(out2.tokens_BxN, out.tokens_BxN)


def test_input_validation():
    config, params = model("gpt2")
    key = jax.random.PRNGKey(0)
    gen = functools.partial(arlm.generate, config, params, key=key)
    with pytest.raises(ValueError, match="context window"):
        gen([list(range(MAX_LEN - 3))], max_new_tokens=4, overflow="error")
    for n in (MAX_LEN, MAX_LEN + 5):
        with pytest.raises(ValueError, match="context window"):
            gen([[1, 2]], max_new_tokens=n)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen([[1, 2]], max_new_tokens=0)
    for bad in ([1, V], [-1, 2]):
        with pytest.raises(ValueError, match="token ids"):
            gen([[1, 2], bad], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        gen([[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        gen([], max_new_tokens=2)
    with pytest.raises(ValueError, match="overflow"):
        gen([[1, 2]], max_new_tokens=2, overflow="slide")
    with pytest.raises(ValueError, match="context window"):
        init_cache(config, 1, MAX_LEN + 1)


def test_greedy_default_sampler():
    assert GREEDY.greedy and GREEDY.temperature == 0


# ----------------------------------------------------------------------------------------------
# 5. The cache grows in segments: each step reads at most twice the filled slots
# ----------------------------------------------------------------------------------------------

def test_cache_segments_double_from_the_first():
    from arlm.inference.decoding import cache_segments

    assert cache_segments(1) == (1,) and cache_segments(64) == (64,)
    assert cache_segments(65) == (64, 65) and cache_segments(300) == (64, 128, 256, 300)
    assert cache_segments(10, first=4) == (4, 8, 10)


def test_decoding_across_cache_segments_matches_a_full_forward_and_streaming():
    """150 sampled tokens cross two cache growths (64, 128, 150 steps): every returned log-prob equals a
    full forward pass over prompt + completion, and streaming (which grows the cache between its
    compiled steps) gives the same output bit for bit. The prefill cache holds P + 64 slots only."""
    from arlm.inference.decoding import _prefill_jit, pad_prompts

    config = FAMILIES["llama_gqa"].replace(max_seq_len=168)
    _, params = model("llama_gqa")
    n_new, prompts = 150, random_prompts(11, [3, 9, 1])
    gen = functools.partial(arlm.generate, config, params, prompts, key=jax.random.PRNGKey(4),
                            max_new_tokens=n_new, sampler=Sampler(1.0))
    out = gen()
    tokens, lengths = np.asarray(out.tokens_BxN), np.asarray(out.lengths_B)
    assert lengths.tolist() == [n_new] * 3
    errs = [rel_err(np.asarray(out.log_probs_BxN)[b], ref_lp)
            for b, (_, ref_lp) in enumerate(recomputed(config, params, prompts, tokens, lengths))]
    assert max(errs) <= TOL, errs
    steps = []
    streamed = gen(on_token=lambda i, tok, live: steps.append(i))
    assert steps == list(range(n_new))
    for field in ("tokens_BxN", "log_probs_BxN", "sample_log_probs_BxN"):
        np.testing.assert_array_equal(np.asarray(getattr(streamed, field)), np.asarray(getattr(out, field)), field)
    prompt, start = pad_prompts(config, prompts, n_new)
    state = _prefill_jit(config, params, jnp.asarray(prompt), jnp.asarray(start), jax.random.PRNGKey(0),
                         max_new_tokens=n_new, pad_id=0)
    assert state.cache.size == prompt.shape[1] + 64
