"""Orbax checkpoints: exact resume of the main job, keep-last-K, damaged or mismatched
checkpoints, and restoring under a different mesh (8 forced CPU devices)."""

from __future__ import annotations

import dataclasses
import gc
import glob
import os
import warnings

import _tiny_job
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import arlm
from arlm.data import pipeline
from arlm.jobs.pretrain import model_config_from, prepare_data, run_pretraining
from arlm.sharding import MeshConfig, batch_sharding, make_mesh, named
from arlm.train.checkpoint import Checkpointer, CheckpointError, DamagedCheckpointWarning
from arlm.train.loop import LoopConfig, run_training
from arlm.train.metrics import read_metrics
from arlm.train.optim import OptimConfig, make_optimizer
from arlm.train.state import TrainState, create_train_state, state_specs
from arlm.train.step import make_train_step

TINY = arlm.ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                              max_seq_len=16)
OPT_CFG = OptimConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20)


def tiny_job_config(workdir, **train):
    """The main job shrunk to a few seconds on CPU (byte tokenizer)."""
    return _tiny_job.tiny_job_config(
        workdir, optim=dict(learning_rate=3e-3, warmup_steps=3),
        train=dict(log_every=1, eval_every=6, checkpoint_every=6, keep_checkpoints=3, **train),
        sample=dict(prompts=["In the beginning"], max_new_tokens=4))


def host(tree):
    return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def assert_trees_bitwise_equal(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(host(a))
    lb, tb = jax.tree_util.tree_flatten_with_path(host(b))
    assert ta == tb
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(path)} differs"


def job_target(config, vocab_size):
    """A freshly initialised TrainState on the job's mesh: the restore target for its checkpoints."""
    model_cfg = model_config_from(config.model, vocab_size)
    fields = config.optim.to_dict()
    fields["warmup_steps"] = min(fields["warmup_steps"], config.train.steps)
    optimizer = make_optimizer(OptimConfig(total_steps=config.train.steps, **fields))
    mesh_cfg = MeshConfig(**config.mesh.to_dict())
    state, _ = create_train_state(lambda k: arlm.init_params(model_cfg, k), optimizer,
                                  make_mesh(mesh_cfg), mesh_cfg, config.seed)
    return state


def restore(directory, target, step=None):
    ckpt = Checkpointer(directory)
    try:
        return ckpt.restore(target, step)
    finally:
        ckpt.close()


def saved_steps(directory):
    ckpt = Checkpointer(directory)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


# ---------------------------------------------------------------- exact resume of the main job

@pytest.mark.slow
def test_interrupted_job_resumes_bitwise(tmp_path, monkeypatch):
    monkeypatch.setenv("ARLM_CACHE", str(tmp_path / "cache"))
    n = 6
    cfg_a = tiny_job_config(tmp_path / "a", steps=2 * n)
    summary_a = run_pretraining(cfg_a)
    assert summary_a["steps"] == 2 * n and summary_a["resumed_from"] is None

    # Run B is interrupted after n steps (same schedule as A: total 2n steps), then rerun.
    cfg_b = tiny_job_config(tmp_path / "b", steps=2 * n, stop_after=n)
    summary_b1 = run_pretraining(cfg_b)
    assert summary_b1["steps"] == n and summary_b1["resumed_from"] is None
    ckpt_dir_b = str(tmp_path / "b" / "checkpoints")
    assert saved_steps(ckpt_dir_b) == [n]
    cfg_b.train.stop_after = None
    summary_b2 = run_pretraining(cfg_b)
    assert summary_b2["resumed_from"] == n
    assert summary_b2["steps"] == 2 * n

    # Final (and interruption-point) checkpoints agree bit for bit: params, optimizer, step, RNG, data.
    tokenizer, train_tokens, _ = prepare_data(cfg_a)
    target = job_target(cfg_a, tokenizer.vocab_size)
    ckpt_dir_a = str(tmp_path / "a" / "checkpoints")
    make_iterator = lambda: pipeline.make_train_iterator(  # noqa: E731
        train_tokens, cfg_a.data.seq_len, cfg_a.data.batch_size, cfg_a.seed)
    reference = make_iterator()
    for step in (n, 2 * n):
        state_a, data_a = restore(ckpt_dir_a, target, step)
        state_b, data_b = restore(ckpt_dir_b, target, step)
        assert int(state_a.step) == int(state_b.step) == step
        assert_trees_bitwise_equal(state_a, state_b)
        # The saved data position is that of an iterator that has yielded `step` batches.
        while int(reference.get_state()["next_index"]) < step:
            next(reference)
        assert data_a == data_b == pipeline.iterator_state_to_json(reference)
    # Restoring it into a fresh iterator continues with the very next batch.
    resumed = pipeline.restore_iterator(make_iterator(), data_b)
    nxt, want = next(resumed), next(reference)
    assert all(np.array_equal(nxt[k], want[k]) for k in ("inputs", "targets"))
    assert summary_b2["val_loss_nats_per_token"] == summary_a["val_loss_nats_per_token"]

    # The logged training losses are identical too, before and after the interruption.
    def train_losses(workdir):
        recs = [r for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
        steps = [r["step"] for r in recs]
        assert len(steps) == len(set(steps)), f"duplicated train records: {steps}"
        return {r["step"]: r["loss"] for r in recs}
    losses_a, losses_b = train_losses(cfg_a.workdir), train_losses(cfg_b.workdir)
    assert sorted(losses_a) == sorted(losses_b) == list(range(1, 2 * n + 1))
    assert [losses_b[s] for s in range(n + 1, 2 * n + 1)] == [losses_a[s] for s in range(n + 1, 2 * n + 1)]
    assert losses_b == losses_a


# ---------------------------------------------------------------- a tiny state for the rest

def _loss(params, batch):
    pred = batch["inputs"] @ params["w"] + params["b"][None, :]
    return jnp.mean((pred - batch["targets"]) ** 2), {}


class ToyBatches:
    """An endless, positioned stream of regression batches (state: the next batch index)."""

    def __init__(self):
        self.index = 0

    def __next__(self):
        rng = np.random.default_rng(self.index)
        self.index += 1
        return {"inputs": rng.normal(size=(8, 4)).astype(np.float32),
                "targets": rng.normal(size=(8, 4)).astype(np.float32)}


def toy_run(directory, steps, *, save_every, keep):
    """run_training on a 4x4 linear model, with the real Checkpointer and train step."""
    mesh_cfg = MeshConfig()
    mesh = make_mesh(mesh_cfg)
    opt = optax.adam(1e-2)
    init = lambda k: {"w": jax.random.normal(k, (4, 4)), "b": jnp.zeros((4,))}  # noqa: E731
    state, sharding = create_train_state(init, opt, mesh, mesh_cfg, seed=0)
    data_sharding = batch_sharding(mesh)
    step_fn = make_train_step(_loss, opt, sharding, data_sharding)
    batches = ToyBatches()
    ckpt = Checkpointer(directory, save_every=save_every, keep=keep)
    try:
        result = run_training(state, step_fn, batches, lambda b: jax.device_put(b, data_sharding),
                              LoopConfig(total_steps=steps, progress=False), checkpointer=ckpt,
                              data_state=lambda: {"next_index": batches.index},
                              restore_data=lambda d: setattr(batches, "index", d["next_index"]))
        return result, ckpt.all_steps(), ckpt.restore(result.state)[1]
    finally:
        ckpt.close()


def test_keeps_only_last_k_checkpoints(tmp_path):
    result, steps, data = toy_run(str(tmp_path / "ck"), 8, save_every=2, keep=2)
    assert int(result.state.step) == 8
    assert steps == [6, 8]
    assert data == {"next_index": 8}
    assert sorted(os.listdir(tmp_path / "ck")) == ["6", "8"]


# ---------------------------------------------------------------- missing, corrupt, mismatched

def abstract_target(model_cfg, mesh, mesh_cfg, optimizer=None):
    """ShapeDtypeStructs with shardings (no allocation, no compilation) for a restore target."""
    optimizer = optimizer or make_optimizer(OPT_CFG)

    def init(key):
        init_key, rng = jax.random.split(key)
        params = arlm.init_params(model_cfg, init_key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=rng)

    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    sharding = named(mesh, state_specs(abstract, optimizer, mesh, mesh_cfg))
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, sharding)


@pytest.fixture(scope="module")
def one_device():
    mesh_cfg = MeshConfig(data=1)
    mesh = make_mesh(mesh_cfg, jax.devices()[:1])
    state, _ = create_train_state(lambda k: arlm.init_params(TINY, k), make_optimizer(OPT_CFG), mesh,
                                  mesh_cfg, seed=0)
    return state, mesh, mesh_cfg


def save_once(directory, state, data=None, step=1):
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    try:
        assert ckpt.save(step, state, data)
    finally:
        ckpt.close()


def test_missing_checkpoint(tmp_path, one_device):
    state, _, _ = one_device
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        restore(str(tmp_path / "empty"), state)
    save_once(str(tmp_path / "ck"), state)
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 5.*have \[1\]"):
        restore(str(tmp_path / "ck"), state, step=5)


def test_round_trip(tmp_path, one_device):
    state, _, _ = one_device
    save_once(str(tmp_path / "ck"), state, {"next_index": 7})
    restored, data = restore(str(tmp_path / "ck"), state)
    assert data == {"next_index": 7}
    assert_trees_bitwise_equal(restored, state)


def _data_files(step_dir):
    """The array payload files orbax (OCDBT + zarr) writes under <step>/state/."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
             if os.path.isfile(f)]
    assert files, sorted(glob.glob(os.path.join(step_dir, "**"), recursive=True))
    return files


def _overwrite(files):
    rng = np.random.default_rng(0)
    for f in files:
        with open(f, "wb") as fh:
            fh.write(rng.bytes(os.path.getsize(f)))


def _truncate(files):
    for f in files:
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)


def _delete(files):
    for f in files:
        os.remove(f)


def _orbax_read(step_dir):
    """What orbax alone (no target, no arlm checks) reads from <step>/state, as host arrays, or None
    if it raises."""
    import orbax.checkpoint as ocp
    try:
        return jax.tree_util.tree_leaves(jax.device_get(
            ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(step_dir), "state"))))
    except Exception:  # noqa: BLE001  -- any orbax/tensorstore failure means orbax saw the damage
        return None
    finally:
        gc.collect()


def _silent_flip(files):
    """Flip one bit of the arrays' stored bytes such that orbax and tensorstore read the checkpoint
    without complaint but get different values: only arlm's own checksums can tell.

    Where a bit lands depends on the files' layout (a flip in a compression header or an OCDBT
    b-tree node is caught by them; one in bytes no array uses changes nothing), so try a few
    positions in each file, largest first, and keep the first flip that orbax reads silently wrong."""
    step_dir = files[0].split(os.sep + "state" + os.sep)[0]
    intact = _orbax_read(step_dir)
    assert intact is not None, f"orbax cannot read the undamaged {step_dir}"
    for path in sorted(files, key=os.path.getsize, reverse=True):
        raw = bytearray(open(path, "rb").read())
        for fraction in (0.5, 0.6, 0.4, 0.7, 0.3, 0.8, 0.2, 0.9):
            position = int(len(raw) * fraction)
            raw[position] ^= 0x01
            open(path, "wb").write(bytes(raw))
            damaged = _orbax_read(step_dir)
            if damaged is not None and any(not np.array_equal(a, b) for a, b in zip(intact, damaged)):
                return
            raw[position] ^= 0x01
        open(path, "wb").write(bytes(raw))
    raise AssertionError(f"no bit tried in {files} changes what orbax reads without orbax noticing")


def _flip_one_bit(files):
    """One bit in the middle of the largest payload file: orbax, tensorstore or arlm's checksum
    must catch it (which one depends on where it lands)."""
    big = max(files, key=os.path.getsize)
    raw = bytearray(open(big, "rb").read())
    raw[len(raw) // 2] ^= 0x01
    open(big, "wb").write(bytes(raw))


@pytest.fixture
def orbax_leftovers():
    """orbax abandons its other pending reads of a damaged checkpoint: collect them here, under this
    test's warning filters, rather than as "never awaited" warnings in whichever test runs next."""
    yield
    gc.collect()


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("damage", [_overwrite, _truncate, _delete, _flip_one_bit, _silent_flip],
                         ids=["overwrite", "truncate", "delete", "flip_one_bit", "silent_flip"])
def test_corrupt_checkpoint_raises(tmp_path, one_device, damage):
    state, _, _ = one_device
    directory = str(tmp_path / "ck")
    save_once(directory, state, {"next_index": 3})
    damage(_data_files(os.path.join(directory, "1")))
    with pytest.raises(CheckpointError, match="corrupt"):
        restore(directory, state)


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_checkpoint_of_another_model_raises(tmp_path, one_device):
    state, mesh, mesh_cfg = one_device
    directory = str(tmp_path / "ck")
    save_once(directory, state)
    wider = dataclasses.replace(TINY, d_model=48, n_heads=4)
    with pytest.raises(CheckpointError, match="step 1"):
        restore(directory, abstract_target(wider, mesh, mesh_cfg))
    deeper = dataclasses.replace(TINY, n_layers=3)
    with pytest.raises(CheckpointError, match="step 1"):
        restore(directory, abstract_target(deeper, mesh, mesh_cfg))
    gpt2 = arlm.ModelConfig.gpt2(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
    with pytest.raises(CheckpointError, match="step 1"):   # a different tree (biases, positions)
        restore(directory, abstract_target(gpt2, mesh, mesh_cfg))
    # a target that fits no step is the caller's mistake, not damage: every step stays in place
    assert saved_steps(directory) == [1] and not os.path.exists(os.path.join(directory, "damaged"))
    # The matching abstract target restores fine.
    restored, _ = restore(directory, abstract_target(TINY, mesh, mesh_cfg))
    assert_trees_bitwise_equal(restored, state)


# ---------------------------------------------------------------- resume past damaged checkpoints

def _corrupt_json(step_dir):
    """Cut the JSON item (input position + checksums) in half: no longer valid JSON."""
    path = os.path.join(step_dir, "data", "metadata")
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


DAMAGES = {"flip_one_bit": lambda d: _flip_one_bit(_data_files(d)),
           "silent_flip": lambda d: _silent_flip(_data_files(d)),       # only arlm's checksum sees it
           "truncate": lambda d: _truncate(_data_files(d)),
           "delete": lambda d: _delete(_data_files(d)),
           "corrupt_json": _corrupt_json}


@pytest.fixture
def three_checkpoints(tmp_path, one_device):
    """Steps 1, 2, 3 of distinct states (params shifted by the step) and data positions; returns
    (directory, {step: host copy of the state}, the restore target)."""
    state, _, _ = one_device
    directory = str(tmp_path / "ck")
    saved = {}
    ckpt = Checkpointer(directory, save_every=1, keep=3)
    try:
        for step in (1, 2, 3):
            s = state.replace(step=jnp.asarray(step, jnp.int32),
                              params=jax.tree_util.tree_map(lambda x: x + 0.25 * step, state.params))
            assert ckpt.save(step, s, {"next_index": 10 * step})
            saved[step] = host(s)
    finally:
        ckpt.close()
    return directory, saved, state


def _damaged_dirs(directory):
    path = os.path.join(directory, "damaged")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_resume_falls_back_to_newest_intact_step(three_checkpoints, damage):
    directory, saved, target = three_checkpoints
    DAMAGES[damage](os.path.join(directory, "3"))
    with pytest.warns(DamagedCheckpointWarning, match=r"step 3 .* is damaged.*resuming from step 2") as record:
        restored, data = restore(directory, target)
    assert len([w for w in record if w.category is DamagedCheckpointWarning]) == 1
    assert int(restored.step) == 2 and data == {"next_index": 20}
    assert_trees_bitwise_equal(restored, saved[2])
    # step 3 is moved aside (kept for a post-mortem), out of the manager's steps
    assert saved_steps(directory) == [1, 2] and _damaged_dirs(directory) == ["3"]
    assert not os.path.exists(os.path.join(directory, "3"))
    # the next resume is clean: step 2 again, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedCheckpointWarning)
        again, _ = restore(directory, target)
    assert_trees_bitwise_equal(again, saved[2])


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_resume_skips_two_damaged_steps(three_checkpoints):
    directory, saved, target = three_checkpoints
    DAMAGES["silent_flip"](os.path.join(directory, "3"))
    DAMAGES["corrupt_json"](os.path.join(directory, "2"))
    with pytest.warns(DamagedCheckpointWarning) as record:
        restored, data = restore(directory, target)
    messages = [str(w.message) for w in record if w.category is DamagedCheckpointWarning]
    assert len(messages) == 2
    assert "step 3" in messages[0] and "checksum mismatch" in messages[0]
    assert "step 2" in messages[1] and "JSONDecodeError" in messages[1]
    assert int(restored.step) == 1 and data == {"next_index": 10}
    assert_trees_bitwise_equal(restored, saved[1])
    assert saved_steps(directory) == [1] and _damaged_dirs(directory) == ["2", "3"]


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_all_steps_damaged_raises_and_moves_nothing(three_checkpoints):
    directory, _, target = three_checkpoints
    for step, damage in zip((1, 2, 3), ("truncate", "corrupt_json", "silent_flip")):
        DAMAGES[damage](os.path.join(directory, str(step)))
    with pytest.raises(CheckpointError, match="no intact checkpoint") as info:
        restore(directory, target)
    message = str(info.value)
    lines = [line.strip() for line in message.splitlines()[1:]]     # newest first, one line per step
    assert [line.split(":")[0] for line in lines] == ["step 3", "step 2", "step 1"]
    assert "checksum mismatch" in lines[0] and "JSONDecodeError" in lines[1] and "corrupt" in lines[2]
    assert saved_steps(directory) == [1, 2, 3] and _damaged_dirs(directory) == []


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_explicit_step_stays_strict(three_checkpoints):
    directory, saved, target = three_checkpoints
    DAMAGES["silent_flip"](os.path.join(directory, "3"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DamagedCheckpointWarning)
        with pytest.raises(CheckpointError, match="step 3 .* checksum mismatch"):
            restore(directory, target, step=3)
        restored, data = restore(directory, target, step=1)          # an intact older step, on request
    assert data == {"next_index": 10}
    assert_trees_bitwise_equal(restored, saved[1])
    assert saved_steps(directory) == [1, 2, 3] and _damaged_dirs(directory) == []


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_step_damaged_again_and_a_failed_move(three_checkpoints, monkeypatch):
    """A step number set aside twice keeps both copies (damaged/3, damaged/3.1); a directory where
    the move fails (read-only) still resumes from the intact step, and the warning says so."""
    directory, saved, target = three_checkpoints

    def resave_and_damage_step_3():
        ckpt = Checkpointer(directory, save_every=1, keep=3)
        try:
            assert ckpt.save(3, target, {"next_index": 30})
        finally:
            ckpt.close()
        DAMAGES["truncate"](os.path.join(directory, "3"))

    DAMAGES["flip_one_bit"](os.path.join(directory, "3"))
    with pytest.warns(DamagedCheckpointWarning, match="moved it to .*damaged/3;"):
        restore(directory, target)
    resave_and_damage_step_3()
    with pytest.warns(DamagedCheckpointWarning, match=r"moved it to .*damaged/3\.1;"):
        restored, _ = restore(directory, target)
    assert _damaged_dirs(directory) == ["3", "3.1"] and saved_steps(directory) == [1, 2]
    assert_trees_bitwise_equal(restored, saved[2])

    resave_and_damage_step_3()

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("arlm.train.checkpoint.shutil.move", read_only)
    with pytest.warns(DamagedCheckpointWarning, match="could not move it aside .*PermissionError"):
        restored, data = restore(directory, target)
    assert data == {"next_index": 20}
    assert_trees_bitwise_equal(restored, saved[2])
    assert saved_steps(directory) == [1, 2, 3] and _damaged_dirs(directory) == ["3", "3.1"]


@pytest.mark.usefixtures("orbax_leftovers")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_training_resumed_past_damage_saves_that_step_again(tmp_path):
    """A run with checkpoints at 2, 4, 6 whose step 6 is damaged resumes from 4, trains 5 and 6
    again and saves step 6 over the damaged number; its checkpoints at 6 and 8 equal an
    uninterrupted 8-step run's bit for bit."""
    reference, _, _ = toy_run(str(tmp_path / "straight"), 8, save_every=2, keep=3)
    directory = str(tmp_path / "ck")
    first, steps, _ = toy_run(directory, 6, save_every=2, keep=3)
    assert steps == [2, 4, 6]
    at_6 = host(first.state)
    DAMAGES["flip_one_bit"](os.path.join(directory, "6"))
    with pytest.warns(DamagedCheckpointWarning, match="step 6"):
        resumed, steps, data = toy_run(directory, 8, save_every=2, keep=3)
    assert resumed.resumed_from == 4
    assert steps == [4, 6, 8] and data == {"next_index": 8}
    assert _damaged_dirs(directory) == ["6"]
    assert_trees_bitwise_equal(resumed.state, reference.state)
    ckpt = Checkpointer(directory)
    try:
        redone_6, data_6 = ckpt.restore(resumed.state, step=6)
    finally:
        ckpt.close()
    assert data_6 == {"next_index": 6}
    assert_trees_bitwise_equal(redone_6, at_6)


# ---------------------------------------------------------------- restore under another mesh

@pytest.mark.parametrize("abstract", [False, True], ids=["array_target", "abstract_target"])
def test_restore_onto_fsdp_mesh(tmp_path, one_device, abstract):
    state, _, _ = one_device
    directory = str(tmp_path / "ck")
    save_once(directory, state, {"next_index": 11})

    mesh_cfg = MeshConfig(data=2, fsdp=4, param_sharding="fsdp", min_fsdp_size=1)
    mesh = make_mesh(mesh_cfg)
    assert mesh.devices.size == 8
    if abstract:
        target = abstract_target(TINY, mesh, mesh_cfg)
    else:   # a different seed, so the restore must overwrite every value
        target, _ = create_train_state(lambda k: arlm.init_params(TINY, k), make_optimizer(OPT_CFG), mesh,
                                       mesh_cfg, seed=1)
    restored, data = restore(directory, target)
    assert data == {"next_index": 11}
    assert_trees_bitwise_equal(restored, state)

    r_leaves = jax.tree_util.tree_leaves(restored)
    t_leaves = jax.tree_util.tree_leaves(target)
    n_split = 0
    for r, t in zip(r_leaves, t_leaves):
        assert r.sharding.is_equivalent_to(t.sharding, r.ndim), (r.sharding, t.sharding)
        assert len(r.sharding.device_set) == 8
        n_split += any(ax is not None for ax in r.sharding.spec)
    assert n_split > 0, "no leaf is actually FSDP-sharded"
    # Each device holds only its shard of a split leaf (embed [64, 32]: its model dimension over fsdp=4).
    emb = restored.params["embed"]
    assert emb.sharding.spec == target.params["embed"].sharding.spec
    assert emb.addressable_shards[0].data.shape == (64, 8)


def test_restore_across_meshes_8_4_1(tmp_path):
    """Saved on 8 devices (data 2 × fsdp 2 × tensor 2), restored on 4 (data 2 × fsdp 2), saved again
    and restored on 1: every value bitwise equal, every leaf laid out as its new target says."""
    opt = make_optimizer(OPT_CFG)
    meshes = [(MeshConfig(data=2, fsdp=2, tensor=2, param_sharding="fsdp", min_fsdp_size=1), 8),
              (MeshConfig(data=2, fsdp=2, tensor=1, param_sharding="fsdp", min_fsdp_size=1), 4),
              (MeshConfig(data=1), 1)]
    cfg8, _ = meshes[0]
    mesh8 = make_mesh(cfg8)
    state, _ = create_train_state(lambda k: arlm.init_params(TINY, k), opt, mesh8, cfg8, seed=3)
    wq = state.params["layers"]["attn"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    original = jax.device_get(state)
    current = state
    for i, (mesh_cfg, n) in enumerate(meshes[1:], start=1):
        directory = str(tmp_path / f"ck{i}")
        save_once(directory, current, {"stage": i})
        mesh = make_mesh(mesh_cfg, jax.devices()[:n])
        target = abstract_target(TINY, mesh, mesh_cfg, opt)
        current, data = restore(directory, target)
        assert data == {"stage": i}
        assert_trees_bitwise_equal(current, original)
        for r, t in zip(jax.tree_util.tree_leaves(current), jax.tree_util.tree_leaves(target)):
            assert r.sharding.is_equivalent_to(t.sharding, r.ndim)
            assert len(r.sharding.device_set) == n
    assert current.params["layers"]["attn"]["wq"].addressable_shards[0].data.shape == wq.shape


def test_async_save_does_not_block_the_step(tmp_path):
    """save() returns once the arrays are copied off the device; the write goes on in the background
    while the next (donating) train step runs, and the checkpoint is complete and exact afterwards."""
    mesh_cfg = MeshConfig(data=1)
    mesh = make_mesh(mesh_cfg, jax.devices()[:1])
    opt = optax.sgd(1e-3)
    init = lambda k: {"w": jax.random.normal(k, (4096, 8192))}          # 128 MiB   # noqa: E731
    state, sharding = create_train_state(init, opt, mesh, mesh_cfg, seed=0)
    loss = lambda p, b: (jnp.mean(p["w"] * b["x"]), {})                  # noqa: E731
    step = make_train_step(loss, opt, sharding, batch_sharding(mesh))
    batch = {"x": jnp.ones((1, 8192), jnp.float32)}
    state, _ = step(state, batch)                                        # compiled before timing nothing
    saved = jax.device_get(state)
    ckpt = Checkpointer(str(tmp_path / "ck"), save_every=1, keep=2, async_save=True)
    try:
        assert ckpt.save(1, state, {"next_index": 1})
        assert ckpt.saving()                       # still writing when save() has returned …
        assert not os.path.exists(tmp_path / "ck" / "1")
        state, _ = step(state, batch)              # … and the step (which donates `state`) runs meanwhile
        jax.block_until_ready(state)
        ckpt.wait()
        assert not ckpt.saving() and os.path.isdir(tmp_path / "ck" / "1")
        restored, data = ckpt.restore(jax.tree_util.tree_map(jnp.zeros_like, state))
    finally:
        ckpt.close()
    assert data == {"next_index": 1}
    assert_trees_bitwise_equal(restored, saved)
