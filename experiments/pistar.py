"""The unification made visible (eqs. 9–10): PPO, GRPO, RLOO, DPO and RSFT each move π_θ toward
π* ∝ π_ref exp(r/β), on a problem small enough to compute π*, KL(π_θ ‖ π*) and J exactly.

    python experiments/pistar.py [--config.iterations=150] [--config.workdir=runs/pistar]

Writes pistar.png (KL(π_θ ‖ π*) and J against iteration, every method), history.json, summary.json.
"""

import dataclasses
import json
import os
import sys

from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arlm.jobs import pistar  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "pistar.py"), "job config")


def plot(histories: dict, beta: float, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (m, h) in enumerate(histories.items()):
        ax1.plot(h["kl_to_optimum"], color=f"C{i}", label=m)
        ax2.plot(h["objective"], color=f"C{i}", label=m)
    j_star = next(iter(histories.values()))["optimum_objective"][0]
    ax2.axhline(j_star, color="k", linestyle="--", label="J(π*) = β log Z")
    ax1.set(xlabel="iteration", ylabel="KL(π_θ ‖ π*) (nats)", yscale="log",
            title="Distance to the closed-form optimum π* (eq. 10)")
    ax2.set(xlabel="iteration", ylabel="J(π_θ) (eq. 9, exact)", title=f"Objective, β = {beta}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv):
    del argv
    c = _CONFIG.value
    os.makedirs(c.workdir, exist_ok=True)
    problem = pistar.Problem(vocab=c.vocab, length=c.length, n_prompts=c.n_prompts, beta=c.beta)
    histories, summary = {}, {}
    for m in c.methods:
        run_cfg = dataclasses.replace(pistar.DEFAULT_RUNS[m], iterations=c.iterations, seed=c.seed)
        h = pistar.run(m, problem, run_cfg, progress=True)
        histories[m] = h
        kl = h["kl_to_optimum"]
        summary[m] = {"kl_start": kl[0], "kl_final": kl[-1], "kl_min": min(kl), "kl_final_over_start": kl[-1] / kl[0],
                      "J_start": h["objective"][0], "J_final": h["objective"][-1],
                      "J_optimum": h["optimum_objective"][0]}
        print(f"{m:>18}: KL(π‖π*) {kl[0]:.3f} → {kl[-1]:.3f} (min {min(kl):.3f}); "
              f"J {h['objective'][0]:.3f} → {h['objective'][-1]:.3f} (J* = {h['optimum_objective'][0]:.3f})")
    plot(histories, c.beta, os.path.join(c.workdir, "pistar.png"))
    with open(os.path.join(c.workdir, "history.json"), "w") as f:
        json.dump(histories, f)
    with open(os.path.join(c.workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"outputs in {os.path.abspath(c.workdir)}")


if __name__ == "__main__":
    from _help import exit_with_help_if_asked

    exit_with_help_if_asked(__doc__, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                                  "pistar.py"))
    app.run(main)
