"""Rows → token ids and loss masks, with the model's own tokenizer and chat template.

The mask marks the tokens the loss falls on (token t is scored when mask[t] is 1: predicted from
tokens < t; mask[0] is always 0). By default (`completion_only`) that is the completion of a
prompt–completion row and every assistant turn of a conversation; a text row is scored whole.

Standard (string) rows are tokenized piece by piece, as the model will see them when it generates:
prompt ids (after BOS, if the tokenizer adds one), then completion ids, then EOS. Conversational
rows are rendered with the chat template (`arlm.checkpoints.chat`) and tokenized whole, as
transformers' `apply_chat_template` does; the mask then comes from

  * the template's ``{% generation %}`` blocks, when it has them: every token whose characters
    overlap a block's output, exactly transformers' `return_assistant_tokens_mask=True`;
  * otherwise from rendering prefixes: for assistant turn i, the text of messages[:i] with the
    generation prompt (P) and of messages[:i+1] (Q) must be prefixes of the whole conversation,
    P of Q, and P's tokens the first tokens of the whole; turn i is then the characters between P
    and Q (its content, end-of-turn token and what the template writes after it). A template for
    which this does not hold (one that rewrites earlier turns, say) raises
    `ChatTemplateMaskError`: never a silently wrong mask.

Truncation is a policy (`TRUNCATION`): keep the start, keep the end, drop the row, raise, or (text
rows in pretraining) split a long document into pieces. `DataReport` counts what happened to every
row, so no row is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

from arlm.data.formats import Example
from arlm.data.rows import RowError

__all__ = ["TRUNCATION", "ON_ERROR", "ChatTemplateMaskError", "TextCodec", "TokenizeConfig", "DataReport",
           "assistant_mask", "sequence_tokens", "preference_tokens", "prompt_tokens", "truncate"]

TRUNCATION = ("error", "keep_start", "keep_end", "drop", "split")
ON_ERROR = ("error", "skip")


class ChatTemplateMaskError(RowError):
    """The chat template does not render a conversation's prefixes as prefixes of the whole, so the
    assistant tokens cannot be told from the prompt by rendering prefixes."""

    def __init__(self, message: str, *, where: str | None = None, field: str | None = "messages",
                 reason: str = "unsound_chat_template") -> None:
        super().__init__(message, where=where, field=field, reason=reason)


@dataclasses.dataclass(frozen=True)
class TextCodec:
    """What tokenization needs of a model: its tokenizer and a renderer of its chat template.

    Build it with `TextCodec.of(arlm.load(...))` (the loaded model's `chat_text` renders), or of a bare
    tokenizer, which then takes standard (string) rows only.

    render(messages, add_generation_prompt, generation_spans) -> text, or (text, spans) with spans;
    generation_blocks: whether the template marks assistant output with {% generation %} blocks;
    template: the template's text (what a token store's fingerprint records).
    """

    tokenizer: Any
    render_fn: Callable[..., Any] | None = None
    generation_blocks: bool = False
    add_bos: bool = False
    template: str = ""

    @classmethod
    def of(cls, model_or_tokenizer: Any) -> "TextCodec":
        if isinstance(model_or_tokenizer, TextCodec):
            return model_or_tokenizer
        tok = getattr(model_or_tokenizer, "tokenizer", None)
        if tok is not None:             # an arlm.load result (LoadedModel)
            m = model_or_tokenizer
            return cls(tok, m.chat_text, m.has_generation_blocks, bool(m.add_bos_token) and tok.bos_id is not None,
                       repr(dict(m.chat_templates) or m.chat_template))
        return cls(model_or_tokenizer)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_id)

    def text_ids(self, text: str, *, bos: bool = False) -> list[int]:
        """Plain text's ids (special-token strings are parsed as the tokenizer parses them), BOS first if asked."""
        ids = list(self.tokenizer.encode(text))
        return ([int(self.tokenizer.bos_id)] + ids) if bos and self.add_bos else ids

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, *,
               spans: bool = False) -> Any:
        if self.render_fn is None:
            raise RowError("conversational rows need a model's chat template (give --config.model, or a "
                           "TextCodec of an arlm.load result)", field="messages", reason="no_chat_template")
        try:
            return self.render_fn(list(messages), add_generation_prompt, generation_spans=spans)
        except ValueError as err:          # ChatTemplateError: the template refused these messages
            raise RowError(f"the chat template refused it: {err}", field="messages",
                           reason="template_error") from None


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
    """max_length: the longest example kept (tokens); truncation: one of TRUNCATION; completion_only:
    score only completions and assistant turns (False: every token after the first); add_eos: end
    standard rows with EOS (conversational rows end as their template ends them)."""

    max_length: int
    truncation: str = "error"
    completion_only: bool = True
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 2:
            raise ValueError(f"max_length must be ≥ 2, got {self.max_length}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"unknown truncation policy {self.truncation!r}; expected one of {TRUNCATION}")


# ----------------------------------------------------------------------------------------- masks

def assistant_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose character span [start, end) overlaps one of `spans` (transformers' rule
    for `return_assistant_tokens_mask`: a span cut by truncation keeps its remaining tokens)."""
    mask = np.zeros(len(offsets), np.uint8)
    for i, (start, end) in enumerate(offsets):
        for s, e in spans:
            if end > s and start < e:
                mask[i] = 1
                break
    return mask


def _check_prefix_tokens(codec: TextCodec, prefix: str, ids: Sequence[int], what: str) -> int:
    """len(tokens of `prefix`), checking they are the first tokens of the whole: what the model sees when
    it generates after `prefix` is what it was trained on."""
    prefix_ids = codec.tokenizer.encode(prefix)
    if list(ids[:len(prefix_ids)]) != list(prefix_ids):
        raise ChatTemplateMaskError(f"the tokens of {what} are not a prefix of the whole conversation's tokens "
                                    "(a token crosses the boundary), so the mask cannot be cut there")
    return len(prefix_ids)


def _conversation(codec: TextCodec, messages: list[dict[str, Any]], completion_from: int | None,
                  completion_only: bool) -> tuple[list[int], np.ndarray]:
    """Ids and mask of a rendered conversation. completion_from: the messages from this index on are
    the completion (prompt–completion rows); None: every assistant turn (conversational LM rows)."""
    if completion_from is not None:
        full = codec.render(messages, False)
        prompt = codec.render(messages[:completion_from], True)
        if not full.startswith(prompt):
            raise ChatTemplateMaskError("the chat template renders the prompt (with its generation prompt) as "
                                        "something that does not start the whole conversation", field="prompt")
        spans = [(len(prompt), len(full))]
        ids, offsets = codec.tokenizer.encode_with_offsets(full)
        _check_prefix_tokens(codec, prompt, ids, "the prompt")
    elif codec.generation_blocks:
        full, spans = codec.render(messages, False, spans=True)
        ids, offsets = codec.tokenizer.encode_with_offsets(full)
    else:
        full = codec.render(messages, False)
        ids, offsets = codec.tokenizer.encode_with_offsets(full)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            if i == 0:
                raise ChatTemplateMaskError("the conversation starts with an assistant turn, which has no prompt "
                                            "to render before it", field="messages[0]")
            before = codec.render(messages[:i], True)
            through = codec.render(messages[:i + 1], False)
            if not (through.startswith(before) and full.startswith(through)):
                raise ChatTemplateMaskError(
                    f"the chat template renders messages[:{i}] (+ generation prompt) or messages[:{i + 1}] as text "
                    "that is not a prefix of the whole conversation (it rewrites earlier turns), so the assistant "
                    "tokens cannot be found by rendering prefixes; give it {% generation %} blocks, or train on "
                    "every token (completion_only=False)", field=f"messages[{i}]")
            _check_prefix_tokens(codec, before, ids, f"messages[:{i}] with the generation prompt")
            spans.append((len(before), len(through)))
    mask = assistant_mask(offsets, spans) if completion_only else np.ones(len(ids), np.uint8)
    return list(ids), mask


def sequence_tokens(codec: TextCodec, ex: Example,
                    cfg: TokenizeConfig) -> tuple[list[tuple[np.ndarray, np.ndarray]], bool]:
    """A language-modelling or prompt–completion example → ([(ids int32[N], mask uint8[N])], truncated),
    after the truncation policy (several pieces only under "split"). RowError if the row cannot be used."""
    fmt = ex.format
    if fmt.kind == "language_modeling" and not fmt.conversational:
        ids = codec.text_ids(ex.text, bos=True) + ([codec.eos_id] if cfg.add_eos else [])
        mask = np.ones(len(ids), np.uint8)
    elif fmt.kind == "language_modeling":
        ids, mask = _conversation(codec, ex.messages, None, cfg.completion_only)
    elif fmt.kind == "prompt_completion" and not fmt.conversational:
        p = codec.text_ids(ex.prompt, bos=True)
        c = codec.text_ids(ex.completion) + ([codec.eos_id] if cfg.add_eos else [])
        ids = p + c
        mask = np.concatenate([np.full(len(p), 0 if cfg.completion_only else 1, np.uint8),
                               np.ones(len(c), np.uint8)])
    elif fmt.kind == "prompt_completion":
        ids, mask = _conversation(codec, list(ex.prompt) + list(ex.completion), len(ex.prompt), cfg.completion_only)
    else:
        raise ValueError(f"{fmt.describe()} rows are not sequences to train on with eq. 7/8")
    ids_N = np.asarray(ids, np.int32)
    mask_N = np.asarray(mask, np.uint8)
    if ids_N.size:
        mask_N[0] = 0
    pieces = truncate(ids_N, mask_N, cfg.max_length, cfg.truncation,
                      splittable=fmt.kind == "language_modeling" and not fmt.conversational)
    kept = [(i, m) for i, m in pieces if m.any()]
    if not kept:
        raise RowError("no token left to learn from (an empty completion, or truncation cut it away)",
                       field="completion" if fmt.kind == "prompt_completion" else
                       "messages" if fmt.conversational else None, reason="no_target_tokens")
    return kept, ids_N.size > cfg.max_length


def truncate(ids_N: np.ndarray, mask_N: np.ndarray, max_length: int, policy: str, *,
             splittable: bool = False) -> list[tuple[np.ndarray, np.ndarray]]:
    """Apply a truncation policy to one example; mask[0] of every piece is 0."""
    if ids_N.size <= max_length:
        return [(ids_N, mask_N)]
    n = ids_N.size
    if policy == "error":
        raise RowError(f"has {n} tokens, more than max_length = {max_length} (set --config.data.truncation to "
                       "keep_start, keep_end or drop)", reason="too_long")
    if policy == "drop":
        raise RowError(f"has {n} tokens > max_length = {max_length}: dropped (truncation=drop)", reason="too_long")
    if policy == "keep_start":
        pieces = [(ids_N[:max_length], mask_N[:max_length].copy())]
    elif policy == "keep_end":
        pieces = [(ids_N[-max_length:], mask_N[-max_length:].copy())]
    elif policy == "split":
        if not splittable:
            raise ValueError("truncation='split' cuts documents into pieces: text rows only (pretraining)")
        pieces = [(ids_N[s:s + max_length], mask_N[s:s + max_length].copy()) for s in range(0, n, max_length)]
        pieces = [(i, m) for i, m in pieces if i.size > 1]
    else:
        raise ValueError(f"unknown truncation policy {policy!r}; expected one of {TRUNCATION}")
    for _, m in pieces:
        m[0] = 0
    return pieces


def _conversation_response(codec: TextCodec, prompt: list[dict[str, Any]], response: list[dict[str, Any]],
                           field: str) -> tuple[list[int], list[int]]:
    before = codec.render(prompt, True)
    full = codec.render(list(prompt) + list(response), False)
    if not full.startswith(before):
        raise ChatTemplateMaskError("the chat template renders the prompt (with its generation prompt) as text that "
                                    "does not start prompt + response", field=field)
    ids = codec.tokenizer.encode(full)
    n = _check_prefix_tokens(codec, before, ids, "the prompt")
    return list(ids[:n]), list(ids[n:])


def preference_tokens(codec: TextCodec, ex: Example,
                      cfg: TokenizeConfig) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], bool]:
    """A preference example → ((prompt ids, chosen ids, rejected ids) int32, truncated), after the
    truncation policy: keep_start cuts the responses' ends, keep_end the prompt's start."""
    if ex.format.conversational:
        p, c = _conversation_response(codec, ex.prompt, ex.chosen, "chosen")
        p2, r = _conversation_response(codec, ex.prompt, ex.rejected, "rejected")
        if p != p2:
            raise ChatTemplateMaskError("the prompt tokenizes differently before chosen and before rejected",
                                        field="prompt")
    else:
        eos = [codec.eos_id] if cfg.add_eos else []
        p = codec.text_ids(ex.prompt, bos=True)
        c, r = codec.text_ids(ex.chosen) + eos, codec.text_ids(ex.rejected) + eos
    longest = len(p) + max(len(c), len(r))
    if longest > cfg.max_length:
        if cfg.truncation in ("error", "drop"):
            raise RowError(f"prompt + response has {longest} tokens, more than max_length = {cfg.max_length}"
                           + (": dropped (truncation=drop)" if cfg.truncation == "drop" else ""), reason="too_long")
        if cfg.truncation == "keep_start":
            room = cfg.max_length - len(p)
            if room < 1:
                raise RowError(f"the prompt alone has {len(p)} ≥ max_length = {cfg.max_length} tokens",
                               field="prompt", reason="too_long")
            c, r = c[:room], r[:room]
        elif cfg.truncation == "keep_end":
            c, r = c[:cfg.max_length - 1], r[:cfg.max_length - 1]
            p = p[len(p) - (cfg.max_length - max(len(c), len(r))):]
        else:
            raise ValueError("truncation='split' applies to text rows only")
    if c == r:
        raise RowError("chosen and rejected have the same tokens (after truncation)", field="rejected",
                       reason="identical_pair")
    return tuple(np.asarray(x, np.int32) for x in (p, c, r)), longest > cfg.max_length   # type: ignore[return-value]


def prompt_tokens(codec: TextCodec, ex: Example, cfg: TokenizeConfig) -> np.ndarray:
    """The prompt of any example as the model reads it before generating: the template's generation
    prompt for message lists, BOS + text otherwise. Too long: keep_end keeps its last tokens."""
    ids = codec.tokenizer.encode(codec.render(ex.prompt, True)) if isinstance(ex.prompt, list) \
        else codec.text_ids(ex.prompt, bos=True)
    if len(ids) > cfg.max_length:
        if cfg.truncation == "keep_end":
            ids = ids[-cfg.max_length:]
        else:
            raise RowError(f"the prompt has {len(ids)} tokens, more than max_length = {cfg.max_length}",
                           field="prompt", reason="too_long")
    return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------------------- the report

@dataclasses.dataclass
class DataReport:
    """What happened to every row of one dataset: read, kept, truncated, split or skipped (by reason)."""

    rows: int = 0
    kept: int = 0
    examples: int = 0                 # kept pieces (more than `kept` when documents are split)
    tokens: int = 0
    target_tokens: int = 0
    truncated: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=lambda: collections.defaultdict(int))
    first_errors: list[str] = dataclasses.field(default_factory=list)
    format: str | None = None

    def skip(self, err: RowError) -> None:
        self.skipped[err.reason] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(str(err))

    @property
    def rows_skipped(self) -> int:
        return sum(self.skipped.values())

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "rows": self.rows, "kept": self.kept, "examples": self.examples,
                "tokens": self.tokens, "target_tokens": self.target_tokens, "truncated": self.truncated,
                "rows_skipped": self.rows_skipped, "skipped_by_reason": dict(self.skipped),
                "first_errors": list(self.first_errors)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "DataReport":
        report = cls(rows=d["rows"], kept=d["kept"], examples=d["examples"], tokens=d["tokens"],
                     target_tokens=d["target_tokens"], truncated=d["truncated"], format=d.get("format"),
                     first_errors=list(d.get("first_errors", [])))
        report.skipped.update(d.get("skipped_by_reason", {}))
        return report

