"""Perplexity and bits per byte of a checkpoint on a text file, with a sliding window.

    python experiments/eval_ppl.py --model smollm2-135m-instruct --text book.txt [--context 1024]
        [--stride 512] [--batch_size 4] [--max_tokens N] [--bos] [--out runs/eval_ppl]

The text is tokenized whole (no special tokens; `--bos` puts the tokenizer's BOS, or EOS when
it has none, in front so that the first text token is scored too) and cut to its first
`--max_tokens` ids. Every id after the first is scored once, with up to `--context` ids of
left context (windows advance by `--stride`; `arlm.windowed_nll`). Reported: perplexity
exp(NLL/token) and bits per byte = total NLL in bits / UTF-8 bytes of the scored tokens
(`tokenizer.token_bytes`; BOS/EOS count 0 bytes). One JSON line goes to stdout, and to
OUT/summary.json with `--out`. `--model` is anything `arlm.load` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tqdm import tqdm  # noqa: E402

import arlm  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="named model, .gguf file or Hugging Face directory")
    ap.add_argument("--text", required=True, help="UTF-8 text file to score")
    ap.add_argument("--context", type=int, default=1024, help="window length in tokens (≤ the model's Δ)")
    ap.add_argument("--stride", type=int, default=None, help="window start step (default context // 2)")
    ap.add_argument("--batch_size", type=int, default=4, help="windows per compiled call")
    ap.add_argument("--max_tokens", type=int, default=None, help="score only the first N token ids")
    ap.add_argument("--bos", action="store_true", help="prepend BOS (or EOS) so the first text token is scored")
    ap.add_argument("--out", default=None, help="directory for summary.json")
    return ap.parse_args(argv)


def text_ids(model: arlm.LoadedModel, text: str, *, bos: bool, max_tokens: int | None) -> list[int]:
    """The ids to score: the text's tokens, optionally after BOS (EOS if none), cut to max_tokens."""
    if model.tokenizer is None:
        raise ValueError("the checkpoint carries no tokenizer (a Hugging Face directory needs tokenizer.json)")
    ids = model.tokenizer.encode(text)
    if bos:
        ids = [model.tokenizer.bos_id if model.tokenizer.bos_id is not None else model.tokenizer.eos_id] + ids
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"--max_tokens must be ≥ 2 (one token of context and one target), got {max_tokens}")
        ids = ids[:max_tokens]
    return ids


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Load, tokenize, score; the summary dict."""
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    model = arlm.load(args.model)
    ids = text_ids(model, text, bos=args.bos, max_tokens=args.max_tokens)
    stride = args.context // 2 if args.stride is None else args.stride
    started = time.perf_counter()
    with tqdm(total=max(len(ids) - 1, 0), unit="tok", desc="scoring", file=sys.stderr) as bar:
        result = arlm.windowed_nll(model.config, model.params, ids, context=args.context, stride=stride,
                                   batch_size=args.batch_size, token_bytes=model.tokenizer.token_bytes,
                                   on_batch=bar.update)
    seconds = time.perf_counter() - started
    return {"model": args.model, "text": args.text, "context": args.context, "stride": stride,
            "bos": args.bos, "n_tokens": result.n_tokens, "n_bytes": result.n_bytes,
            "nll_per_token": result.nll_per_token, "perplexity": result.perplexity,
            "bits_per_byte": result.bits_per_byte, "total_nll_nats": result.total_nll,
            "tokens_per_s": result.n_tokens / seconds}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the evaluation; print the JSON line (and write OUT/summary.json); return the summary."""
    args = parse_args(argv)
    summary = evaluate(args)
    line = json.dumps(summary)
    print(line, flush=True)
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    try:
        main()
    except (ValueError, TypeError, FileNotFoundError) as err:
        sys.exit(f"eval_ppl.py: error: {err}")
