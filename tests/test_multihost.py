"""Multi-host (issue 6): 2 processes on localhost (CPU, 4 forced devices each, gloo collectives) train
a few steps through `jax.distributed`, each loading only its half of every batch, and get the same
losses and params as one process with 8 devices."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_multihost_worker.py")


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


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    single = tmp_path / "single.npz"
    subprocess.run([sys.executable, WORKER, str(single)], env=_env(local_devices=8), check=True, timeout=300,
                   capture_output=True)
    port = _free_port()
    multi = tmp_path / "multi.npz"
    procs = [subprocess.Popen([sys.executable, WORKER, str(multi)],
                              env=_env(coordinator=f"localhost:{port}", num_processes=2, process_id=i,
                                       local_devices=4),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    a, b = np.load(single), np.load(multi)
    assert int(a["processes"]) == 1 and int(b["processes"]) == 2
    assert int(a["devices"]) == int(b["devices"]) == 8
    # Same mesh (data 4 × fsdp 2), same global batches, same reduction layout: equal to float32 rounding.
    np.testing.assert_allclose(b["losses"], a["losses"], rtol=1e-6)
    keys = [k for k in a.files if k.startswith("[")]
    assert keys and set(keys) == {k for k in b.files if k.startswith("[")}
    for k in keys:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=1e-6, err_msg=k)
