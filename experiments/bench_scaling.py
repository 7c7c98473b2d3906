"""Scaling of one pretraining step over 1, 2, 4 and 8 devices, for data-parallel, FSDP and
tensor-parallel meshes: step time, tokens/s, and the collective bytes per step read from the
compiled HLO (`arlm.hlo.collective_bytes`).

    python experiments/bench_scaling.py [--steps 10] [--cpu_devices 8] [--out runs/bench_scaling]

On a CPU-only machine the devices are forced host devices that share the same cores, so step time
does not fall with more devices there; the collective bytes are what the mesh would send on real
accelerators. On GPUs/TPUs the real devices are used.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cpu_devices", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--out", default="runs/bench_scaling")
    args = ap.parse_args()

    import jax
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)      # CPU backend only
    import numpy as np

    import arlm
    from arlm.hlo import collective_bytes
    from arlm.objectives import make_lm_loss
    from arlm.sharding import MeshConfig, batch_sharding, make_mesh
    from arlm.train.optim import OptimConfig, make_optimizer
    from arlm.train.state import create_train_state
    from arlm.train.step import make_train_step

    config = arlm.ModelConfig.llama(vocab_size=2048, d_model=256, n_layers=4, n_heads=8, n_kv_heads=8, d_ff=1024,
                                    max_seq_len=args.seq_len)
    opt = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=1, total_steps=1000))
    rng = np.random.default_rng(0)
    toks = rng.integers(0, config.vocab_size, (args.batch, args.seq_len + 1)).astype(np.int32)
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
    n_dev = len(jax.devices())
    layouts = {"data": lambda n: MeshConfig(data=n),
               "fsdp": lambda n: MeshConfig(data=1, fsdp=n, param_sharding="fsdp", min_fsdp_size=1),
               "tensor": lambda n: MeshConfig(data=1, tensor=n)}
    rows = []
    for n in (1, 2, 4, 8):
        if n > n_dev:
            break
        for layout, make in layouts.items():
            if n == 1 and layout != "data":
                continue
            mesh_cfg = make(n)
            mesh = make_mesh(mesh_cfg, jax.devices()[:n])
            state, sharding = create_train_state(lambda k: arlm.init_params(config, k), opt, mesh, mesh_cfg, 0)
            step = make_train_step(make_lm_loss(config), opt, sharding, batch_sharding(mesh))
            device_batch = jax.device_put(batch, batch_sharding(mesh))
            hlo = step.lower(state, device_batch).compile().as_text()
            state, m = step(state, device_batch)
            jax.block_until_ready(m)
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                state, m = step(state, device_batch)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            row = {"devices": n, "layout": layout, "step_ms": 1e3 * t,
                   "tokens_per_s": args.batch * args.seq_len / t, **collective_bytes(hlo)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_1"] = r["tokens_per_s"] / base
    os.makedirs(args.out, exist_ok=True)
    info = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind, "model": config.to_dict(),
            "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps, "rows": rows}
    with open(os.path.join(args.out, "bench_scaling.json"), "w") as f:
        json.dump(info, f, indent=2)
    lines = [f"backend {info['backend']} ({info['device_kind']}), batch {args.batch}×{args.seq_len}, "
             f"median of {args.steps} steps", "",
             "| devices | layout | step ms | tokens/s | × vs 1 | all-reduce B | all-gather B | reduce-scatter B |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['devices']} | {r['layout']} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['speedup_vs_1']:.2f} | {r['all-reduce']:,} | {r['all-gather']:,} | {r['reduce-scatter']:,} |"
              for r in rows]
    with open(os.path.join(args.out, "bench_scaling.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    _plot(rows, os.path.join(args.out, "scaling.png"))
    print("\n".join(lines))


def _plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for layout in ("data", "fsdp", "tensor"):
        pts = [r for r in rows if r["layout"] == layout or r["devices"] == 1]
        ax1.plot([r["devices"] for r in pts], [r["tokens_per_s"] for r in pts], "o-", label=layout)
        ax2.plot([r["devices"] for r in pts], [(r["all-reduce"] + r["all-gather"] + r["reduce-scatter"]) / 2**20
                                               for r in pts], "o-", label=layout)
    ax1.set(xlabel="devices", ylabel="tokens/s", xscale="log", title="Throughput")
    ax2.set(xlabel="devices", ylabel="collective MiB per step", xscale="log", title="Collectives (from HLO)")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
