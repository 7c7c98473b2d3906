"""The shared command line of the jobs that train on your data (sft.py, dpo.py, reward_model.py, and
pretrain.py with --config.data.train): `--help` lists every field; the summary is printed at the end."""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("steps", "tokens", "eval_loss_before", "eval_loss_after", "eval_accuracy_before", "eval_accuracy_after",
        "eval_match_rate_before", "eval_match_rate_after", "rows_skipped", "saved", "wall_seconds")


def main(doc: str, config_name: str) -> None:
    """Run the job of experiments/configs/<config_name>.py with the command line's overrides."""
    from _help import exit_with_help_if_asked

    config_path = os.path.join(HERE, "configs", f"{config_name}.py")
    exit_with_help_if_asked(doc, config_path)
    from absl import app, flags, logging
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", config_path, "job config")

    def run(argv):
        del argv
        logging.set_verbosity(logging.WARNING)     # orbax logs every save at INFO
        from arlm import distributed
        from arlm.jobs.finetune import run as run_job

        distributed.initialize(distributed.DistributedConfig.from_env(None))
        summary = run_job(config.value)
        if not distributed.is_main_process():
            return
        if summary.get("interrupted"):
            print(f"{summary['interrupted']}: checkpoint saved at step {summary['steps']}; rerun to resume")
            return
        print(json.dumps({k: summary[k] for k in KEYS if k in summary}, indent=2, default=float))
        print(f"outputs in {os.path.abspath(config.value.workdir)}")

    del flags
    app.run(run, argv=sys.argv)
