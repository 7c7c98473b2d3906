"""Multi-host (issue 6): 2 processes on localhost (CPU, 4 forced devices each, gloo collectives) train
a few steps through `jax.distributed`, each loading only its half of every batch, and get the same
losses and params as one process with 8 devices; so does the main job (`run_pretraining`), which
also stops every process together when only one of them receives SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multihost_worker.py")
JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multihost_job.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**arlm):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARLM_")}
    env.pop("XLA_FLAGS", None)
    env["JAX_PLATFORMS"] = "cpu"
    env.update({f"ARLM_{k.upper()}": str(v) for k, v in arlm.items()})
    return env


def _run_two_and_one(tmp_path, *args):
    single = tmp_path / "single.npz"
    subprocess.run([sys.executable, WORKER, str(single), *args], env=_env(local_devices=8), check=True,
                   timeout=300, capture_output=True)
    port = _free_port()
    multi = tmp_path / "multi.npz"
    procs = [subprocess.Popen([sys.executable, WORKER, str(multi), *args],
                              env=_env(coordinator=f"localhost:{port}", num_processes=2, process_id=i,
                                       local_devices=4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return np.load(single), np.load(multi)


@pytest.mark.slow
def test_two_processes_run_alignment_updates_like_one(tmp_path):
    """The alignment `Trainer` (π_ref frozen and sharded, dp2 × fsdp2 × tp2) over 2 processes that each
    hold the same host batch, for GRPO and for DPO (one launch runs both): the same losses and params
    as one process, to float32 rounding."""
    a, b = _run_two_and_one(tmp_path, "2", "grpo,dpo")
    assert int(a["processes"]) == 1 and int(b["processes"]) == 2
    for method in ("grpo", "dpo"):
        np.testing.assert_allclose(b[f"{method}:losses"], a[f"{method}:losses"], rtol=1e-6, atol=1e-7)
        keys = [k for k in a.files if k.startswith(f"{method}:[")]
        assert keys and set(keys) == {k for k in b.files if k.startswith(f"{method}:[")}
        for k in keys:
            np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    a, b = _run_two_and_one(tmp_path)
    assert int(a["processes"]) == 1 and int(b["processes"]) == 2
    assert int(a["devices"]) == int(b["devices"]) == 8
    # Same mesh (data 4 × fsdp 2), same global batches, same reduction layout: equal to float32 rounding.
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-6)
    keys = [k for k in a.files if k.startswith("[")]
    assert keys and set(keys) == {k for k in b.files if k.startswith("[")}
    for k in keys:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)


def _start_job(workdir, steps, log_every, processes):
    """The main job in `processes` processes (8 devices in all); returns the Popen objects."""
    if processes == 1:
        envs = [_env(local_devices=8)]
    else:
        port = _free_port()
        envs = [_env(coordinator=f"localhost:{port}", num_processes=processes, process_id=i,
                     local_devices=8 // processes) for i in range(processes)]
    return [subprocess.Popen([sys.executable, JOB, str(workdir), str(steps), str(log_every)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for env in envs]


def _finish(procs, timeout=400):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs


def _records(workdir, split):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def _checkpoint_params(workdir):
    import jax
    import orbax.checkpoint as ocp
    one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])    # saved on devices of 2 processes
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data"),
                               item_handlers=handlers) as manager:
        step = manager.latest_step()
        target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one_device),
                                        manager.item_metadata(step)["state"])
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
    return step, jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.asarray, restored["state"]["params"]))


@pytest.mark.slow
def test_two_process_pretraining_job_matches_one_process(tmp_path):
    """`run_pretraining` over 2 processes: same train and validation losses and final checkpoint as
    1 process with the same 8-device mesh; only process 0 writes metrics, samples and the summary."""
    one, two = tmp_path / "one", tmp_path / "two"
    _finish(_start_job(one, 12, 1, 1))
    _finish(_start_job(two, 12, 1, 2))
    for split in ("train", "val"):
        a, b = _records(one, split), _records(two, split)
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    step_a, params_a = _checkpoint_params(one)
    step_b, params_b = _checkpoint_params(two)
    assert step_a == step_b == 12
    for x, y in zip(params_a, params_b):
        np.testing.assert_allclose(y, x, rtol=0, atol=1e-6)
    summary = json.load(open(two / "summary.json"))
    assert summary["processes"] == 2 and len(summary["devices"]) == 8
    assert (two / "samples.txt").exists() and (two / "loss_curve.png").exists()
    np.testing.assert_allclose(summary["val_loss_nats_per_token"],
                               json.load(open(one / "summary.json"))["val_loss_nats_per_token"], rtol=1e-6)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step_and_resumes(tmp_path):
    steps, log_every = 150, 5
    procs = _start_job(tmp_path, steps, log_every, 2)
    t0 = time.time()
    while len(_records(tmp_path, "train")) < 3:                  # process 0 logs steps 1, 5, 10, …
        assert all(p.poll() is None for p in procs), _finish(procs)
        assert time.time() - t0 < 300, "timed out waiting for the job"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)                         # only process 1 is told
    outs = _finish(procs, timeout=120)
    stopped = [int(o.rsplit("summary", 1)[1].split()[-1]) for o in outs]
    assert stopped[0] == stopped[1] < steps and stopped[0] % log_every == 0, outs
    summary = json.load(open(tmp_path / "summary.json"))        # written by process 0
    assert summary["interrupted"] == "signal on another process" and summary["steps"] == stopped[0]
    assert "SIGTERM" in outs[1].rsplit("summary", 1)[1]
    assert _checkpoint_params(tmp_path)[0] == stopped[0]
    _finish(_start_job(tmp_path, steps, log_every, 2))          # rerun: resumes and finishes
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["resumed_from"] == stopped[0] and summary["steps"] == steps
