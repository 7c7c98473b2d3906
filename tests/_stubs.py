"""Small stand-ins for the analysis tests: a character tokenizer for tiny vocabularies."""

from __future__ import annotations

from typing import Sequence


class CharTokenizer:
    """Token id i ↔ the i-th character of `alphabet`; no EOS (rows run to max_new_tokens)."""

    def __init__(self, alphabet: str) -> None:
        self.alphabet = alphabet
        self.eos_id = None

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        return [self.alphabet.index(ch) for ch in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.alphabet[int(i)] for i in ids)
