"""Config of `experiments/phenomena.py`: one study of the paper's analysis half (eqs. 19–23).

    python experiments/phenomena.py --config.study=icl [--config.size=large] [--config.model=PATH]

`size="small"` (default) finishes in at most ~10 minutes on 2 CPU cores; `size="large"` is the
GPU version (≥ 1000 draws per condition where the items allow it).
"""

import ml_collections



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
        contractive=dict(seeds=(0, 1, 2, 3, 4), gains=(1.0, 0.95, 0.9, 0.8, 0.7), d_model=256, n_layers=8,
                         n_heads=8, d_ff=768, seq_len=256, batch_size=32, learning_rate=1e-3, steps=4000,
                         corpus_chars=4_000_000, val_windows=128, jacobian_windows=8,
                         lags=(0, 1, 4, 16, 64, 128, 250), inject_lags=(1, 2, 4, 8, 16, 32, 64))))
    return c
