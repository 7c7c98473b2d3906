"""Figures of an alignment run: reward and KL against step for every method on one figure each,
and the reward–KL frontier (each method's trajectory in the (KL, success) plane)."""

from __future__ import annotations

import os
from collections import defaultdict

from arlm.train.metrics import read_metrics


def _series(records: list[dict], key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if key in r:
            out[r["split"]].append((r["step"], r[key]))
    return {m: sorted(v) for m, v in out.items()}


def plot_alignment(metrics_path: str, outdir: str) -> list[str]:
    """Write reward_vs_step.png, kl_vs_step.png and frontier.png; return their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    sampled, greedy, kl = (_series(records, k) for k in ("success_sampled", "success_greedy", "kl"))
    colors = {m: f"C{i}" for i, m in enumerate(sampled)}
    paths = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for m, pts in sampled.items():
        ax.plot(*zip(*pts), "o-", color=colors[m], markersize=3, label=f"{m} (τ = 1)")
        if m in greedy:
            ax.plot(*zip(*greedy[m]), "--", color=colors[m], alpha=0.6, label=f"{m} (greedy)")
    ax.set(xlabel="iteration", ylabel="verifier success on held-out problems",
           title="Reward against step (eq. 9's E[r])")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    paths.append(_save(fig, plt, os.path.join(outdir, "reward_vs_step.png")))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, pts in kl.items():
        ax.plot(*zip(*pts), "o-", color=colors.get(m), markersize=3, label=m)
    ax.set(xlabel="iteration", ylabel="KL(π_θ ‖ π_ref) (nats per response)", title="KL against step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, plt, os.path.join(outdir, "kl_vs_step.png")))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in sampled:
        steps_kl = dict(kl.get(m, []))
        pts = [(steps_kl[s], r) for s, r in sampled[m] if s in steps_kl]
        if pts:
            ax.plot(*zip(*pts), "-", color=colors[m], alpha=0.5)
            ax.plot(*pts[-1], "o", color=colors[m], label=m)
    ax.set(xlabel="KL(π_θ ‖ π_ref)", ylabel="verifier success (τ = 1)",
           title="Reward–KL frontier (trajectories; dots = final policies)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(fig, plt, os.path.join(outdir, "frontier.png")))
    return paths


def _save(fig, plt, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
