"""Every runnable job answers `--help` with exit status 0; the config-file jobs list their fields."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_JOBS = {"pretrain": "--config.train.steps=", "align": "--config.methods=", "phenomena": "--config.study=",
               "pistar": "--config.", "sft": "--config.data.train=", "dpo": "--config.dpo.variant=",
               "reward_model": "--config.data.train="}
OTHER_JOBS = ["chat", "eval_ppl", "generate", "bench_generate", "bench_scaling"]
QUICK = {"pretrain", "chat"}


@pytest.mark.parametrize("job", [pytest.param(j, marks=() if j in QUICK else pytest.mark.slow)
                                 for j in [*CONFIG_JOBS, *OTHER_JOBS]])
def test_help_exits_zero_and_lists_the_options(job):
    proc = subprocess.run([sys.executable, os.path.join(REPO, "experiments", f"{job}.py"), "--help"],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    if job in CONFIG_JOBS:
        assert CONFIG_JOBS[job] in proc.stdout, proc.stdout[-2000:]
        assert "config fields" in proc.stdout
    else:
        assert "--" in proc.stdout
