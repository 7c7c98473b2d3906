"""Tests for arlm.alignment.verifiers (eq. 15 rewards) and arlm.alignment.tasks (arithmetic)."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

from arlm.alignment import tasks as tasks_lib
from arlm.alignment import verifiers as V
from arlm.alignment.task_io import char_task
from arlm.alignment.tasks import ArithmeticTask, ArithmeticTokenizer, Problem

# ----------------------------------------------------------------------------- ExactMatch


@pytest.mark.parametrize("response, target, kwargs, want", [
    ("42", "42", {}, 1.0),
    ("  42\n", "42", {}, 1.0),
    ("42", " 42 ", {}, 1.0),
    ("  42\n", "42", {"strip": False}, 0.0),
    ("42", "42", {"strip": False}, 1.0),
    ("4 2", "42", {}, 0.0),  # inner whitespace is significant
    ("Paris", "paris", {}, 0.0),
    ("Paris", "paris", {"case_sensitive": False}, 1.0),
    (" PARIS ", "paris", {"case_sensitive": False}, 1.0),
    ("Straße", "STRASSE", {"case_sensitive": False}, 1.0),  # casefold, not lower
    ("", "", {}, 1.0),
    ("   ", "", {}, 1.0),
    ("", "x", {}, 0.0),
    ("42.0", "42", {}, 0.0),  # exact, not numeric
])
def test_exact_match(response, target, kwargs, want):
    assert V.ExactMatch(**kwargs)(response, target) == want


# ----------------------------------------------------------------------------- NumericAnswer


@pytest.mark.parametrize("response, target, want", [
    ("42", "42", 1.0),
    ("The answer is 42.", "42", 1.0),
    ("x = 42", "42", 1.0),
    ("= 42", "42", 1.0),
    (r"so \boxed{42}", "42", 1.0),
    (r"\boxed{-7}", "-7", 1.0),
    ("  -17  ", "-17", 1.0),
    ("3-5=-2", "-2", 1.0),  # last number; the "-" of "3-5" is an operator
    ("5 =−3", "-3", 1.0),  # unicode minus
    ("+8", "8", 1.0),
    ("3.5", "3.5", 1.0),
    ("The result is 3.50.", "3.5", 1.0),
    ("0.5", ".5", 1.0),
    ("it is .5", "0.5", 1.0),
    ("-0.25", "-0.25", 1.0),
    ("1,234", "1234", 1.0),
    ("total: 1,234,567.5 units", "1234567.5", 1.0),
    ("1,234", "1,234", 1.0),  # target with separators
    ("1, 2, 3", "3", 1.0),  # a list, not 123
    ("1, 2, 3", "123", 0.0),
    ("1e3", "1000", 1.0),
    ("42", "42.0000000001", 1.0),  # within rel_tol
    ("42", "42.001", 0.0),
    ("41", "42", 0.0),
    ("-42", "42", 0.0),
    ("42", "-42", 0.0),
    ("no number here", "42", 0.0),
    ("", "0", 0.0),
    ("forty-two", "42", 0.0),
    ("12 then 42", "42", 1.0),
    ("42 then 12", "42", 0.0),
    ("0", "0", 1.0),
    ("-0", "0", 1.0),
])
def test_numeric_answer_last(response, target, want):
    assert V.NumericAnswer()(response, target) == want


@pytest.mark.parametrize("response, target, want", [
    ("42 then 12", "42", 1.0),
    ("12 then 42", "42", 0.0),
    ("3-5=-2", "3", 1.0),
    ("-3 and 4", "-3", 1.0),
    ("nothing", "1", 0.0),
])
def test_numeric_answer_first(response, target, want):
    assert V.NumericAnswer(which="first")(response, target) == want


def test_numeric_answer_tolerances():
    assert V.NumericAnswer(rel_tol=0.0, abs_tol=0.5)("3.4", "3") == 1.0
    assert V.NumericAnswer(rel_tol=0.0, abs_tol=0.5)("3.6", "3") == 0.0
    assert V.NumericAnswer(rel_tol=0.1, abs_tol=0.0)("105", "100") == 1.0
    assert V.NumericAnswer(rel_tol=0.0, abs_tol=0.0)("100.0", "100") == 1.0
    assert V.NumericAnswer()("1e-12", "0") == 1.0  # abs_tol 1e-9 near zero


def test_extract_numbers():
    got = V.extract_numbers(r"3-5=-2; 1,234 and 1, 2 and 1,2345 \boxed{42} .5 x-2 = −7 12,345.5")
    assert got == [3.0, 5.0, -2.0, 1234.0, 1.0, 2.0, 1.0, 2345.0, 42.0, 0.5, 2.0, -7.0, 12345.5]
    assert V.extract_numbers("") == []
    assert V.extract_numbers("The answer is 42.") == [42.0]


def test_numeric_answer_validation():
    with pytest.raises(ValueError, match="which"):
        V.NumericAnswer(which="middle")
    with pytest.raises(ValueError, match="tolerances"):
        V.NumericAnswer(rel_tol=-1.0)
    with pytest.raises(ValueError, match="not a number"):
        V.NumericAnswer()("42", "forty-two")


# ----------------------------------------------------------------------------- RegexFormat


def test_regex_full_and_partial():
    integer = V.RegexFormat(r"-?\d+")
    assert integer("42", "") == 1.0
    assert integer("  -42\n", "ignored") == 1.0  # stripped first, target ignored
    assert integer("42 apples", "") == 0.0
    assert integer("", "") == 0.0
    partial = V.RegexFormat(r"-?\d+", full=False)
    assert partial("42 apples", "") == 1.0
    assert partial("apples", "") == 0.0
    boxed = V.RegexFormat(r".*\\boxed\{[^}]*\}", full=True)
    assert boxed(r"so the answer is \boxed{7}", "") == 1.0
    assert boxed("so the answer is 7", "") == 0.0
    anchored = V.RegexFormat(r"^\d", full=False)
    assert anchored("   7 is it", "") == 1.0  # anchors apply to the stripped response


def test_regex_flags():
    assert V.RegexFormat("answer: \\d+")("ANSWER: 3", "") == 0.0
    import re
    assert V.RegexFormat("answer: \\d+", flags=re.IGNORECASE)("ANSWER: 3", "") == 1.0


@pytest.mark.parametrize("pattern", ["(", "[a-", "*x", "(?P<n>a)(?P<n>b)"])
def test_regex_invalid_pattern_raises_at_construction(pattern):
    with pytest.raises(ValueError, match="invalid regex"):
        V.RegexFormat(pattern)


def test_regex_is_hashable_comparable_picklable():
    a, b = V.RegexFormat(r"\d+"), V.RegexFormat(r"\d+")
    assert a == b and hash(a) == hash(b)
    assert a != V.RegexFormat(r"\d+", full=False)
    assert "_regex" not in repr(a)
    c = pickle.loads(pickle.dumps(a))
    assert c == a and c("12", "") == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.pattern = "x"  # type: ignore[misc]


# ----------------------------------------------------------------------------- Weighted / AllOf


def test_weighted_partial_credit():
    w = V.Weighted(((V.NumericAnswer(), 0.9), (V.RegexFormat(r"-?\d+"), 0.1)))
    assert w("42", "42") == pytest.approx(1.0)
    assert w("41", "42") == pytest.approx(0.1)  # right format, wrong number
    assert w("it is 42", "42") == pytest.approx(0.9)  # right number, wrong format
    assert w("no idea", "42") == 0.0
    assert 0.0 <= w("42", "42") <= 1.0
    assert isinstance(w.parts, tuple)
    hash(w)


def test_weighted_accepts_list_and_zero_weight():
    w = V.Weighted([(V.ExactMatch(), 1.0), (V.RegexFormat("x"), 0.0)])
    assert isinstance(w.parts, tuple) and w("a", "a") == 1.0 and w("x", "a") == 0.0
    # float round-off in weights is fine
    w3 = V.Weighted(((V.ExactMatch(), 0.1), (V.ExactMatch(), 0.2), (V.ExactMatch(), 0.7)))
    assert w3("a", "a") == 1.0


@pytest.mark.parametrize("parts, err", [
    ((), ValueError),
    (((V.ExactMatch(), 0.5),), ValueError),  # sums to 0.5
    (((V.ExactMatch(), 0.6), (V.ExactMatch(), 0.6)), ValueError),  # sums to 1.2
    (((V.ExactMatch(), 1.5), (V.ExactMatch(), -0.5)), ValueError),  # negative
    (((V.ExactMatch(), float("nan")),), ValueError),
    (((V.ExactMatch(), float("inf")),), ValueError),
    ((V.ExactMatch(),), ValueError),  # not a pair
    ((("not callable", 1.0),), TypeError),
])
def test_weighted_validation(parts, err):
    with pytest.raises(err):
        V.Weighted(parts)


def test_all_of():
    both = V.AllOf((V.NumericAnswer(), V.RegexFormat(r"-?\d+")))
    assert both("42", "42") == 1.0
    assert both("it is 42", "42") == 0.0
    assert both("41", "42") == 0.0
    half = V.Weighted(((V.ExactMatch(), 0.5), (V.RegexFormat(r"\d+"), 0.5)))
    assert V.AllOf((half, V.RegexFormat(r"\d+")))("7", "8") == pytest.approx(0.5)  # product
    assert V.AllOf([V.ExactMatch()])("a", "a") == 1.0
    with pytest.raises(ValueError):
        V.AllOf(())
    with pytest.raises(TypeError):
        V.AllOf((V.ExactMatch(), 3))


def test_all_of_short_circuits():
    calls = []

    def spy(response: str, target: str) -> float:
        calls.append(response)
        return 1.0

    assert V.AllOf((V.ExactMatch(), spy))("a", "b") == 0.0 and calls == []
    assert V.AllOf((V.ExactMatch(), spy))("a", "a") == 1.0 and calls == ["a"]


def test_verifiers_satisfy_protocol():
    for v in (V.ExactMatch(), V.NumericAnswer(), V.RegexFormat("x"),
              V.Weighted(((V.ExactMatch(), 1.0),)), V.AllOf((V.ExactMatch(),))):
        assert isinstance(v, V.Verifier)
        assert dataclasses.is_dataclass(v)
        assert hash(v) == hash(pickle.loads(pickle.dumps(v)))


# ----------------------------------------------------------------------------- score / registry


def test_score():
    r = V.score(V.NumericAnswer(), ["12", "the answer is 7", "nope"], ["12", "8", "1"])
    assert r.dtype == np.float32 and r.shape == (3,)
    np.testing.assert_array_equal(r, [1.0, 0.0, 0.0])
    empty = V.score(V.ExactMatch(), [], [])
    assert empty.dtype == np.float32 and empty.shape == (0,)
    r = V.score(V.ExactMatch(), ("a", "b"), np.array(["a", "c"]))
    np.testing.assert_array_equal(r, [1.0, 0.0])


def test_score_errors():
    with pytest.raises(ValueError, match="2 responses but 1 targets"):
        V.score(V.ExactMatch(), ["a", "b"], ["a"])
    with pytest.raises(TypeError, match="sequence of strings"):
        V.score(V.ExactMatch(), "ab", ["a", "b"])
    with pytest.raises(ValueError, match="outside"):
        V.score(lambda r, t: 2.0, ["a"], ["a"])
    with pytest.raises(ValueError, match="outside"):
        V.score(lambda r, t: float("nan"), ["a"], ["a"])


def test_registry():
    assert set(V.VERIFIERS) == {"contains", "exact_match", "numeric", "regex"}
    contains = V.make_verifier("contains")
    assert contains("The capital is Paris.", "paris") == 1.0 and contains("Parisian food", "Paris") == 0.0
    assert V.make_verifier("exact_match") == V.ExactMatch()
    assert V.make_verifier("numeric", which="first") == V.NumericAnswer(which="first")
    assert V.make_verifier("regex", pattern=r"\d+", full=False)("a1", "") == 1.0
    with pytest.raises(ValueError, match=r"unknown verifier 'nope'.*exact_match"):
        V.make_verifier("nope")
    with pytest.raises(TypeError, match="numeric"):
        V.make_verifier("numeric", bogus=1)
    with pytest.raises(ValueError, match="invalid regex"):
        V.make_verifier("regex", pattern="(")


# ----------------------------------------------------------------------------- ArithmeticTask


def test_problem_format_and_answers():
    task = ArithmeticTask(max_operand=20, ops=("+", "-", "*"), seed=3)
    probs = task.problems(500)
    assert len(probs) == 500 and all(isinstance(p, Problem) for p in probs)
    assert {p.op for p in probs} == {"+", "-", "*"}
    ref = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for p in probs:
        assert 0 <= p.a <= 20 and 0 <= p.b <= 20
        assert p.prompt == f"{p.a}{p.op}{p.b}="
        assert p.answer == str(ref[p.op](p.a, p.b))
        assert int(p.answer) == ref[p.op](p.a, p.b)
    assert any(p.answer.startswith("-") for p in probs)  # negative results are kept
    assert all(isinstance(p.a, int) and isinstance(p.b, int) for p in probs)
    # the task is checkable by the verifiers
    r = V.score(V.NumericAnswer(), [p.answer for p in probs], [p.answer for p in probs])
    assert r.min() == 1.0


def test_default_task():
    task = ArithmeticTask()
    assert (task.max_operand, task.ops, task.seed) == (99, ("+",), 0)
    probs = task.problems(100)
    assert all(p.op == "+" and 0 <= p.a <= 99 and 0 <= p.b <= 99 for p in probs)
    hash(task)


def test_determinism_and_seed():
    t = ArithmeticTask(ops=("+", "-"), seed=7)
    assert t.problems(200) == ArithmeticTask(ops=("+", "-"), seed=7).problems(200)
    assert t.problems(50, "test") == t.problems(50, "test")
    assert t.problems(200) != ArithmeticTask(ops=("+", "-"), seed=8).problems(200)
    assert t.problems(200) != t.problems(200, "test")
    assert t.problems(0) == [] and t.problems(0, "test") == []


def test_splits_are_disjoint():
    task = ArithmeticTask(max_operand=30, ops=("+", "-", "*"), seed=0)
    key = lambda p: (p.a, p.op, p.b)  # noqa: E731
    train = {key(p) for p in task.problems(20_000, "train")}
    test = {key(p) for p in task.problems(5_000, "test")}
    assert not train & test
    assert all(task.split_of(*k) == "train" for k in train)
    assert all(task.split_of(*k) == "test" for k in test)
    # other seeds draw different problems but never cross the split
    for seed in (1, 2):
        other = ArithmeticTask(max_operand=30, ops=("+", "-", "*"), seed=seed)
        assert not {key(p) for p in other.problems(5_000, "train")} & test
    # nearly every pair of the small space was seen, so the union covers the space
    all_pairs = {(a, op, b) for a in range(31) for b in range(31) for op in ("+", "-", "*")}
    assert len(train | test) > 0.95 * len(all_pairs)


def test_split_fraction_and_independence_of_task():
    a, b = np.meshgrid(np.arange(200), np.arange(200), indexing="ij")
    for op in tasks_lib.OPS:
        u = tasks_lib.pair_uniform(a.ravel(), op, b.ravel())
        assert u.shape == (40_000,) and (u >= 0).all() and (u < 1).all()
        assert 0.09 < (u < 0.1).mean() < 0.11
    # the split of a pair is a property of the pair, not of seed or max_operand
    small = ArithmeticTask(max_operand=10, ops=("+",), seed=0)
    large = ArithmeticTask(max_operand=1000, ops=("+", "*"), seed=5)
    for x in range(11):
        for y in range(11):
            assert small.split_of(x, "+", y) == large.split_of(x, "+", y) == tasks_lib.split_of(x, "+", y)
    # "3+4" and "4+3" are separate pairs (and ops matter)
    splits = {tasks_lib.split_of(x, op, y) for x in range(30) for y in range(30) for op in tasks_lib.OPS}
    assert splits == {"train", "test"}


def test_test_fraction_parameter():
    task = ArithmeticTask(max_operand=50, test_fraction=0.5)
    test = task.problems(2_000, "test")
    assert all(tasks_lib.pair_uniform(p.a, p.op, p.b)[0] < 0.5 for p in test)


def test_task_validation():
    with pytest.raises(ValueError, match="unsupported ops"):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError, match="empty"):
        ArithmeticTask(ops=())
    with pytest.raises(ValueError, match="duplicate"):
        ArithmeticTask(ops=("+", "+"))
    with pytest.raises(ValueError, match="max_operand"):
        ArithmeticTask(max_operand=-1)
    with pytest.raises(ValueError, match="test_fraction"):
        ArithmeticTask(test_fraction=0.0)
    assert ArithmeticTask(ops=["+", "*"]).ops == ("+", "*")  # lists are normalised (hashable)
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="split"):
        task.problems(3, "valid")
    with pytest.raises(ValueError, match="n must be"):
        task.problems(-1)


def test_empty_split_raises():
    # max_operand=0 has a single pair per op; one of the splits is empty
    task = ArithmeticTask(max_operand=0, ops=("+",))
    empty = "train" if task.split_of(0, "+", 0) == "test" else "test"
    with pytest.raises(ValueError, match="empty"):
        task.problems(1, empty)
    full = "test" if empty == "train" else "train"
    assert task.problems(3, full) == [Problem("0+0=", "0", 0, 0, "+")] * 3


# ----------------------------------------------------------------------------- ArithmeticTokenizer


def test_tokenizer_vocabulary():
    tok = ArithmeticTokenizer()
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 3 + len("0123456789+-*= ") == 18
    assert tok.encode("0") == [3] and tok.encode("9") == [12]
    assert tok.encode("+-*= ") == [13, 14, 15, 16, 17]
    assert tok.encode("12+7=", bos=True) == [1, 4, 5, 13, 10, 16]
    assert tok.encode("7", eos=True) == [10, 2]
    assert tok.encode("") == [] and tok.encode("", bos=True) == [1]


@pytest.mark.parametrize("text", ["", "0", "12+7=19", "3-5=-2", "99*99=9801", " 1 + 2 = 3 ", "0123456789+-*= "])
def test_tokenizer_round_trip(text):
    tok = ArithmeticTokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.decode(np.asarray(tok.encode(text, bos=True), dtype=np.int32)) == text


def test_tokenizer_round_trip_on_problems():
    tok = ArithmeticTokenizer()
    for p in ArithmeticTask(ops=("+", "-", "*")).problems(300):
        assert tok.decode(tok.encode(p.prompt + p.answer)) == p.prompt + p.answer


def test_tokenizer_decode_stops_and_skips():
    tok = ArithmeticTokenizer()
    ids = [1, 0] + tok.encode("4+4=") + [0] + tok.encode("8") + [2] + tok.encode("99") + [0, 0]
    assert tok.decode(ids) == "4+4=8"
    assert tok.decode([2, 4, 5]) == ""
    assert tok.decode([]) == ""
    batch = np.array([tok.encode("1+1=2", bos=True, eos=True) + [0], [1, 5, 2, 6, 6, 6, 6, 6]])
    assert tok.decode_batch(batch) == ["1+1=2", "2"]
    with pytest.raises(ValueError, match="outside"):
        tok.decode([18])
    with pytest.raises(ValueError, match="outside"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="integer"):
        tok.decode([1.0, 4.0])
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(batch)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        tok.decode_batch([1, 2])


@pytest.mark.parametrize("text, bad", [("1/2", "'/'"), ("x+y", "'x'"), ("1\n", r"'\\n'"), ("٣", "'٣'")])
def test_tokenizer_rejects_unknown_characters(text, bad):
    with pytest.raises(ValueError, match=bad):
        ArithmeticTokenizer().encode(text)


# ----------------------------------------------------------------------------- TaskIO.sft_batch


def _reference_row(tok: ArithmeticTokenizer, p: Problem):
    """Independent construction: walk the full text character by character."""
    tokens = ["<bos>"] + list(p.prompt) + list(p.answer) + ["<eos>"]
    is_answer = [False] * (1 + len(p.prompt)) + [True] * (len(p.answer) + 1)
    return [tok.id_to_token.index(t) for t in tokens], is_answer


def test_sft_batch_hand_checked():
    io = char_task(ArithmeticTask())
    batch = io.sft_batch([Problem("3+4=", "7", 3, 4, "+")])
    d, plus, eq = lambda c: 3 + int(c), 13, 16  # noqa: E731
    np.testing.assert_array_equal(batch["tokens"], [[1, d(3), plus, d(4), eq, d(7), 2]])
    np.testing.assert_array_equal(batch["positions"], [np.arange(7)])
    assert batch["attention"].all()
    np.testing.assert_array_equal(batch["response_mask"], [[0, 0, 0, 0, 0, 1, 1]])


def test_sft_batch_against_reference():
    """Ragged prompts are left-padded, answers right-padded; every row, stripped of its padding, is
    [bos] prompt answer [eos] with the response mask exactly on answer and [eos], positions from 0."""
    io = char_task(ArithmeticTask())
    tok = ArithmeticTokenizer()
    probs = ArithmeticTask(ops=("+", "-", "*"), seed=1).problems(200)
    batch = io.sft_batch(probs)
    assert set(batch) == {"tokens", "positions", "attention", "response_mask"}
    width = max(1 + len(p.prompt) for p in probs) + max(len(p.answer) + 1 for p in probs)
    assert batch["tokens"].shape == batch["response_mask"].shape == (200, width)
    assert batch["tokens"].dtype == np.int32 and batch["response_mask"].dtype == np.float32
    for i, p in enumerate(probs):
        real = batch["attention"][i]
        ids, is_answer = _reference_row(tok, p)
        assert batch["tokens"][i][real].tolist() == ids
        assert batch["response_mask"][i][real].tolist() == [float(a) for a in is_answer]
        assert batch["positions"][i][real].tolist() == list(range(len(ids)))
        assert not batch["response_mask"][i][~real].any() and not batch["tokens"][i][~real].any()
        assert tok.decode(batch["tokens"][i][real]) == p.prompt + p.answer


def test_sft_batch_trains_the_same_loss_as_the_sft_estimator():
    """`sft_loss` on TaskIO.sft_batch equals the SFT estimator's loss (one implementation of eq. 8),
    and both equal a float64 numpy recomputation over the answer tokens."""
    import jax

    import arlm
    from arlm.objectives import SFT, KLObjective, KLRegularizer, Policy, sft_loss
    io = char_task(ArithmeticTask())
    batch = io.sft_batch(ArithmeticTask(seed=2).problems(5))
    cfg = arlm.ModelConfig.llama(vocab_size=ArithmeticTokenizer().vocab_size, d_model=16, n_layers=1, n_heads=2,
                                 d_ff=32, max_seq_len=32)
    params = arlm.init_params(cfg, jax.random.PRNGKey(0))
    direct, metrics = sft_loss(cfg, params, batch)
    objective = KLObjective(Policy(cfg), KLRegularizer(0.0), SFT())
    via_estimator, _ = objective.loss({"policy": params}, batch, {"ref": params})
    logits = np.asarray(arlm.apply_model(cfg, params, batch["tokens"][:, :-1], positions=batch["positions"][:, :-1],
                                         attention_mask=batch["attention"][:, :-1]).logits_BxTxV, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    tok_logp = np.take_along_axis(logp, batch["tokens"][:, 1:, None], -1)[..., 0]
    m = batch["response_mask"][:, 1:]
    np.testing.assert_allclose(float(direct), -(tok_logp * m).sum() / m.sum(), rtol=1e-5)
    assert float(direct) == float(via_estimator) and float(metrics["tokens"]) == m.sum()


def test_sft_batch_empty():
    batch = char_task(ArithmeticTask()).sft_batch([])
    assert batch["tokens"].shape == (0, 0) and batch["response_mask"].shape == (0, 0)
