"""RLHF, DPO, RSFT and RLVR on one verifiable task, from one starting model (eqs. 9–15).

    python experiments/align.py [--config experiments/configs/align.py] \
        [--config.iterations=30] [--config.methods='("dpo","rlvr_grpo")'] [--config.workdir=runs/x]
    python experiments/align.py --config experiments/configs/align_smollm2.py     # bigger machines

Writes metrics.jsonl, reward_vs_step.png, kl_vs_step.png, frontier.png, samples.txt and
summary.json (verifier success before and after each method, and its KL to π_ref).
"""

import json
import os
import sys

from absl import app, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arlm.jobs.align import run_alignment  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "align.py"), "job config")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    summary = run_alignment(_CONFIG.value)
    print(json.dumps(summary, indent=2))
    print(f"outputs in {os.path.abspath(_CONFIG.value.workdir)}")


if __name__ == "__main__":
    from _help import exit_with_help_if_asked

    exit_with_help_if_asked(__doc__, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                                  "align.py"))
    app.run(main)
