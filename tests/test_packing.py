"""Packing (`arlm.data.packing`, `loader.SequenceRows`) and segment ids in the model
(`apply_model(..., segment_ids=)`): best-fit-decreasing against a plain reference implementation;
packed and unpacked loss and gradients equal on the reference and fused attention paths (with GQA
and a sliding window); one segment's tokens never change another's logits, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import arlm
from _params import random_params
from arlm.data.loader import SequenceRows, fixed_batches
from arlm.data.packing import best_fit_decreasing, pack_row, padding_fraction
from arlm.data.rows import read_rows
from arlm.data.store import build_store
from arlm.data.tokenize import TextCodec, TokenizeConfig
from arlm.data.tokenizers import ByteTokenizer
from arlm.objectives.lm import sft_loss


def _reference_bfd(lengths, capacity):
    """Best-fit-decreasing as the textbook states it: a linear scan for the fullest bin that still fits."""
    bins, loads = [], []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        fits = [b for b in range(len(bins)) if loads[b] + lengths[i] <= capacity]
        if fits:
            b = min(fits, key=lambda b: (capacity - loads[b], b))
        else:
            b = len(bins)
            bins.append([])
            loads.append(0)
        bins[b].append(i)
        loads[b] += lengths[i]
    return bins


@pytest.mark.parametrize("seed", range(5))
def test_best_fit_decreasing_equals_the_textbook_rule(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, size=200).tolist()
    bins = best_fit_decreasing(lengths, 64)
    assert bins == _reference_bfd(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    lower = -(-sum(lengths) // 64)
    assert len(bins) <= 11 / 9 * lower + 1                       # BFD's worst-case bound (Johnson)
    assert padding_fraction(bins, lengths, 64) == pytest.approx(1 - sum(lengths) / (64 * len(bins)))
    with pytest.raises(ValueError, match="example 0 has 65 tokens > row length 64"):
        best_fit_decreasing([65], 64)


def test_pack_row_layout():
    row = pack_row([(np.array([5, 6, 7]), np.array([0, 1, 1])), (np.array([8, 9]), np.array([1, 1]))], 7)
    assert row["tokens"].tolist() == [5, 6, 7, 8, 9, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 0, 1, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 2, 2, 0, 0]
    assert row["attention"].tolist() == [True] * 5 + [False] * 2
    assert row["response_mask"].tolist() == [0, 1, 1, 0, 1, 0, 0]     # a segment's first token is never a target


@pytest.fixture(scope="module")
def store():
    rng = np.random.default_rng(0)
    words = ["sky", "blue", "Ahoy!", "Arr!", "ünï", "🐙", "river", "bells"]
    rows = [{"prompt": " ".join(rng.choice(words, rng.integers(1, 4))),
             "completion": " " + " ".join(rng.choice(words, rng.integers(1, 3)))} for _ in range(16)]
    return build_store(read_rows(rows), TextCodec.of(ByteTokenizer()), "sequences", TokenizeConfig(max_length=64))


CONFIGS = {
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "sliding_window": dict(n_heads=4, n_kv_heads=1, sliding_window=7),
}


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_packed_loss_and_gradients_equal_unpacked(store, impl, variant):
    config = arlm.ModelConfig.llama(vocab_size=257, d_model=32, n_layers=2, d_ff=64, max_seq_len=64,
                                    attention_impl=impl, **CONFIGS[variant])
    params = random_params(config, seed=1)
    packed, unpacked = SequenceRows(store, 64, pack=True), SequenceRows(store, 64, pack=False)
    assert len(packed) <= len(unpacked) // 2 and packed.padding_fraction < unpacked.padding_fraction

    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, batch: sft_loss(config, p, batch)[0]))
    # both as one batch of len(unpacked) rows (the packed one filled with empty rows): one compile
    (lp, gp), (lu, gu) = (loss_and_grad(params, fixed_batches(rows, len(unpacked))[0]) for rows in (packed, unpacked))
    np.testing.assert_allclose(lp, lu, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gu)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("impl", ["reference", "fused"])
def test_changing_one_segment_leaves_the_others_bitwise_unchanged(impl):
    config = arlm.ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                    max_seq_len=32, attention_impl=impl)
    params = random_params(config, seed=2)
    rng = np.random.default_rng(3)
    segs = [rng.integers(0, 64, n) for n in (5, 7, 4)]
    row = pack_row([(s, np.ones_like(s)) for s in segs], 20)
    changed = [segs[0], rng.integers(0, 64, 7), segs[2]]
    row2 = pack_row([(s, np.ones_like(s)) for s in changed], 20)
    fwd = jax.jit(lambda r: arlm.forward(config, params, r["tokens"][None], positions=r["positions"][None],
                                         attention_mask=r["attention"][None], segment_ids=r["segment_ids"][None]))
    a, b = (np.asarray(fwd({k: jnp.asarray(v) for k, v in r.items()}))[0] for r in (row, row2))
    seg = row["segment_ids"]
    assert np.array_equal(a[seg == 1], b[seg == 1]) and np.array_equal(a[seg == 3], b[seg == 3])
    assert not np.allclose(a[seg == 2], b[seg == 2])
    alone = np.asarray(arlm.forward(config, params, jnp.asarray(segs[2])[None]))[0]   # as if unpacked
    np.testing.assert_allclose(a[seg == 3], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        arlm.forward(config, params, jnp.asarray(row["tokens"])[None], segment_ids=jnp.zeros((1, 3), jnp.int32))


def test_bench_packing_measures_both_layouts_side_by_side():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "bench_packing.py")
    spec = importlib.util.spec_from_file_location("bench_packing", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.measure(examples=48, max_length=64, batch=4, steps=2, repeats=1, d_model=16, layers=1)
    assert r["packed"]["padding_fraction"] < r["padded"]["padding_fraction"]
    assert r["packed"]["rows"] < r["padded"]["rows"] == 48
    assert r["packed_over_padded_tokens_per_second"] == pytest.approx(
        r["packed"]["real_tokens_per_second"] / r["padded"]["real_tokens_per_second"])
