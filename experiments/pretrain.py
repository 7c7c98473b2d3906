"""Pretrain on the bundled corpus (eq. 7): arlm's main job.

    python experiments/pretrain.py --config experiments/configs/pretrain.py \
        [--config.train.steps=100] [--config.workdir=runs/x]

Writes metrics.jsonl, TensorBoard events, checkpoints, loss_curve.png,
samples.txt and summary.json into the workdir; rerunning with the same
workdir resumes from its last checkpoint.

On your data: `--config.data.train=FILE` (text files, one document per line by default, or
{"text"} / {"messages"} rows in JSONL, JSON, Parquet, …) switches to the user-data job
(`experiments/configs/pretrain_data.py`, `arlm.jobs.finetune`): from scratch with the tokenizer
`--config.data.tokenizer=bytes|bpe|MODEL`, or continuing a loaded model with `--config.model=M`:

    python experiments/pretrain.py --config.data.train=FILE [--config.model=smollm2-135m-instruct]
        [--config.data.max_length=256] [--config.steps=N] [--config.workdir=DIR]

Multi-host: start one copy per process with ARLM_COORDINATOR=host:port (of process 0),
ARLM_NUM_PROCESSES and ARLM_PROCESS_ID set (or --config.distributed.*); every process
must see the same workdir (a shared filesystem for the checkpoints).
"""

import json
import os
import sys

USER_DATA_FLAGS = ("--config.data.train", "--config.model=")


def on_user_data(argv: list[str]) -> bool:
    """Whether the command line asks for the user-data job (and names no config file of its own)."""
    return any(a.startswith(USER_DATA_FLAGS) for a in argv) and not any(
        a == "--config" or a.startswith("--config=") for a in argv)


if __name__ == "__main__" and on_user_data(sys.argv[1:]):
    from _finetune_main import main as _user_data_main

    _user_data_main(__doc__, "pretrain_data")
    raise SystemExit(0)

from absl import app, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arlm import distributed  # noqa: E402
from arlm.jobs.pretrain import run_pretraining  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "pretrain.py"), "job config")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)   # orbax logs every save at INFO
    distributed.initialize(distributed.DistributedConfig.from_env(_CONFIG.value.get("distributed")))
    summary = run_pretraining(_CONFIG.value)
    if not distributed.is_main_process():
        return
    if summary.get("interrupted"):
        print(f"{summary['interrupted']}: checkpoint saved at step {summary['steps']}; rerun to resume")
        return
    keys = ["n_params", "steps", "val_loss_nats_per_token", "unigram_nats_per_token",
            "val_bits_per_byte", "unigram_bits_per_byte", "train_tokens_per_second", "wall_seconds"]
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    print(f"outputs in {os.path.abspath(_CONFIG.value.workdir)}")


if __name__ == "__main__":
    from _help import exit_with_help_if_asked

    exit_with_help_if_asked(__doc__, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                                  "pretrain.py"))
    app.run(main)
