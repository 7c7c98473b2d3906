"""A byte-level BPE tokenizer built from a GGUF file's vocabulary and merges, with `tokenizers`.

GGUF stores byte-level vocabularies already spelled in GPT-2's byte→unicode
alphabet; tokens of type CONTROL (3) are special tokens (`<|im_start|>`, …)
and are matched whole in text, as are USER_DEFINED (4) ones.
"""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from arlm.checkpoints.layout import CheckpointFormatError
from arlm.data.tokenizers import BPETokenizer

_CONTROL, _USER_DEFINED = 3, 4


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tokenizer_from_gguf(reader) -> BPETokenizer:
    from arlm.checkpoints.gguf_file import field, required_field

    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise CheckpointFormatError(f"unsupported GGUF tokenizer model {kind!r}; arlm builds byte-level BPE ('gpt2')")
    tokens = list(required_field(reader, "tokenizer.ggml.tokens"))
    merges_raw = field(reader, "tokenizer.ggml.merges")
    if merges_raw is None:
        raise CheckpointFormatError("GGUF byte-level tokenizer has no tokenizer.ggml.merges")
    token_types = list(field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    spelling = _byte_alphabet()
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
    eos = tokens[int(required_field(reader, "tokenizer.ggml.eos_token_id"))]
    bos_id = field(reader, "tokenizer.ggml.bos_token_id")
    bos = tokens[int(bos_id)] if bos_id is not None else None
    return BPETokenizer.from_tokenizer(tok, eos_token=eos, bos_token=bos, parse_special_tokens=True)
