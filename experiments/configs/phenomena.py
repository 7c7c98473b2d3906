"""Config of `experiments/phenomena.py`: one study of the paper's analysis half (eqs. 19–22).

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
    # The GPU version: these replace the fields above when size == "large".
    c.large = ml_collections.ConfigDict(dict(
        samples_per_item=25, temperature_items=0, n_queries=1000, icl_contexts=64, icl_length=1024,
        cot_items=100, n_chains=16, k=16, steps=48, batch_size=128, layers=tuple(range(0, 31, 2)), offsets=(1, 3, 10)))
    return c
