"""The paper's analysis half, one study per command (eqs. 19–23 and the first experiments).

    python experiments/phenomena.py --config.study=S      S ∈ trace, temperature, drift, sycophancy, icl, cot_rag,
                                                            continual

Loads `--config.model` (default SmolLM2-135M-Instruct; any path `arlm.load` takes), runs the study
of `arlm.jobs.phenomena`, and writes summary.json and S.png into --config.workdir (default
runs/phenomena/S/). `continual` (eq. 23) trains its own small models instead (fields under
`--config.continual.*`; `--config.size=large` for a GPU). Each summary states the paper's claim and
what the measurement says about it.
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
