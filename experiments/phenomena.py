"""The paper's analysis half, one study per command (eqs. 19–23, its first experiments, next checks
and open questions).

    python experiments/phenomena.py --config.study=S [--config.size=large]

S reads a loaded model: trace, temperature, drift, sycophancy, icl, cot_rag. It loads `--config.model`
(default SmolLM2-135M-Instruct; any path `arlm.load` takes).
S trains its own models (fields under `--config.S.*`): continual (eq. 23), alignment_drift (next
check 2: the align job per seed, then Hall(θ), error recovery and J_L(t, s) of every policy),
sycophancy_frontier (open question 3), icl_emergence (open question 4), contractive (open question 1).

Each writes summary.json and S.png into --config.workdir (default runs/phenomena/S/), stating the
paper's claim and what the measurement says about it; `--config.size=large` is the GPU version.
"""

import os
import sys

from absl import app
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arlm.jobs.phenomena import run_study  # noqa: E402


def _items_alias(argv: list[str]) -> list[str]:
    """--config.items=FILE is --config.item_file=FILE (a ConfigDict cannot hold a field named `items`)."""
    return [a.replace("--config.items=", "--config.item_file=", 1) if a.startswith("--config.items=") else a
            for a in argv]


sys.argv = _items_alias(sys.argv)          # before the flag is defined: config_flags reads argv then
_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "phenomena.py"), "study config")


def main(argv):
    del argv
    run_study(_CONFIG.value)


if __name__ == "__main__":
    from _help import exit_with_help_if_asked

    exit_with_help_if_asked(__doc__, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                                  "phenomena.py"))
    app.run(main)
