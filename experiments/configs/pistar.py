"""Config of `experiments/pistar.py`: every method on the enumerable problem of
`arlm.jobs.pistar` (V = 4, N = 3 → 64 responses per prompt, 2 prompts, β = 0.5)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/pistar"
    c.methods = ("ppo", "grpo", "grpo_unscaled_k2", "rloo", "dpo", "rsft")
    c.vocab = 4
    c.length = 3
    c.n_prompts = 2
    c.beta = 0.5
    c.iterations = 150
    c.seed = 0
    return c
