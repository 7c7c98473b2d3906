"""The main job's default config (experiments/configs/pretrain.py), shrunk to seconds on CPU."""

import importlib.util
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]


def default_pretrain_config():
    path = REPO / "experiments" / "configs" / "pretrain.py"
    spec = importlib.util.spec_from_file_location("_pretrain_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_job_config(workdir, *, data=None, optim=None, train=None, sample=None):
    """A tiny Llama on the byte tokenizer; each dict overrides that section."""
    c = default_pretrain_config()
    c.workdir = str(workdir)
    c.model.update(dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32))
    c.data.update(dict(tokenizer="byte", seq_len=32, batch_size=8, eval_batches=2))
    c.data.update(data or {})
    c.optim.update(optim or {})
    c.train.update(dict(progress=False))
    c.train.update(train or {})
    c.sample.update(sample or {})
    return c
