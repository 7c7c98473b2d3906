"""The chat command: streaming text, and a real SmolLM2 conversation piped through the CLI."""

import importlib.util
import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import _hf_oracle
import arlm
from arlm.data.tokenizers import ByteTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _chat_module():
    spec = importlib.util.spec_from_file_location("_chat", os.path.join(REPO, "experiments", "chat.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stream_printer_waits_for_whole_characters():
    tok = ByteTokenizer()
    out = io.StringIO()
    printer = _chat_module().StreamPrinter(tok, out)
    text = "añ😀b"
    seen = []
    for i in tok.encode(text):
        printer(i)
        seen.append(out.getvalue())
    assert out.getvalue() == text
    assert all("\ufffd" not in s for s in seen)          # never a half-printed character
    printer(tok.eos_id)                                   # EOS prints nothing
    assert out.getvalue() == text


@pytest.mark.slow
def test_chat_cli_streams_the_greedy_reply():
    _hf_oracle.gguf_path_or_skip("smollm2-135m-instruct")
    model = arlm.load("smollm2-135m-instruct")
    question = "What is the capital of France?"
    ids = model.chat_prompt([{"role": "user", "content": question}])
    out = arlm.generate(model.config, model.params, [ids], key=jax.random.PRNGKey(0), max_new_tokens=16,
                        eos_id=model.tokenizer.eos_id)
    n = int(out.lengths_B[0])
    reply = model.tokenizer.decode([t for t in np.asarray(out.tokens_BxN[0, :n]).tolist()
                                    if t != model.tokenizer.eos_id])
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", "chat.py"), "--max_new_tokens", "16"],
                          input=question + "\n", capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "assistant> " + reply in proc.stdout
    assert "Paris" in reply
