"""The main job end to end on a tiny config, its CLI, and the loop's non-finite-loss stop."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import _tiny_job
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arlm.data import pipeline
from arlm.jobs.pretrain import prepare_data, run_pretraining
from arlm.sharding import MeshConfig, batch_sharding, make_mesh
from arlm.train.checkpoint import Checkpointer
from arlm.train.loop import LoopConfig, NonFiniteLossError, run_training
from arlm.train.metrics import MetricsWriter, read_metrics
from arlm.train.state import create_train_state
from arlm.train.step import make_train_step

REPO = _tiny_job.REPO
SUMMARY_KEYS = ["val_loss_nats_per_token", "unigram_nats_per_token", "val_bits_per_byte",
                "unigram_bits_per_byte", "train_tokens_per_second"]
PROMPTS = ["In the beginning", "And God said"]


def tiny_job_config(workdir, **train):
    """The main job shrunk to seconds on CPU (byte tokenizer, 8 forced devices)."""
    return _tiny_job.tiny_job_config(
        workdir, data=dict(batch_size=16), optim=dict(learning_rate=3e-3, warmup_steps=10),
        train=dict(log_every=10, eval_every=50, checkpoint_every=100, **train),
        sample=dict(prompts=PROMPTS, max_new_tokens=8))


@pytest.mark.slow
def test_tiny_job_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("ARLM_CACHE", str(tmp_path / "cache"))
    config = tiny_job_config(tmp_path / "run", steps=200)
    summary = run_pretraining(config)
    workdir = config.workdir

    # summary.json is the returned summary, with every headline number finite.
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(summary))
    for key in SUMMARY_KEYS:
        assert math.isfinite(on_disk[key]), (key, on_disk[key])
    assert on_disk["train_tokens_per_second"] > 0
    assert on_disk["steps"] == 200 and on_disk["resumed_from"] is None
    assert on_disk["n_params"] > 0

    # metrics.jsonl: train records every log_every steps, val records every eval_every steps.
    records = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [1] + list(range(10, 201, 10))
    assert [r["step"] for r in val] == [50, 100, 150, 200]
    assert all(math.isfinite(r["loss"]) for r in records)
    assert val[-1]["loss"] == pytest.approx(summary["val_loss_nats_per_token"], rel=1e-6)
    assert train[-1]["loss"] < train[0]["loss"]

    # TensorBoard events, the plot, the samples and the checkpoints.
    events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert len(events) == 1
    raw = open(events[0], "rb").read()
    assert b"train/loss" in raw and b"val/loss" in raw
    png = open(os.path.join(workdir, "loss_curve.png"), "rb").read()
    assert len(png) > 1000 and png.startswith(b"\x89PNG\r\n\x1a\n")
    samples = open(os.path.join(workdir, "samples.txt"), encoding="utf-8").read()
    for prompt in PROMPTS:
        assert prompt in samples
    assert len(summary["samples"]) == len(PROMPTS)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["100", "200"]

    # The model has learned more than unigram statistics.
    assert summary["val_loss_nats_per_token"] < summary["unigram_nats_per_token"] - 0.1, summary

    # Bits per byte = nats/token × tokens / (bytes × ln 2), on the scored validation targets.
    tokenizer, train_tokens, val_tokens = prepare_data(config)
    batches = pipeline.val_batches(val_tokens, config.data.seq_len, config.data.batch_size,
                                   max_batches=config.data.eval_batches)
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
    n_tokens = targets.size
    assert n_tokens == config.data.eval_batches * config.data.batch_size * config.data.seq_len
    n_bytes = sum(len(tokenizer.token_bytes(int(t))) for t in targets)
    for nats, bpb in (("val_loss_nats_per_token", "val_bits_per_byte"),
                      ("unigram_nats_per_token", "unigram_bits_per_byte")):
        assert summary[bpb] == pytest.approx(summary[nats] * n_tokens / (n_bytes * math.log(2)), rel=1e-9)
    # Byte tokenizer: one byte per (non-special) token, so bits/byte is just nats/token in bits.
    assert n_bytes == n_tokens
    assert summary["val_bits_per_byte"] == pytest.approx(summary["val_loss_nats_per_token"] / math.log(2))
    assert summary["unigram_nats_per_token"] == pytest.approx(
        pipeline.unigram_baseline(train_tokens, targets, tokenizer.vocab_size))


@pytest.mark.slow
def test_cli_runs(tmp_path):
    workdir = tmp_path / "cli"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["ARLM_CACHE"] = str(tmp_path / "cache")
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, str(REPO / "experiments" / "pretrain.py"),
           "--config", str(REPO / "experiments" / "configs" / "pretrain.py"),
           "--config.train.steps=3", f"--config.workdir={workdir}", "--config.train.progress=False",
           "--config.train.eval_every=3", "--config.model.d_model=32", "--config.model.n_layers=2",
           "--config.model.n_heads=4", "--config.model.n_kv_heads=2", "--config.model.d_ff=64",
           "--config.model.max_seq_len=32", "--config.data.tokenizer=byte", "--config.data.seq_len=32",
           "--config.data.batch_size=8", "--config.data.eval_batches=1", "--config.sample.max_new_tokens=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"outputs in {workdir}" in proc.stdout
    with open(workdir / "summary.json", encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["steps"] == 3
    assert summary["model"]["d_model"] == 32 and summary["model"]["vocab_size"] == 257
    for key in SUMMARY_KEYS:
        assert math.isfinite(summary[key]), (key, summary[key])
    for name in ("metrics.jsonl", "loss_curve.png", "samples.txt"):
        assert (workdir / name).stat().st_size > 0, name
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"]


# ---------------------------------------------------------------- a NaN loss stops the loop

def _loss(params, batch):
    pred = batch["inputs"] @ params["w"]
    return jnp.mean((pred - batch["targets"]) ** 2), {}


class Batches:
    """Regression batches; batch `nan_at` (0-based) has a NaN input, so its loss is NaN."""

    def __init__(self, nan_at):
        self.index, self.nan_at = 0, nan_at

    def __next__(self):
        rng = np.random.default_rng(self.index)
        batch = {"inputs": rng.normal(size=(8, 4)).astype(np.float32),
                 "targets": rng.normal(size=(8, 4)).astype(np.float32)}
        if self.index == self.nan_at:
            batch["inputs"][0, 0] = np.nan
        self.index += 1
        return batch


@pytest.mark.parametrize("checkpoint_every", [1, None], ids=["checkpoint_every_step", "no_checkpoints"])
@pytest.mark.parametrize("total_steps", [3, 6], ids=["nan_at_last_step", "nan_mid_run"])
def test_nan_loss_stops_the_loop(tmp_path, checkpoint_every, total_steps):
    mesh_cfg = MeshConfig()
    mesh = make_mesh(mesh_cfg)
    opt = optax.sgd(1e-2)
    state, sharding = create_train_state(lambda k: {"w": jax.random.normal(k, (4, 4))}, opt, mesh,
                                         mesh_cfg, seed=0)
    data_sharding = batch_sharding(mesh)
    step_fn = make_train_step(_loss, opt, sharding, data_sharding)
    batches = Batches(nan_at=2)                      # the third step's loss is NaN
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    ckpt = None
    if checkpoint_every:
        ckpt = Checkpointer(str(tmp_path / "ck"), save_every=checkpoint_every, keep=10)
    try:
        with pytest.raises(NonFiniteLossError, match="at step 3"):
            run_training(state, step_fn, batches, lambda b: jax.device_put(b, data_sharding),
                         LoopConfig(total_steps=total_steps, log_every=1, progress=False),
                         checkpointer=ckpt, data_state=lambda: {"next_index": batches.index}, writer=writer)
        if ckpt is not None:
            ckpt.wait()
            assert ckpt.all_steps() == [1, 2]        # the NaN step was never saved
            target, _ = create_train_state(lambda k: {"w": jax.random.normal(k, (4, 4))}, opt, mesh,
                                           mesh_cfg, seed=1)
            restored, data = ckpt.restore(target)
            assert int(restored.step) == 2 and data == {"next_index": 2}
            assert np.isfinite(np.asarray(restored.params["w"])).all()
    finally:
        writer.close()
        if ckpt is not None:
            ckpt.close()
    logged = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["step"] for r in logged] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in logged)


def test_nonfinite_update_is_skipped_when_configured(tmp_path):
    """skip_nonfinite: the NaN step leaves params untouched and the run goes on; the result equals
    applying the other batches' updates only, and the skip is logged."""
    mesh_cfg = MeshConfig()
    mesh = make_mesh(mesh_cfg)
    opt = optax.sgd(1e-2)
    init = lambda k: {"w": jax.random.normal(k, (4, 4))}      # noqa: E731
    data_sharding = batch_sharding(mesh)
    put = lambda b: jax.device_put(b, data_sharding)          # noqa: E731
    state, sharding = create_train_state(init, opt, mesh, mesh_cfg, seed=0)
    step_fn = make_train_step(_loss, opt, sharding, data_sharding, skip_nonfinite=True)
    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    try:
        result = run_training(state, step_fn, Batches(nan_at=2), put,
                              LoopConfig(total_steps=5, log_every=1, progress=False), writer=writer)
    finally:
        writer.close()
    ref, _ = create_train_state(init, opt, mesh, mesh_cfg, seed=0)
    plain = make_train_step(_loss, opt, sharding, data_sharding)
    clean = Batches(nan_at=-1)
    for i in range(5):
        batch = next(clean)
        if i != 2:
            ref, _ = plain(ref, put(batch))
    np.testing.assert_array_equal(np.asarray(result.state.params["w"]), np.asarray(ref.params["w"]))
    assert int(result.state.step) == 5
    logged = read_metrics(os.path.join(tmp_path, "metrics.jsonl"))
    assert [r["skipped"] for r in logged] == [0, 0, 1, 0, 0]
    assert not math.isfinite(logged[2]["loss"])
