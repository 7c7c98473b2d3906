"""Default config of `experiments/dpo.py` (the dpo job of `arlm.jobs.finetune`): every field
can be overridden on the command line, e.g. `--config.data.train=my.jsonl --config.steps=200`."""

from arlm.jobs.finetune import default_config


def get_config():
    return default_config("dpo")
