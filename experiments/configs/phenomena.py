"""Config of `experiments/phenomena.py`: one study of the paper's analysis half (eqs. 19–23).

    python experiments/phenomena.py --config.study=icl [--config.size=large] [--config.model=PATH]

`size="small"` (default) finishes in at most ~10 minutes on 2 CPU cores; `size="large"` is the
GPU version (≥ 1000 draws per condition where the items allow it).
"""

import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from align import get_config as _align_config  # noqa: E402
from align_smollm2 import get_config as _align_smollm2_config  # noqa: E402


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.study = "trace"
    c.model = "smollm2-135m-instruct"      # anything arlm.load takes
    c.workdir = ""                         # default runs/phenomena/<study>
    # A JSONL file of your own (fields: arlm/analysis/data/README.md). `--config.items=FILE` sets it too:
    # a ConfigDict field cannot be called `items` (it would hide ConfigDict.items).
    c.item_file = ""
    c.size = "small"                       # "small" (CPU) or "large" (GPU)
    c.seed = 0
    c.batch_size = 32
    c.n_items = 0                          # 0: every item of the set
    # trace and drift
    c.prompt = "The capital of France is Paris, and the capital of Italy is"
    c.tau = 1.0
    # temperature
    c.taus = (0.0, 0.3, 0.7, 1.0, 1.5)
    c.samples_per_item = 4
    c.temperature_items = 40               # (n_items = 0): the first 40, to fit 10 CPU minutes
    c.max_new_tokens = 24
    # drift
    c.layers = (1, 5, 10, 15, 20, 25, 30)
    c.offsets = (3, 10)                    # s = t − offset besides s = t
    c.normalisations = ("raw", "relative", "final_norm", "semantic")
    c.k = 8
    c.steps = 24
    c.band = (0.5, 2.0)
    c.eps = (0.01, 0.1)
    # icl
    c.tasks = ("antonyms", "capitals")
    c.ks = (0, 1, 2, 4, 8, 16)
    c.n_queries = 40
    c.icl_contexts = 8
    c.icl_length = 512
    # cot_rag
    c.cot_items = 20
    c.n_chains = 5
    c.cot_tau = 0.7
    # continual (eq. 23): a byte-level Llama pretrained on the KJV text (A), then trained on additions (B)
    c.continual = ml_collections.ConfigDict(dict(
        seeds=(0, 1, 2), d_model=64, n_layers=2, n_heads=4, d_ff=192, seq_len=64, batch_size=16,
        learning_rate=3e-3, learning_rate_b=1e-3, steps_a=400, steps_b=150, corpus_chars=400_000,
        b_problems=20_000, max_operand=99,
        val_windows=32, fisher_batches=2, lams_l2=(0.01, 0.1, 1.0), lams_ewc=(1.0, 10.0, 100.0, 1000.0, 10000.0),
        lams_representation=(1.0, 10.0, 100.0), lora_ranks=(2, 8), tolerance=0.1))
    # contractive (open question 1): byte-level Llamas with residual_gain γ, trained on the KJV text
    c.contractive = ml_collections.ConfigDict(dict(
        seeds=(0, 1, 2), gains=(1.0, 0.9, 0.7), d_model=64, n_layers=4, n_heads=4, d_ff=192, seq_len=64,
        batch_size=16, learning_rate=3e-3, steps=400, corpus_chars=400_000, val_windows=32, jacobian_windows=4,
        lags=(0, 1, 4, 16, 32, 60), inject_lags=(1, 2, 4, 8, 16, 32)))
    # alignment_drift (next check 2): the align job's CPU default once per seed (policies saved under
    # <workdir>/align_seed<s>/policies/), then Hall(θ), error-injection recovery and J_L(t, s) spectra of
    # π_ref and of every policy on eval_problems held-out problems. align_dir="DIR{seed}" measures the
    # policies of earlier align runs instead (their configs must match `align`'s task).
    c.alignment_drift = ml_collections.ConfigDict(dict(
        seeds=(0, 1, 2), align_dir="", eval_problems=1000, jacobian_problems=8, lags=(0, 1, 2, 4, 8),
        align=_align_config()))
    # sycophancy_frontier (open question 3): a tiny π_ref SFT-ed on additions with and without a user's
    # opinion ("41 17+25="), aligned per p by DPO on a simulated rater's pairs (agreement preferred with
    # probability p) and by GRPO on the reward p·[agrees] + (1 − p)·[correct]
    c.sycophancy_frontier = ml_collections.ConfigDict(dict(
        seeds=(0, 1, 2), ps=(0.0, 0.25, 0.5, 0.75, 1.0), methods=("dpo", "grpo"),
        max_operand=49, max_offset=10, neutral_fraction=0.5, max_new_tokens=4,
        family="gpt2", d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=16,
        sft_steps=600, sft_target=0.5, sft_check_every=25, sft_probe=256, sft_batch_size=64, sft_learning_rate=3e-3,
        sft_pool=4000, train_problems=2000, anchor_pairs=True,
        dpo_beta=1.0, dpo_learning_rate=5e-4, dpo_steps=300, dpo_batch_pairs=32,
        onpolicy_beta=0.02, onpolicy_learning_rate=3e-4, onpolicy_iterations=60, onpolicy_prompts=16, onpolicy_k=8,
        onpolicy_epochs=1, onpolicy_neutral_share=0.5, eval_problems=400))
    # icl_emergence (open question 4): Llamas trained from scratch on associative recall (K = 4 key→value
    # pairs per sequence, a fresh mapping each time, then 8 queries) over depth × width, measured at eval_steps
    c.icl_emergence = ml_collections.ConfigDict(dict(
        seeds=(0, 1, 2), depths=(1, 2), widths=(32, 64), n_heads=4, ff_mult=4, n_keys=8, n_values=8, n_pairs=4,
        n_queries=8, batch_size=32, learning_rate=1e-3,
        eval_steps=(0, 100, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 1750, 2000, 2500, 3000),
        eval_sequences=256, margin=2.0))
    # The GPU version: these replace the fields above when size == "large".
    c.large = ml_collections.ConfigDict(dict(
        samples_per_item=25, temperature_items=0, n_queries=1000, icl_contexts=64, icl_length=1024,
        cot_items=100, n_chains=16, k=16, steps=48, batch_size=128, layers=tuple(range(0, 31, 2)), offsets=(1, 3, 10),
        continual=dict(seeds=(0, 1, 2, 3, 4), d_model=256, n_layers=6, n_heads=8, d_ff=768, seq_len=256,
                       batch_size=32, learning_rate=1e-3, learning_rate_b=3e-4, steps_a=4000, steps_b=1000,
                       corpus_chars=4_000_000,
                       b_problems=200_000, max_operand=999, val_windows=128, fisher_batches=8,
                       lams_l2=(0.001, 0.01, 0.1, 1.0), lams_ewc=(1.0, 10.0, 100.0, 1000.0, 10000.0),
                       lams_representation=(0.1, 1.0, 10.0, 100.0), lora_ranks=(4, 16, 64), tolerance=0.05),
        alignment_drift=dict(seeds=(0, 1, 2), align_dir="", eval_problems=2000, jacobian_problems=16,
                             lags=(0, 1, 2, 4, 8, 16, 32), align=_align_smollm2_config()),
        sycophancy_frontier=dict(
            seeds=tuple(range(10)), ps=(0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0), methods=("dpo", "grpo"),
            max_operand=49, max_offset=10, neutral_fraction=0.5, max_new_tokens=4,
            family="gpt2", d_model=64, n_layers=2, n_heads=4, d_ff=256, max_seq_len=16,
            sft_steps=1000, sft_target=0.5, sft_check_every=25, sft_probe=512, sft_batch_size=64,
            sft_learning_rate=3e-3, sft_pool=8000, train_problems=4000, anchor_pairs=True,
            dpo_beta=1.0, dpo_learning_rate=5e-4, dpo_steps=300, dpo_batch_pairs=32,
            onpolicy_beta=0.02, onpolicy_learning_rate=3e-4, onpolicy_iterations=300, onpolicy_prompts=32,
            onpolicy_k=8, onpolicy_epochs=1, onpolicy_neutral_share=0.5, eval_problems=1000),
        icl_emergence=dict(seeds=(0, 1, 2, 3, 4), depths=(1, 2, 3, 4, 5, 6), widths=(32, 64, 128, 256), n_heads=4,
                           ff_mult=4, n_keys=8, n_values=8, n_pairs=4, n_queries=8, batch_size=32, learning_rate=1e-3,
                           eval_steps=(0, 100, 200, 300, 400, 500, 600, 800, 1000, 1250, 1500, 1750, 2000, 2500,
                                       3000, 4000), eval_sequences=1024, margin=2.0),
        contractive=dict(seeds=(0, 1, 2, 3, 4), gains=(1.0, 0.95, 0.9, 0.8, 0.7), d_model=256, n_layers=8,
                         n_heads=8, d_ff=768, seq_len=256, batch_size=32, learning_rate=1e-3, steps=4000,
                         corpus_chars=4_000_000, val_windows=128, jacobian_windows=8,
                         lags=(0, 1, 4, 16, 64, 128, 250), inject_lags=(1, 2, 4, 8, 16, 32, 64))))
    return c
