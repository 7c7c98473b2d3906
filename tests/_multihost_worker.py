"""One process of the 2-process localhost test (tests/test_multihost.py), or the 1-process reference.

    python tests/_multihost_worker.py OUT.npz [STEPS] [pretrain|grpo|dpo|grpo,dpo]   (layout from ARLM_* variables)

pretrain: the tiny model for STEPS steps on a data × fsdp mesh over all devices of all processes;
each process loads only its rows of every batch. grpo / dpo (or both, comma-separated): STEPS
alignment `Trainer` updates on a data × fsdp × tensor mesh, every process holding the same host
batch (as rollouts gathered to every process are), keys prefixed "grpo:" / "dpo:". Process 0 writes
the losses and final params.
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
mode = sys.argv[3] if len(sys.argv) > 3 else "pretrain"
config = arlm.ModelConfig.llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                max_seq_len=16)
tokens = np.random.default_rng(0).integers(0, 64, 20_000).astype(np.int32)

if mode != "pretrain":
    import optax

    from arlm.alignment import Trainer
    from arlm.model.log_probs import sequence_batch
    from arlm.objectives import DPO, GRPO, KLObjective, KLRegularizer, Policy

    def sequences(rng, b, p=5, n=6):
        prompt = rng.integers(1, 64, (b, p)).astype(np.int32)
        start = rng.integers(0, p, b).astype(np.int32)
        prompt[np.arange(p)[None, :] < start[:, None]] = 0
        return sequence_batch(prompt, start, rng.integers(1, 64, (b, n)).astype(np.int32),
                              rng.integers(1, n + 1, b).astype(np.int32))

    results = {}
    for method in mode.split(","):                 # e.g. "grpo,dpo": both in one launch
        rng = np.random.default_rng(1)
        if method == "grpo":
            estimator, kl = GRPO(group_size=4), KLRegularizer(0.1, "k3")
            batch = dict(sequences(rng, 16), rewards=rng.normal(size=16).astype(np.float32))
        else:
            estimator, kl = DPO(), KLRegularizer(0.1, "k1")
            a, b = sequences(rng, 16), sequences(rng, 16)
            batch = {k: np.stack([a[k], b[k]], 1) for k in a}
        mesh_cfg = MeshConfig(data=2, fsdp=2, tensor=2, param_sharding="fsdp", min_fsdp_size=1)
        trainer = Trainer(KLObjective(Policy(config), kl, estimator),
                          arlm.init_params(config, jax.random.PRNGKey(3)), optax.sgd(0.1, momentum=0.9),
                          mesh=make_mesh(mesh_cfg), mesh_cfg=mesh_cfg, seed=0)
        losses = [trainer.update(batch)["loss"] for _ in range(steps)]
        params = distributed.gather(trainer.state.params)
        results[f"{method}:losses"] = np.asarray(losses)
        results.update({f"{method}:{jax.tree_util.keystr(p)}": np.asarray(v)
                        for p, v in jax.tree_util.tree_flatten_with_path(params)[0]})
    if jax.process_index() == 0:
        np.savez(out_path, processes=jax.process_count(), devices=jax.device_count(), **results)
    sys.exit(0)

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
