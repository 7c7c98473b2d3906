"""One process of the multi-host pretraining job test (tests/test_multihost.py): the main job
(`run_pretraining`) on the tiny config, with the process layout from the ARLM_* variables.

    python tests/_multihost_job.py WORKDIR STEPS LOG_EVERY
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from arlm import distributed  # noqa: E402

distributed.initialize()

from arlm.jobs.pretrain import run_pretraining  # noqa: E402
from tests._tiny_job import tiny_job_config  # noqa: E402

workdir, steps, log_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = tiny_job_config(workdir, train=dict(steps=steps, eval_every=max(steps // 2, 1), log_every=log_every,
                                        checkpoint_every=1000, keep_checkpoints=2),
                    sample=dict(max_new_tokens=8))
c.mesh.update(dict(data=4, fsdp=2, param_sharding="fsdp", min_fsdp_size=1))
summary = run_pretraining(c)
print("summary", summary.get("interrupted"), summary["steps"], flush=True)
