"""Default config of the main job: a small Llama-family model on the bundled KJV corpus.

Sized to finish within 10 minutes on 2 CPU cores. Override any field from the
command line, e.g. `--config.train.steps=200 --config.model.family=gpt2`.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.workdir = "runs/pretrain"
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        family="llama", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384,
        max_seq_len=128, dtype="float32", tie_embeddings=True, rope_theta=10000.0))

    c.data = ml_collections.ConfigDict(dict(
        corpus="kjv", tokenizer="bpe", vocab_size=2048, seq_len=128, batch_size=32,
        val_fraction=0.05, eval_batches=16))

    c.optim = ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=50, min_lr_ratio=0.1, weight_decay=0.1,
        b1=0.9, b2=0.95, clip_norm=1.0, grad_accum=1))

    c.train = ml_collections.ConfigDict(dict(
        steps=500, eval_every=100, log_every=10, checkpoint_every=200, keep_checkpoints=2,
        progress=True))
    # Stop (and checkpoint) after this many steps while keeping the schedule of train.steps.
    c.train.stop_after = config_dict.placeholder(int)

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, param_sharding="replicate"))
    # Multi-host (`arlm.distributed`): unset fields come from ARLM_COORDINATOR, ARLM_NUM_PROCESSES,
    # ARLM_PROCESS_ID, ARLM_LOCAL_DEVICES; with none, one process.
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator=config_dict.placeholder(str), num_processes=config_dict.placeholder(int),
        process_id=config_dict.placeholder(int), local_devices=config_dict.placeholder(int)))

    c.sample = ml_collections.ConfigDict(dict(
        prompts=["In the beginning", "And the LORD said unto Moses,", "Blessed are"],
        max_new_tokens=48, temperature=0.8))
    return c
