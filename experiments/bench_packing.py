"""Benchmark: SFT train-step throughput with and without packing, on examples of mixed lengths.

    python experiments/bench_packing.py [--examples 512] [--max-length 256] [--batch 8] [--steps 6]
        [--repeats 3] [--d-model 128] [--layers 4] [--out runs/bench_packing]

The same examples (prompt–completion rows whose lengths spread log-uniformly from 8 to max-length
bytes, byte tokenizer) are laid out two ways: padded (one example per row) and packed
(best-fit-decreasing, segment ids), rows of max-length tokens. Each way runs the same compiled
SFT step of `arlm.jobs.finetune`'s method (eq. 8 through the generic train step); reported are the
padding fraction of the rows, real (non-pad) tokens per second and examples per second, medians
over interleaved repeats in one process, and their ratio. Writes bench_packing.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
import optax


def mixed_rows(n: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """Prompt–completion rows whose total byte lengths are log-uniform in [8, max_length - 1]."""
    rng = np.random.default_rng(seed)
    totals = np.exp(rng.uniform(np.log(8), np.log(max_length - 1), n)).astype(int)
    rows = []
    for total in totals:
        p = max(1, int(total * rng.uniform(0.2, 0.8)))
        text = "".join(rng.choice(list("abcdefghij klmnop"), int(total)))
        rows.append({"prompt": text[:p], "completion": text[p:] or "x"})
    return rows


def measure(*, examples: int = 512, max_length: int = 256, batch: int = 8, steps: int = 6, repeats: int = 3,
            d_model: int = 128, layers: int = 4) -> dict:
    import arlm
    from arlm.alignment import methods
    from arlm.data.loader import SequenceRows, fixed_batches
    from arlm.data.rows import read_rows
    from arlm.data.store import build_store
    from arlm.data.tokenize import TextCodec, TokenizeConfig
    from arlm.data.tokenizers import ByteTokenizer
    from arlm.sharding import MeshConfig, batch_sharding, make_mesh, named
    from arlm.model.partitioning import param_specs
    from arlm.train.state import state_from_params
    from arlm.train.step import make_train_step

    store = build_store(read_rows(mixed_rows(examples, max_length)), TextCodec.of(ByteTokenizer()), "sequences",
                        TokenizeConfig(max_length=max_length))
    config = arlm.ModelConfig.llama(vocab_size=257, d_model=d_model, n_layers=layers, n_heads=4, n_kv_heads=2,
                                    d_ff=4 * d_model, max_seq_len=max_length)
    objective = methods.make_objective("sft", config, 0.0)
    ref = arlm.init_params(config, jax.random.PRNGKey(0))
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    frozen_sharding = named(mesh, param_specs({"ref": ref}, mesh, MeshConfig()))
    frozen = jax.device_put({"ref": ref}, frozen_sharding)
    optimizer = optax.adamw(1e-3)
    results = {}
    layouts = {name: SequenceRows(store, max_length, pack=name == "packed") for name in ("padded", "packed")}
    # `steps` batches spread evenly over each layout's whole epoch (packed rows come fullest first)
    batches = {}
    for name, rows in layouts.items():
        every = fixed_batches(rows, batch)
        batches[name] = [every[int(k * len(every) / steps)] for k in range(steps)]
    times: dict[str, list[float]] = {name: [] for name in layouts}
    state, sharding = state_from_params(objective.init_params(ref, jax.random.PRNGKey(1)), optimizer, mesh,
                                        MeshConfig(), 0)
    step = make_train_step(objective.loss, optimizer, sharding, batch_sharding(mesh), frozen_sharding=frozen_sharding)
    for name in layouts:                                          # compile (same shapes: one program) and warm up
        state, m = step(state, batches[name][0], frozen)
        jax.block_until_ready(m)
    for _ in range(repeats):
        for name in layouts:
            t0 = time.perf_counter()
            for k in range(steps):
                state, m = step(state, batches[name][k], frozen)
            jax.block_until_ready(m)
            times[name].append((time.perf_counter() - t0) / steps)
    for name, rows in layouts.items():
        per_step = statistics.median(times[name])
        real = np.mean([b["attention"].sum() for b in batches[name]])
        examples_per_batch = np.mean([b["segment_ids"].max(axis=1).sum() for b in batches[name]])
        results[name] = {"rows": len(rows), "padding_fraction": rows.padding_fraction, "step_seconds": per_step,
                         "real_tokens_per_second": float(real / per_step),
                         "examples_per_second": float(examples_per_batch / per_step)}
    results["packed_over_padded_tokens_per_second"] = (results["packed"]["real_tokens_per_second"] /
                                                       results["padded"]["real_tokens_per_second"])
    results["setup"] = {"examples": examples, "max_length": max_length, "batch": batch, "steps": steps,
                        "repeats": repeats, "d_model": d_model, "layers": layers,
                        "load_average": list(os.getloadavg()), "device": str(jax.devices()[0])}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="runs/bench_packing")
    a = ap.parse_args()
    r = measure(examples=a.examples, max_length=a.max_length, batch=a.batch, steps=a.steps, repeats=a.repeats,
                d_model=a.d_model, layers=a.layers)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_packing.json"), "w") as f:
        json.dump(r, f, indent=2)
    lines = ["| layout | rows | padding | step s | real tokens/s | examples/s |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("padded", "packed"):
        x = r[name]
        lines.append(f"| {name} | {x['rows']} | {x['padding_fraction']:.1%} | {x['step_seconds']:.3f} | "
                     f"{x['real_tokens_per_second']:.0f} | {x['examples_per_second']:.1f} |")
    lines.append(f"\npacked ÷ padded, real tokens/s: {r['packed_over_padded_tokens_per_second']:.2f}× "
                 f"(load average {r['setup']['load_average'][0]:.2f})")
    with open(os.path.join(a.out, "bench_packing.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
