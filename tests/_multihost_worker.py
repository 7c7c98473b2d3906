"""One process of the 2-process localhost test (tests/test_multihost.py), or the 1-process reference.

    python tests/_multihost_worker.py OUT.npz [STEPS]     (process layout from ARLM_* variables)

Pretrains the tiny model for STEPS steps on a data × fsdp mesh over all devices of all processes;
each process loads only its rows of every batch. Process 0 writes the losses and final params.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arlm import distributed  # noqa: E402

distributed.initialize()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import arlm  # noqa: E402
from arlm.data import pipeline  # noqa: E402
from arlm.objectives import make_lm_loss  # noqa: E402
from arlm.sharding import MeshConfig, batch_sharding, make_mesh  # noqa: E402
from arlm.train.optim import OptimConfig, make_optimizer  # noqa: E402
from arlm.train.state import create_train_state  # noqa: E402
from arlm.train.step import make_train_step  # noqa: E402

out_path = sys.argv[1]
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
config = arlm.ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=16)
tokens = np.random.default_rng(0).integers(0, 64, 20_000).astype(np.int32)
mesh_cfg = MeshConfig(data=4, fsdp=2, param_sharding="fsdp", min_fsdp_size=1)
mesh = make_mesh(mesh_cfg)
opt = make_optimizer(OptimConfig(learning_rate=1e-2, warmup_steps=1, total_steps=steps))
state, sharding = create_train_state(lambda k: arlm.init_params(config, k), opt, mesh, mesh_cfg, seed=0)
data_sharding = batch_sharding(mesh)
step = make_train_step(make_lm_loss(config), opt, sharding, data_sharding)
batches = pipeline.make_train_iterator(tokens, 16, 16, seed=0, process_index=jax.process_index(),
                                       process_count=jax.process_count())
losses = []
for _ in range(steps):
    local = next(batches)
    assert local["inputs"].shape[0] == 16 // jax.process_count()
    state, metrics = step(state, distributed.put_batch(local, data_sharding))
    losses.append(float(metrics["loss"]))
params = distributed.gather(state.params)
if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    np.savez(out_path, losses=np.asarray(losses), processes=jax.process_count(), devices=jax.device_count(), **flat)
