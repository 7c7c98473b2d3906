"""Long-run safety (issue 6): SIGTERM/SIGINT save a checkpoint and exit cleanly; a run killed with
SIGKILL in the middle of a save resumes from the last complete checkpoint; in both cases the
finished run equals an uninterrupted one bit for bit. The job runs in a subprocess."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from arlm.train.metrics import read_metrics
from tests._tiny_job import REPO

STEPS = 200
SCRIPT = """
import sys
sys.path.insert(0, {repo!r})
from tests._tiny_job import tiny_job_config
from arlm.jobs.pretrain import run_pretraining
c = tiny_job_config(sys.argv[1], train=dict(steps={steps}, eval_every=1000, log_every=1,
                                            checkpoint_every=int(sys.argv[2]), keep_checkpoints=3),
                    sample=dict(max_new_tokens=8))
c.mesh.data = 1
run_pretraining(c)
"""


def _start(workdir, checkpoint_every):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    code = SCRIPT.format(repo=str(REPO), steps=STEPS)
    return subprocess.Popen([sys.executable, "-c", code, str(workdir), str(checkpoint_every)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _train_records(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    return [r for r in read_metrics(path) if r["split"] == "train"] if os.path.exists(path) else []


def _wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"job ended early (rc {proc.returncode}):\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the job")
        time.sleep(0.02)


def _final_params(workdir):
    """The params of the last checkpoint, as numpy (orbax restore without a target)."""
    import orbax.checkpoint as ocp
    directory = os.path.join(workdir, "checkpoints")
    with ocp.CheckpointManager(directory, item_names=("state", "data")) as manager:
        step = manager.latest_step()
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    return step, jax.tree_util.tree_map(np.asarray, restored["state"]["params"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("uninterrupted")
    proc = _start(workdir, 1000)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return _final_params(workdir)


def _assert_same(workdir, uninterrupted):
    step, params = _final_params(workdir)
    ref_step, ref_params = uninterrupted
    assert step == ref_step == STEPS
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_array_equal(a, b)
    losses = [r["loss"] for r in _train_records(workdir)]
    assert len(losses) == STEPS and [r["step"] for r in _train_records(workdir)] == list(range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_exits_then_resumes(tmp_path, uninterrupted, signum):
    proc = _start(tmp_path, 1000)                        # no periodic checkpoint: only the signal's
    _wait_for(lambda: len(_train_records(tmp_path)) >= 5, proc)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["interrupted"] == signal.Signals(signum).name
    stopped = summary["steps"]
    assert 5 <= stopped < STEPS
    assert _final_params(tmp_path)[0] == stopped         # the checkpoint is the state it stopped at
    proc = _start(tmp_path, 1000)                        # rerun: resumes and finishes
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert json.load(open(tmp_path / "summary.json"))["resumed_from"] == stopped
    _assert_same(tmp_path, uninterrupted)


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_last_complete_checkpoint(tmp_path, uninterrupted):
    proc = _start(tmp_path, 1)                            # an asynchronous save after every step
    tmp_glob = os.path.join(tmp_path, "checkpoints", "*tmp*")
    _wait_for(lambda: len(_train_records(tmp_path)) >= 20 and glob.glob(tmp_glob), proc)
    complete = [int(os.path.basename(d)) for d in glob.glob(os.path.join(tmp_path, "checkpoints", "*"))
                if os.path.basename(d).isdigit()]
    proc.send_signal(signal.SIGKILL)                      # while a checkpoint is being written
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = glob.glob(tmp_glob)
    proc = _start(tmp_path, 1)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    resumed = json.load(open(tmp_path / "summary.json"))["resumed_from"]
    assert complete and resumed is not None and max(complete) <= resumed <= 20 + 5
    _assert_same(tmp_path, uninterrupted)
    print(f"killed with {len(partial)} partial checkpoint dir(s) on disk; resumed from step {resumed}")
