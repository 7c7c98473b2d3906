"""arlm's main job: pretrain a model on the bundled corpus (eq. 7), end to end.

`run_pretraining(config)` is what `experiments/pretrain.py` calls; it is a
library function so tests can run the very same job on a tiny config.
Outputs in `config.workdir`: metrics.jsonl, tensorboard/, checkpoints/,
loss_curve.png, samples.txt and summary.json.

Multi-host: after `arlm.distributed.initialize()` (which `experiments/pretrain.py` calls), every
process runs this same function over one global mesh. Each process reads only its rows of every
train and validation batch; checkpoints are written by all processes together; process 0 alone
writes metrics, plots, samples and the summary.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from arlm import distributed
from arlm.config import ModelConfig
from arlm.data import pipeline
from arlm.data.corpus import load_corpus
from arlm.data.tokenizers import Tokenizer, get_tokenizer
from arlm.inference import Sampler, generate
from arlm.model import count_params, init_params
from arlm.objectives import make_lm_loss, pretrain_loss
from arlm.sharding import MeshConfig, batch_sharding, make_mesh
from arlm.train.checkpoint import Checkpointer
from arlm.train.loop import LoopConfig, run_training
from arlm.train.metrics import MetricsWriter, read_metrics
from arlm.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from arlm.train.state import create_train_state
from arlm.train.step import make_train_step


def model_config_from(cfg: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """ModelConfig from `config.model` (a `family` key: "llama" or "gpt2", plus any fields)."""
    fields = dict(cfg.to_dict())
    family = fields.pop("family", "llama")
    builders = {"llama": ModelConfig.llama, "gpt2": ModelConfig.gpt2}
    if family not in builders:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(builders)}")
    return builders[family](vocab_size=vocab_size, **fields)


def prepare_data(cfg: ml_collections.ConfigDict) -> tuple[Tokenizer, np.ndarray, np.ndarray]:
    """Tokenizer, train tokens and validation tokens of the configured corpus."""
    d = cfg.data
    tokenizer = get_tokenizer(d.tokenizer, d.get("vocab_size") if d.tokenizer == "bpe" else None, corpus=d.corpus)
    tokens = pipeline.tokenize_corpus(tokenizer, load_corpus(d.corpus))
    train_tokens, val_tokens = pipeline.split_tokens(tokens, d.val_fraction)
    return tokenizer, train_tokens, val_tokens


def make_evaluator(model_cfg: ModelConfig, batches: list[dict[str, np.ndarray]], put_batch):
    """Mean validation NLL (nats/token) over a fixed list of batches."""
    @jax.jit
    def nll(params, batch):
        return pretrain_loss(model_cfg, params, batch)[1]["nll"]

    device_batches = [put_batch(distributed.local_rows(b)) for b in batches]

    def evaluate(state) -> dict[str, float]:
        losses = [nll(state.params, b) for b in device_batches]
        return {"loss": float(np.mean(jax.device_get(losses)))}
    return evaluate


def run_pretraining(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train, evaluate, checkpoint and report; returns the summary written to summary.json."""
    wall0 = time.perf_counter()
    workdir = config.workdir
    main = distributed.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    tokenizer, train_tokens, val_tokens = prepare_data(config)
    model_cfg = model_config_from(config.model, tokenizer.vocab_size)
    d, t = config.data, config.train
    optim_fields = config.optim.to_dict()
    # A short run (e.g. --config.train.steps=20) keeps its warmup inside the run.
    optim_fields["warmup_steps"] = min(optim_fields.get("warmup_steps", 0), t.steps)
    optim_cfg = OptimConfig(total_steps=t.steps, **optim_fields)
    optimizer = make_optimizer(optim_cfg)
    mesh_cfg = MeshConfig(**config.mesh.to_dict())
    mesh = make_mesh(mesh_cfg)
    state, state_sharding = create_train_state(lambda k: init_params(model_cfg, k), optimizer, mesh,
                                               mesh_cfg, config.seed)
    data_sharding = batch_sharding(mesh)
    put_batch = lambda b: distributed.put_batch(b, data_sharding)  # noqa: E731
    train_step = make_train_step(make_lm_loss(model_cfg), optimizer, state_sharding, data_sharding,
                                 grad_accum=optim_cfg.grad_accum,
                                 lr_schedule=learning_rate_schedule(optim_cfg))
    train_iter = pipeline.make_train_iterator(train_tokens, d.seq_len, d.batch_size, config.seed,
                                              process_index=jax.process_index(),
                                              process_count=jax.process_count())
    val = pipeline.val_batches(val_tokens, d.seq_len, d.batch_size, max_batches=d.eval_batches)
    evaluate = make_evaluator(model_cfg, val, put_batch)
    checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=t.checkpoint_every,
                                keep=t.keep_checkpoints)
    writer = MetricsWriter(workdir) if main else None
    try:
        result = run_training(
            state, train_step, train_iter, put_batch,
            LoopConfig(total_steps=t.steps, eval_every=t.eval_every, log_every=t.log_every,
                       progress=t.progress and main, stop_after=t.get("stop_after")),
            evaluate=evaluate, checkpointer=checkpointer,
            data_state=lambda: pipeline.iterator_state_to_json(train_iter),
            restore_data=lambda s: pipeline.restore_iterator(train_iter, s),
            writer=writer)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()

    if result.interrupted:       # preempted: the checkpoint is what matters; skip sampling and plots
        summary = {"interrupted": result.interrupted, "steps": int(result.state.step),
                   "resumed_from": result.resumed_from, "wall_seconds": time.perf_counter() - wall0}
        if main:
            with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=2)
        return summary
    val_tokens_used = np.concatenate([b["targets"].reshape(-1) for b in val])
    n_val_bytes = pipeline.count_bytes(tokenizer, val_tokens_used)
    unigram = pipeline.unigram_baseline(train_tokens, val_tokens_used, tokenizer.vocab_size)
    val_loss = result.last_eval.get("loss", float("nan"))
    summary = {
        "model": model_cfg.to_dict(),
        "n_params": count_params(result.state.params),
        "steps": int(result.state.step),
        "resumed_from": result.resumed_from,
        "val_loss_nats_per_token": val_loss,
        "val_bits_per_byte": pipeline.bits_per_byte(val_loss, val_tokens_used.size, n_val_bytes),
        "unigram_nats_per_token": unigram,
        "unigram_bits_per_byte": pipeline.bits_per_byte(unigram, val_tokens_used.size, n_val_bytes),
        "train_tokens_per_second": result.steady_tokens_per_second,
        "train_seconds": result.train_seconds,
        "devices": [str(x) for x in mesh.devices.flat],
        "processes": jax.process_count(),
    }
    params = result.state.params if jax.process_count() == 1 else distributed.gather(result.state.params)
    if not main:
        return summary
    samples = write_samples(config, model_cfg, params, tokenizer)
    plot_loss_curve(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png"),
                    unigram=unigram)
    summary["wall_seconds"] = time.perf_counter() - wall0
    summary["samples"] = samples
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    return summary


def write_samples(config, model_cfg: ModelConfig, params: Any, tokenizer: Tokenizer) -> list[str]:
    s = config.sample
    out = generate(model_cfg, params, [tokenizer.encode(p) for p in s.prompts], key=jax.random.PRNGKey(config.seed),
                   max_new_tokens=s.max_new_tokens, sampler=Sampler(temperature=s.temperature))
    tokens = np.asarray(out.tokens_BxN)
    texts = [prompt + tokenizer.decode(tokens[i].tolist()) for i, prompt in enumerate(s.prompts)]
    with open(os.path.join(config.workdir, "samples.txt"), "w", encoding="utf-8") as f:
        for text in texts:
            f.write(text + "\n\n" + "-" * 72 + "\n\n")
    return texts


def plot_loss_curve(metrics_path: str, out_png: str, *, unigram: float | None = None,
                    title: str = "Pretraining on the bundled corpus (eq. 7)",
                    ylabel: str = "cross-entropy (nats/token)") -> None:
    """Train and validation loss against step, with the unigram baseline as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split, style in (("train", "-"), ("val", "o-")):
        pts = sorted((r["step"], r["loss"]) for r in records if r["split"] == split and "loss" in r)
        if pts:
            ax.plot(*zip(*pts), style, label=f"{split} loss", markersize=3)
    if unigram is not None and math.isfinite(unigram):
        ax.axhline(unigram, color="gray", linestyle="--", label=f"unigram baseline ({unigram:.2f})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
