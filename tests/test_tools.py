"""The user-facing tools: windowed perplexity (arlm.windowed_nll, experiments/eval_ppl.py), batch
generation (experiments/generate.py), a chat that compiles once per prompt-length bucket
(experiments/chat.py), and the argument checks of arlm.generate and arlm.Sampler.

References: float64 numpy log-softmax of the model's own full-sequence logits, windows written
out as in Hugging Face's perplexity guide, the cache-free greedy loop
(`arlm.inference.simple.sample_tokens`), and (slow) transformers on the same SmolLM2 GGUF.
"""

from __future__ import annotations

import _hf_oracle  # noqa: F401  (first: forces offline mode before anything imports transformers)

import functools  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from _params import random_params  # noqa: E402

import arlm  # noqa: E402
from arlm import ModelConfig, Sampler  # noqa: E402
from arlm.data.tokenizers import ByteTokenizer, train_bpe  # noqa: E402
from arlm.inference.decoding import _prefill_jit, _step_jit, bucket_length, pad_prompts  # noqa: E402
from arlm.inference.perplexity import window_spans  # noqa: E402
from arlm.inference.simple import sample_tokens  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, MAX_LEN = 37, 64
CONFIG = ModelConfig.llama(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48,
                           max_seq_len=MAX_LEN, tie_embeddings=False)
PARAMS = random_params(CONFIG, seed=3, std=0.2)
_forward = jax.jit(arlm.forward, static_argnums=0)
TINY_TEMPLATE = ("{% for m in messages %}{{ m['role'][0] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}a:{% endif %}")
CORPUS = ("The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun. "
          "The brown fox runs into the wood, and the dog follows the fox. ") * 4


@functools.lru_cache(maxsize=None)
def _script(name: str):
    """experiments/<name>.py as a module (the scripts are not a package), loaded once."""
    spec = importlib.util.spec_from_file_location(f"_{name}", os.path.join(REPO, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def np_token_logps(config, params, window) -> np.ndarray:
    """float64 log p(window[j] | window[:j]) for j = 1 … len−1, from the model's logits of the unpadded window."""
    logits = np.asarray(_forward(config, params, jnp.asarray([window], jnp.int32))[0], np.float64)
    z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return logp[np.arange(len(window) - 1), np.asarray(window[1:])]


def hf_guide_nll(config, params, ids, context, stride) -> tuple[float, int, list[int]]:
    """Hugging Face's perplexity-guide loop, written out: (total NLL, tokens scored, each target's left context)."""
    total, scored, left_context, prev_end = 0.0, 0, [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        trg_len = end - prev_end                       # the targets this window adds
        logp = np_token_logps(config, params, ids[begin:end])
        mine = logp[-min(trg_len, len(logp)):]           # the first window cannot score its first id
        total -= float(mine.sum())
        scored += len(mine)
        left_context += list(range(end - begin - len(mine), end - begin))
        prev_end = end
        if end == len(ids):
            break
    return total, scored, left_context


# ---------------------------------------------------------------------------- windowed NLL

def test_windowed_nll_one_window_equals_numpy_full_sequence():
    ids = np.random.default_rng(0).integers(0, V, size=40).tolist()
    got = arlm.windowed_nll(CONFIG, PARAMS, ids, context=MAX_LEN, batch_size=4,
                            token_bytes=lambda i: b"x" * (i % 3))
    ref = -np_token_logps(CONFIG, PARAMS, ids).sum()           # the whole text in one forward pass
    assert got.n_tokens == len(ids) - 1
    assert got.total_nll == pytest.approx(ref, rel=1e-6)
    assert got.perplexity == pytest.approx(math.exp(ref / (len(ids) - 1)), rel=1e-6)
    assert got.n_bytes == sum(i % 3 for i in ids[1:])
    assert got.bits_per_byte == pytest.approx(ref / math.log(2) / got.n_bytes, rel=1e-6)


@pytest.mark.parametrize("n,context,stride,batch_size", [(46, 16, 6, 4), (46, 16, 15, 2), (40, 16, 1, 8),
                                                         (45, 16, 10, 1)])
def test_windowed_nll_with_stride_equals_each_tokens_own_window(n, context, stride, batch_size):
    """Every token scored once, from its own window's context, whatever the batching and padding
    (the last batch is padded with empty windows in the first three cases, the last window is
    shorter in the fourth)."""
    ids = np.random.default_rng(1).integers(0, V, size=n).tolist()
    got = arlm.windowed_nll(CONFIG, PARAMS, ids, context=context, stride=stride, batch_size=batch_size)
    ref, n_ref, left = hf_guide_nll(CONFIG, PARAMS, ids, context, stride)
    assert got.n_tokens == n_ref == len(ids) - 1
    assert got.total_nll == pytest.approx(ref, rel=1e-6)
    assert min(left[context - 1:]) >= context - stride and max(left) <= context - 1
    full = -np_token_logps(CONFIG, PARAMS, ids).sum()         # less context: a different number
    assert abs(got.total_nll - full) > 1e-3 * abs(full)


def test_window_spans_cover_each_target_once():
    for n, context, stride in [(2, 2, 1), (50, 16, 6), (100, 32, 31), (33, 8, 3), (7, 64, 32)]:
        targets = [t for _, first, end in window_spans(n, context, stride) for t in range(first, end)]
        assert targets == list(range(1, n))
        for begin, first, end in window_spans(n, context, stride):
            assert 0 <= begin < first <= end <= min(begin + context, n)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(ids=[3]), ValueError, "ids"),
    (dict(ids=[[1, 2, 3]]), ValueError, "1-D"),
    (dict(ids=[1, 2, V]), ValueError, "token ids"),
    (dict(ids=[1.0, 2.0]), TypeError, "integer"),
    (dict(context=MAX_LEN + 1), ValueError, "context"),
    (dict(context=1), ValueError, "context"),
    (dict(context=16.0), TypeError, "context"),
    (dict(context=16, stride=16), ValueError, "stride"),
    (dict(stride=0), ValueError, "stride"),
    (dict(batch_size=0), ValueError, "batch_size"),
    (dict(batch_size=True), TypeError, "batch_size"),
])
def test_windowed_nll_refuses_bad_input(kwargs, error, match):
    args = dict(ids=[1, 2, 3, 4], context=16, stride=None, batch_size=2) | kwargs
    with pytest.raises(error, match=match):
        arlm.windowed_nll(CONFIG, PARAMS, args.pop("ids"), **args)


# ---------------------------------------------------------------------------- a tiny checkpoint on disk

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A Llama checkpoint with a trained byte-level BPE, written by arlm.save_hf, and a compact chat
    template in tokenizer_config.json (as Hugging Face directories carry it)."""
    tok = train_bpe(CORPUS, 300)
    config = ModelConfig.llama(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                               d_ff=48, max_seq_len=MAX_LEN, tie_embeddings=False)
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    arlm.save_hf(path, config, random_params(config, seed=5, std=0.2), tok)
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|endoftext|>", "chat_template": TINY_TEMPLATE}, f)
    return path


def test_eval_ppl_cli_reports_windowed_nll_per_token_and_per_byte(tiny_dir, tmp_path, capsys):
    text_path = tmp_path / "text.txt"
    text = CORPUS[:300] + "é ü 😀\n"                            # multi-byte characters count all their bytes
    text_path.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    summary = _script("eval_ppl").main(["--model", tiny_dir, "--text", str(text_path), "--context", "32",
                                        "--stride", "12", "--batch_size", "3", "--out", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary
    assert json.loads((out / "summary.json").read_text()) == summary
    model = arlm.load(tiny_dir)
    ids = model.tokenizer.encode(text)
    ref, n_ref, _ = hf_guide_nll(model.config, model.params, ids, 32, 12)
    first_bytes = len(model.tokenizer.token_bytes(ids[0]))
    assert summary["n_tokens"] == n_ref == len(ids) - 1
    assert summary["n_bytes"] == len(text.encode("utf-8")) - first_bytes
    assert summary["total_nll_nats"] == pytest.approx(ref, rel=1e-6)
    assert summary["perplexity"] == pytest.approx(math.exp(ref / n_ref), rel=1e-6)
    assert summary["bits_per_byte"] == pytest.approx(ref / math.log(2) / summary["n_bytes"], rel=1e-6)
    # --max_tokens keeps the first N ids; --bos puts EOS (this tokenizer has no BOS) in front, so the
    # first text token is scored too.
    text_ids = _script("eval_ppl").text_ids
    assert text_ids(model, text, bos=False, max_tokens=20) == ids[:20]
    assert text_ids(model, text, bos=True, max_tokens=20) == [model.tokenizer.eos_id] + ids[:19]
    assert text_ids(model, text, bos=True, max_tokens=None) == [model.tokenizer.eos_id] + ids
    with pytest.raises(ValueError, match="--max_tokens"):
        text_ids(model, text, bos=False, max_tokens=1)


def test_eval_ppl_cli_refuses_a_context_beyond_the_window(tiny_dir, tmp_path):
    (tmp_path / "t.txt").write_text(CORPUS, encoding="utf-8")
    with pytest.raises(ValueError, match="context=1024 exceeds the model's window"):
        _script("eval_ppl").main(["--model", tiny_dir, "--text", str(tmp_path / "t.txt")])


# ---------------------------------------------------------------------------- experiments/generate.py

def test_generate_cli_greedy_completions_match_the_cache_free_loop(tiny_dir, tmp_path):
    """Prompts go through the checkpoint's chat template by default (it has one), raw with --no-chat."""
    lines = [{"id": 0, "prompt": "The quick brown fox"},
             {"id": 1, "prompt": "A lazy dog"},
             {"id": 2, "messages": [{"role": "user", "content": "the dog"}]}]
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(x) for x in lines[1:]) + "\n")
    dst = tmp_path / "out.jsonl"
    n_new = 6
    model = arlm.load(tiny_dir)
    assert model.chat_template == TINY_TEMPLATE
    for flag in ([], ["--no-chat"]):
        _script("generate").main(["--model", tiny_dir, "--prompts", str(src), "--out", str(dst),
                                  "--batch_size", "2", "--max_new_tokens", str(n_new)] + flag)
        got = [json.loads(x) for x in dst.read_text().splitlines()]
        assert len(got) == len(lines)
        for line, out in zip(lines, got, strict=True):
            messages = line.get("messages") or ([{"role": "user", "content": line["prompt"]}] if not flag else None)
            ids = model.chat_prompt(messages) if messages else model.tokenizer.encode(line["prompt"])
            assert len(ids) <= 32                                 # one prompt bucket: one compile
            _check_completion(model, ids, line, out, n_new)


def _check_completion(model, ids, line, out, n_new):
    """One output line against the cache-free greedy loop on the unpadded prompt."""
    eos = model.tokenizer.eos_id
    assert model.stop_ids == (eos,)                               # sample_tokens stops on one id
    ref = sample_tokens(model.config, model.params, ids, n_new, jax.random.PRNGKey(0), temperature=0.0, eos_id=eos)
    stopped = ref[-1] == eos
    assert {k: out[k] for k in line} == line                      # input fields kept
    assert out["completion"] == model.tokenizer.decode(ref[:-1] if stopped else ref)
    assert out["n_tokens"] == len(ref)
    assert out["stop_reason"] == ("eos" if stopped else "length")


def test_generate_finish_reports_eos_and_length():
    gen = _script("generate")
    tok = ByteTokenizer()
    tokens = np.array([104, 105, tok.eos_id, 0, 0])
    assert gen.finish({"prompt": "x"}, tokens, 3, tok, (tok.eos_id,)) == {
        "prompt": "x", "completion": "hi", "n_tokens": 3, "stop_reason": "eos"}
    assert gen.finish({"prompt": "x", "k": 1}, tokens, 2, tok, (tok.eos_id,)) == {
        "prompt": "x", "k": 1, "completion": "hi", "n_tokens": 2, "stop_reason": "length"}
    assert gen.finish({"prompt": "x"}, np.array([104, 33]), 2, tok, (tok.eos_id, 33)) == {   # another stop id
        "prompt": "x", "completion": "h", "n_tokens": 2, "stop_reason": "eos"}


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "ok"', "not valid JSON"),
    ('["prompt"]', "expected a JSON object"),
    ('{"text": "hi"}', "exactly one of 'prompt' or 'messages'"),
    ('{"prompt": "a", "messages": []}', "exactly one of"),
    ('{"prompt": ""}', "non-empty string"),
    ('{"prompt": 5}', "non-empty string"),
    ('{"messages": "hi"}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', "'role' and 'content'"),
])
def test_generate_cli_names_the_bad_line(tmp_path, line, match):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "fine"}\n\n' + line + "\n")
    with pytest.raises(_script("generate").PromptFileError, match=f"line 3: .*{match}"):
        _script("generate").read_prompts(str(src))


# ---------------------------------------------------------------------------- chat: one compile per bucket

def test_chat_compiles_once_per_prompt_length_bucket(monkeypatch, capsys):
    """Six growing turns through experiments/chat.py's own loop: the streamed prefill and decode step
    compile at most once per power-of-two prompt length touched, fewer times than multiple-of-8
    padding would (once per turn)."""
    config = ModelConfig.llama(vocab_size=257, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                               max_seq_len=128)
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    model = arlm.LoadedModel(config, random_params(config, seed=7), ByteTokenizer(), template)
    lengths, real_generate = [], arlm.generate

    def spy(cfg, params, prompts, **kwargs):
        lengths.append(len(prompts[0]))
        return real_generate(cfg, params, prompts, **kwargs)

    turns = [f"q{i}" for i in range(6)]
    monkeypatch.setattr(arlm, "load", lambda name: model)
    monkeypatch.setattr(arlm, "generate", spy)
    monkeypatch.setattr(sys, "argv", ["chat.py", "--model", "tiny", "--max_new_tokens", "2",
                                      "--system", "You are a tiny test model, be brief."])
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(turns) + "\n"))
    before = _prefill_jit._cache_size(), _step_jit._cache_size()
    _script("chat").main()
    compiles = _prefill_jit._cache_size() - before[0]
    assert _step_jit._cache_size() - before[1] == compiles      # one decode step per cache size
    pow2_buckets = {max(32, 2 ** math.ceil(math.log2(n))) for n in lengths}
    multiples_of_8 = {8 * math.ceil(n / 8) for n in lengths}
    assert capsys.readouterr().err.count("tokens/s]") == len(turns)
    with capsys.disabled():
        print(f"\nprompt lengths {lengths}: {compiles} compiles, pow2 buckets {sorted(pow2_buckets)}")
    assert len(lengths) == len(turns) and lengths == sorted(lengths)
    assert 1 <= compiles <= len(pow2_buckets) < len(multiples_of_8)


def test_pow2_buckets_pad_prompts_to_powers_of_two_capped_by_the_window():
    for n, width in [(1, 32), (8, 32), (32, 32), (33, 58), (58, 58)]:         # room = 64 − 6 = 58
        prompt, start = pad_prompts(CONFIG, [[1] * n], 6, bucket="pow2")
        assert prompt.shape == (1, width) and start[0] == width - n
    assert [bucket_length(n, "pow2") for n in (64, 65, 1000, 1024, 1025)] == [64, 128, 1024, 1024, 2048]
    assert pad_prompts(CONFIG, [[1] * 9], 6, bucket=8)[0].shape == (1, 16)
    assert pad_prompts(CONFIG, [[1] * 9], 6, bucket=5)[0].shape == (1, 10)


# ---------------------------------------------------------------------------- argument checks

@pytest.mark.parametrize("kwargs,error", [
    (dict(temperature=float("nan")), ValueError), (dict(temperature=float("inf")), ValueError),
    (dict(temperature=-0.5), ValueError), (dict(temperature="0.7"), TypeError), (dict(temperature=True), TypeError),
    (dict(top_k=3.0), TypeError), (dict(top_k="5"), TypeError), (dict(top_k=True), TypeError),
    (dict(top_k=0), ValueError), (dict(top_k=np.float32(3)), TypeError),
    (dict(top_p=0.0), ValueError), (dict(top_p=1.5), ValueError), (dict(top_p=float("nan")), ValueError),
    (dict(top_p="0.9"), TypeError),
    (dict(min_p=1.0), ValueError), (dict(min_p=-0.1), ValueError), (dict(min_p=float("inf")), ValueError),
])
def test_sampler_refuses_bad_arguments_by_name(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        Sampler(**kwargs)


def test_sampler_accepts_numpy_numbers_as_plain_ones():
    s = Sampler(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(1.0), min_p=0)
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.5, 5, 1.0, 0.0)
    assert type(s.top_k) is int and type(s.temperature) is float
    assert s == Sampler(0.5, top_k=5, top_p=1.0, min_p=0.0) and hash(s) == hash(Sampler(0.5, 5, 1.0, 0.0))
    assert Sampler(temperature=0).greedy


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(max_new_tokens=3.0), TypeError, "max_new_tokens"),
    (dict(max_new_tokens="5"), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=True), TypeError, "max_new_tokens"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=np.float64(4)), TypeError, "max_new_tokens"),
    (dict(sampler="greedy"), TypeError, "sampler"),
    (dict(prompt_bucket="geometric"), ValueError, "prompt_bucket"),
    (dict(prompt_bucket=0), ValueError, "prompt_bucket"),
    (dict(prompt_bucket=8.0), TypeError, "prompt_bucket"),
])
def test_generate_refuses_bad_arguments_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        arlm.generate(CONFIG, PARAMS, [[1, 2, 3]], key=jax.random.PRNGKey(0), **kwargs)


def test_generate_accepts_numpy_integer_max_new_tokens():
    out = arlm.generate(CONFIG, PARAMS, [[1, 2, 3]], key=jax.random.PRNGKey(0), max_new_tokens=np.int32(3))
    ref = sample_tokens(CONFIG, PARAMS, [1, 2, 3], 3, jax.random.PRNGKey(0), temperature=0.0)
    assert np.asarray(out.tokens_BxN).tolist() == [ref]


# ---------------------------------------------------------------------------- SmolLM2 against transformers

PPL_TEXT = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
            "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to "
            "1889. Locally nicknamed \"La dame de fer\" (French for \"Iron Lady\"), it was constructed as the "
            "centrepiece of the 1889 World's Fair, and to crown the centennial anniversary of the French "
            "Revolution. Although initially criticised by some of France's leading artists and intellectuals "
            "for its design, it has since become a global cultural icon of France and one of the most "
            "recognisable structures in the world.")


@pytest.mark.slow
def test_smollm2_windowed_perplexity_matches_transformers():
    """arlm's windowed perplexity of SmolLM2 equals the perplexity guide's loop run with transformers on
    the same GGUF (labels −100 outside each window's new targets), to 1e-4 relative."""
    path = _hf_oracle.gguf_path_or_skip("smollm2-135m-instruct")
    torch, _ = _hf_oracle.import_oracle()
    hf_model = _hf_oracle.load_hf_model(path)
    model = arlm.load(path)
    ids = model.tokenizer.encode(PPL_TEXT)
    assert ids == _hf_oracle.hf_encode(_hf_oracle.load_hf_tokenizer(path), PPL_TEXT)
    context, stride = 64, 24
    got = arlm.windowed_nll(model.config, model.params, ids, context=context, stride=stride, batch_size=4)
    total, n, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-(end - prev_end)] = -100
        with torch.no_grad():
            loss = hf_model(x, labels=labels).loss                 # mean over the labels not −100
        valid = int((labels[:, 1:] != -100).sum())
        total, n, prev_end = total + float(loss) * valid, n + valid, end
        if end == len(ids):
            break
    assert got.n_tokens == n == len(ids) - 1
    print(f"ppl arlm {got.perplexity:.6f} transformers {math.exp(total / n):.6f} ({n} tokens)")
    assert got.perplexity == pytest.approx(math.exp(total / n), rel=1e-4)
