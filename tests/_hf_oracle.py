"""The `transformers` oracle for real checkpoints: load a GGUF file with transformers (offline, float32).

Shared by the real-checkpoint tests. Import this module before anything imports
`transformers`: it forces offline mode, so no test ever touches the network.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from typing import Any, Sequence  # noqa: E402

import pytest  # noqa: E402


def skip_unless_ci(reason: str) -> None:
    """Skip locally when an optional piece is missing; under CI (CI=true) that is a failure."""
    if os.environ.get("CI", "").lower() in ("1", "true"):
        pytest.fail(f"CI must run this test: {reason}")
    pytest.skip(reason, allow_module_level=True)


def gguf_path_or_skip(name: str) -> str:
    """The named model's GGUF path; skips the test (with the install command) when it is not installed."""
    from arlm.checkpoints import resolve

    try:
        return resolve(name)
    except FileNotFoundError as err:
        skip_unless_ci(str(err))


def import_oracle():
    """(torch, transformers), skipping when the oracle is not installed (`pip install -e .[dev]`)."""
    import importlib

    modules = []
    for name in ("torch", "transformers", "accelerate"):   # transformers' GGUF loader needs accelerate
        try:
            modules.append(importlib.import_module(name))
        except ImportError as err:
            skip_unless_ci(f"{name} is not installed ({err}); pip install -e '.[dev]'")
    return modules[0], modules[1]


def load_hf_model(gguf_path: str):
    """transformers' model for a GGUF file: the same de-quantised weights, float32, eval mode, CPU."""
    torch, transformers = import_oracle()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # Quiet the GGUF converter's own tqdm bar (it ignores transformers' progress-bar switch).
    import functools
    import importlib

    try:
        gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        gguf_utils = None
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
            dtype=torch.float32)  # transformers 5 name of the old `torch_dtype`
    finally:
        if bar is not None:
            gguf_utils.tqdm = bar
    model.eval()
    return model


def load_hf_tokenizer(gguf_path: str):
    """transformers' tokenizer for a GGUF file (vocabulary, merges and chat template read from the file)."""
    _, transformers = import_oracle()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                      gguf_file=os.path.basename(gguf_path))


def input_ids(encoded: Any) -> list[int]:
    """Plain ids from whatever a transformers tokenizer call returned (list, dict, BatchEncoding, tensor)."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):  # a batch of one
        assert len(encoded) == 1, "expected a single sequence"
        encoded = encoded[0]
    return [int(i) for i in encoded]


def hf_encode(tokenizer, text: str) -> list[int]:
    return input_ids(tokenizer(text, add_special_tokens=False))


def hf_chat_ids(tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """transformers' prompt ids for `messages` (chat template + generation prompt)."""
    return input_ids(tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True))


def hf_logits(model, ids: Sequence[int]):
    """float32 logits [T, V] (numpy) of one sequence."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)], dtype=torch.long)).logits[0].float().numpy()


def hf_greedy(model, ids: Sequence[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """transformers' greedy continuation (new ids only, up to and including EOS if it stops early)."""
    import torch

    x = torch.tensor([list(ids)], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_id, pad_token_id=eos_id, num_beams=1, temperature=None,
                             top_p=None, top_k=None)
    return [int(i) for i in out[0, x.shape[1]:].tolist()]
