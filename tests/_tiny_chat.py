"""A tiny chat model as a Hugging Face directory: a byte-level BPE trained on arlm's bundled chat text,
a ChatML template (SmolLM2's, with its default system prompt), random Llama weights. `arlm.load` and
transformers both read it, so the user-data tests have an oracle and run in seconds."""

from __future__ import annotations

import functools
import json
import os
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import arlm
from _params import random_params
from arlm.data.bundled import bundled_path
from arlm.data.tokenizers import BPETokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# The same template with the assistant turns marked as transformers' assistant masks need them.
CHATML_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@functools.lru_cache(maxsize=1)
def tiny_bpe() -> BPETokenizer:
    texts = [open(bundled_path(n), encoding="utf-8").read() for n in ("chat_train", "text_train")]
    texts.append("Réponds en français, s'il te plaît: où est 東京? Ünïcödé ✓ 🐙" * 4)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                        show_progress=False))
    return BPETokenizer(tok, eos_token="<|im_end|>", parse_special_tokens=True)


def tiny_config(vocab_size: int, max_seq_len: int = 256) -> arlm.ModelConfig:
    return arlm.ModelConfig.llama(vocab_size=vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                  max_seq_len=max_seq_len, tie_embeddings=True)


def tiny_chat_dir(directory: str | None = None, *, template: str = CHATML, seed: int = 0) -> str:
    """Write the tiny chat model (random weights, scale 0.2) as a Hugging Face directory; returns it."""
    directory = directory or tempfile.mkdtemp(prefix="arlm-tiny-chat-")
    tok = tiny_bpe()
    config = tiny_config(tok.vocab_size)
    params = random_params(config, seed=seed, std=0.05)
    arlm.save_hf(directory, config, params, tok, chat_template=template,
                 special_tokens={"eos_token": "<|im_end|>", "pad_token": "<|im_end|>"})
    return directory


def hf_tokenizer(directory: str):
    import _hf_oracle

    _, transformers = _hf_oracle.import_oracle()
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(directory)


def write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return os.fspath(path)
