"""Batch generation from a JSONL file of prompts.

    python experiments/generate.py --model smollm2-135m-instruct --prompts in.jsonl --out out.jsonl
        [--batch_size 8] [--max_new_tokens 128] [--temperature 0] [--top_k K] [--top_p P] [--min_p P]
        [--seed 0] [--chat | --no-chat]

Each line of IN.jsonl is {"prompt": "text"} or {"messages": [{"role": ..., "content": ...}, …]}
(other fields are kept). "messages" are always rendered with the checkpoint's chat template;
a "prompt" is sent as one user message with --chat, as raw text with --no-chat, and by default
with the template when the checkpoint has one. OUT.jsonl gets one line per input line, in
order: the input's fields plus "completion" (the text, stop token left out), "n_tokens"
(tokens generated, the stop token included) and "stop_reason" ("eos": a stop token, i.e. the
tokenizer's EOS or another eos id the checkpoint declares; "length": max_new_tokens reached).
Batches are padded to --batch_size rows and prompts to power-of-two lengths, so a file
compiles the decode loop once per length bucket. A malformed line is an error naming its
line number, raised before anything is generated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Collection, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

import arlm  # noqa: E402


class PromptFileError(ValueError):
    """A line of the prompts file that is not a usable prompt (the message names the line)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="named model, .gguf file or Hugging Face directory")
    ap.add_argument("--prompts", required=True, help="input JSONL: {'prompt': ...} or {'messages': [...]}")
    ap.add_argument("--out", required=True, help="output JSONL")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--top_p", type=float, default=None)
    ap.add_argument("--min_p", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="render 'prompt' lines with the chat template (default: when the checkpoint has one)")
    return ap.parse_args(argv)


def _check_record(record: Any, where: str) -> None:
    """A PromptFileError unless `record` is {"prompt": non-empty str} or {"messages": [{role, content}, …]}."""
    if not isinstance(record, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if ("prompt" in record) == ("messages" in record):
        raise PromptFileError(f"{where}: needs exactly one of 'prompt' or 'messages', got keys {sorted(record)}")
    if "prompt" in record:
        if not isinstance(record["prompt"], str) or not record["prompt"]:
            raise PromptFileError(f"{where}: 'prompt' must be a non-empty string, got {record['prompt']!r}")
        return
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise PromptFileError(f"{where}: 'messages' must be a non-empty list, got {messages!r}")
    for m in messages:
        if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
                or not isinstance(m.get("content"), str)):
            raise PromptFileError(f"{where}: each message needs string 'role' and 'content', got {m!r}")


def read_prompts(path: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for each line of a JSONL prompts file (blank lines skipped), each checked;
    errors name the line."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise PromptFileError(f"{where}: not valid JSON ({err.msg})") from None
            _check_record(record, where)
            records.append((number, record))
    if not records:
        raise PromptFileError(f"{path}: no prompts")
    return records


def prompt_ids(model: arlm.LoadedModel, record: dict[str, Any], chat: bool) -> list[int]:
    """Token ids of one record: chat-templated messages, or the prompt as a user message or raw text."""
    if "messages" in record:
        return model.chat_prompt(record["messages"])
    if chat:
        return model.chat_prompt([{"role": "user", "content": record["prompt"]}])
    return model.tokenizer.encode(record["prompt"])


def finish(record: dict[str, Any], tokens_N: np.ndarray, length: int, tokenizer: Any,
           stop_ids: Collection[int]) -> dict[str, Any]:
    """The output line: the input's fields plus completion, n_tokens and stop_reason."""
    ids = [int(t) for t in tokens_N[:length]]
    stopped = bool(ids) and ids[-1] in stop_ids
    text = tokenizer.decode(ids[:-1] if stopped else ids)
    return {**record, "completion": text, "n_tokens": length, "stop_reason": "eos" if stopped else "length"}


def generate_file(model: arlm.LoadedModel, records: list[tuple[int, dict[str, Any]]], out_path: str, *,
                  sampler: arlm.Sampler, batch_size: int, max_new_tokens: int, seed: int, chat: bool) -> None:
    """Generate for every (line number, record) in batches of `batch_size` rows, writing out_path's lines
    batch by batch."""
    ids = []
    for number, record in records:
        ids.append(prompt_ids(model, record, chat))
        if not ids[-1]:
            raise PromptFileError(f"line {number}: the prompt encodes to no tokens")
    eos_id = model.tokenizer.eos_id
    stop_ids = tuple(getattr(model, "stop_ids", (eos_id,)))     # the tokenizer's EOS and any other eos ids
    key = jax.random.PRNGKey(seed)
    with open(out_path, "w", encoding="utf-8") as out, \
            tqdm(total=len(records), unit="prompt", desc="generating", file=sys.stderr) as bar:
        for batch, first in enumerate(range(0, len(records), batch_size)):
            rows = ids[first:first + batch_size]
            padded = rows + [rows[-1]] * (batch_size - len(rows))    # one batch shape for every batch
            result = arlm.generate(model.config, model.params, padded, key=jax.random.fold_in(key, batch),
                                   max_new_tokens=max_new_tokens, sampler=sampler, eos_id=eos_id,
                                   stop_ids=stop_ids, prompt_bucket="pow2")
            tokens_BxN, lengths_B = np.asarray(result.tokens_BxN), np.asarray(result.lengths_B)
            for row, (_, record) in enumerate(records[first:first + len(rows)]):
                line = finish(record, tokens_BxN[row], int(lengths_B[row]), model.tokenizer, stop_ids)
                out.write(json.dumps(line, ensure_ascii=False) + "\n")
            out.flush()
            bar.update(len(rows))


def main(argv: Sequence[str] | None = None) -> None:
    """Read the prompts, load the model, generate, write OUT.jsonl."""
    args = parse_args(argv)
    sampler = arlm.Sampler(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be ≥ 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max_new_tokens must be ≥ 1, got {args.max_new_tokens}")
    records = read_prompts(args.prompts)
    model = arlm.load(args.model)
    if model.tokenizer is None:
        raise ValueError("the checkpoint carries no tokenizer (a Hugging Face directory needs tokenizer.json)")
    chat = model.chat_template is not None if args.chat is None else args.chat
    generate_file(model, records, args.out, sampler=sampler, batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, chat=chat)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as err:
        sys.exit(f"generate.py: error: {err}")
