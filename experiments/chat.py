"""Chat with a checkpoint in the terminal, streaming the reply token by token.

    python experiments/chat.py --model smollm2-135m-instruct [--temperature 0] [--max_new_tokens 256]
    echo "What is 2+2?" | python experiments/chat.py --model path/to/model.gguf

Each turn renders the whole conversation with the checkpoint's chat template.
An empty line or EOF ends the chat. The prompt is padded to a power-of-two length, so the
growing conversation reuses one compiled decode loop per length bucket (a reply that
enters a new bucket compiles first, which its tokens/s, printed to stderr, includes).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import arlm  # noqa: E402


class StreamPrinter:
    """Prints the text of a growing list of ids, only what is new (multi-byte safe)."""

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out, [], ""

    def __call__(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode([i for i in self.ids if i != self.tokenizer.eos_id])
        if not text.endswith("\ufffd"):          # wait for the rest of a multi-byte character
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top_p", type=float, default=None)
    ap.add_argument("--max_new_tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--system", default=None, help="optional system message")
    args = ap.parse_args()

    model = arlm.load(args.model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    key = jax.random.PRNGKey(args.seed)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        prompt = model.chat_prompt(messages)
        printer = StreamPrinter(model.tokenizer)
        print("assistant> ", end="", flush=True)
        key, sub = jax.random.split(key)
        started = time.perf_counter()
        arlm.generate(model.config, model.params, [prompt], key=sub, max_new_tokens=args.max_new_tokens,
                      prompt_bucket="pow2",
                      sampler=arlm.Sampler(temperature=args.temperature, top_p=args.top_p),
                      eos_id=model.tokenizer.eos_id, stop_ids=model.stop_ids,
                      on_token=lambda step, tokens_B, live_B: live_B[0] and int(tokens_B[0]) not in model.stop_ids
                      and printer(int(tokens_B[0])))
        print()
        seconds = time.perf_counter() - started
        print(f"[{len(printer.ids)} tokens in {seconds:.2f} s, {len(printer.ids) / seconds:.1f} tokens/s]",
              file=sys.stderr, flush=True)
        reply = model.tokenizer.decode([i for i in printer.ids if i != model.tokenizer.eos_id])
        messages.append({"role": "assistant", "content": reply})


if __name__ == "__main__":
    main()
