"""Supervised fine-tuning (eq. 8) on your data: the loss falls on completions and assistant turns.

    python experiments/sft.py --config.model=M --config.data.train=FILE [--config.data.eval=FILE]
        [--config.lora.rank=R] [--config.steps=N] [--config.workdir=DIR]

M is anything arlm.load takes (smollm2-135m-instruct, a .gguf file, a Hugging Face directory). FILE is
JSONL, JSON, Parquet, a datasets.save_to_disk folder, a glob, or "a.jsonl@0.7,b.jsonl@0.3" (a
mixture), with rows in TRL's formats: {"messages": [...]}, {"prompt", "completion"} (strings or
message lists) or {"text"}. Short examples are packed into rows (--config.data.packing=false pads
instead). Writes DIR/summary.json (eval_loss_before/after, steps, tokens, rows_skipped), loss.png,
metrics.jsonl, tensorboard/, checkpoints/ (a rerun resumes), model/ (Hugging Face, adapter merged)
and with LoRA adapter/ (PEFT's format). The defaults train SmolLM2 on arlm's bundled chat set.
"""

from _finetune_main import main

if __name__ == "__main__":
    main(__doc__, "sft")
