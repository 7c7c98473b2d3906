"""A byte-level BPE tokenizer built from a GGUF file's vocabulary and merges, with `tokenizers`.

GGUF stores byte-level vocabularies already spelled in GPT-2's byte→unicode
alphabet; tokens of type CONTROL (3) are special tokens (`<|im_start|>`, …)
and are matched whole in text, as are USER_DEFINED (4) ones.

The returned `GGUFTokenizer` also carries the file's special-token metadata, as
transformers reads it: the named special tokens (tokenizer.ggml.bos/eos/unknown/
padding_token_id → bos_token, eos_token, unk_token, pad_token), add_bos_token
(tokenizer.ggml.add_bos_token) and the end-of-sequence ids (eos, and llama.cpp's
end-of-turn / end-of-message ids when present).
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from arlm.checkpoints.gguf_metadata import field, required_field
from arlm.checkpoints.layout import CheckpointFormatError
from arlm.data.tokenizers import BPETokenizer, byte_to_unicode

_CONTROL, _USER_DEFINED = 3, 4

# GGUF metadata key → the name transformers gives that special token.
_SPECIAL_TOKEN_KEYS = (("tokenizer.ggml.bos_token_id", "bos_token"), ("tokenizer.ggml.eos_token_id", "eos_token"),
                       ("tokenizer.ggml.unknown_token_id", "unk_token"),
                       ("tokenizer.ggml.padding_token_id", "pad_token"))
# Further ids llama.cpp stops on.
_STOP_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class GGUFTokenizer(BPETokenizer):
    """A `BPETokenizer` that also carries a GGUF file's special-token metadata (see the module docstring)."""

    def __init__(self, tokenizer, eos_token: str, bos_token: str | None, *, special_tokens: dict[str, str],
                 add_bos_token: bool, eos_ids: tuple[int, ...]) -> None:
        super().__init__(tokenizer, eos_token, bos_token, parse_special_tokens=True)
        self.special_tokens = dict(special_tokens)
        self.add_bos_token = bool(add_bos_token)
        self.eos_ids = tuple(eos_ids)


def _token_id(reader, key: str, n_tokens: int) -> int | None:
    """A token-id metadata field, checked to lie in the vocabulary (None if absent)."""
    value = field(reader, key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_tokens:
        raise CheckpointFormatError(f"GGUF metadata {key}={value!r} is not a token id in [0, {n_tokens})")
    return int(value)


def tokenizer_from_gguf(reader) -> GGUFTokenizer:
    """The byte-level BPE tokenizer of a GGUF file, with its special-token metadata."""
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointFormatError(f"unsupported GGUF tokenizer model {kind!r}; arlm builds byte-level BPE ('gpt2')")
    tokens = list(required_field(reader, "tokenizer.ggml.tokens"))
    merges_raw = field(reader, "tokenizer.ggml.merges")
    if merges_raw is None:
        raise CheckpointFormatError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    token_types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, tok in enumerate(tokens):
        spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(spelled, i)
    merges = [tuple(m.split(" ")) for m in merges_raw]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, normalized=False, special=True)
                for t, ty in zip(tokens, token_types) if ty == _CONTROL and set(t) <= alphabet]
    if specials:
        tok.add_special_tokens(specials)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, token_types) if ty == _USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)
    required_field(reader, "tokenizer.ggml.eos_token_id")
    ids = {name: _token_id(reader, key, len(tokens)) for key, name in _SPECIAL_TOKEN_KEYS}
    special_tokens = {name: tokens[i] for name, i in ids.items() if i is not None}
    stops = [ids["eos_token"], *(_token_id(reader, key, len(tokens)) for key in _STOP_KEYS)]
    add_bos = field(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise CheckpointFormatError(f"GGUF metadata tokenizer.ggml.add_bos_token={add_bos!r} is not a boolean")
    return GGUFTokenizer(tok, special_tokens["eos_token"], special_tokens.get("bos_token"),
                         special_tokens=special_tokens, add_bos_token=bool(add_bos),
                         eos_ids=tuple(dict.fromkeys(i for i in stops if i is not None)))
