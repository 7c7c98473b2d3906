"""DPO (eq. 13) on your preference pairs; π_ref is the start model.

    python experiments/dpo.py --config.model=M --config.data.train=PAIRS [--config.data.eval=PAIRS]
        [--config.dpo.variant=sigmoid|ipo|hinge|robust] [--config.beta=0.1] [--config.lora.rank=R]
        [--config.steps=N] [--config.workdir=DIR]

PAIRS rows are TRL's preference format: {"prompt", "chosen", "rejected"} as strings or message lists,
or {"chosen", "rejected"} whose shared prefix is the prompt. summary.json reports the held-out DPO
loss, preference accuracy (implicit reward of chosen above rejected) and the log-ratio margin,
before and after; the model is saved under DIR/model/ (and DIR/adapter/ with LoRA).
"""

from _finetune_main import main

if __name__ == "__main__":
    main(__doc__, "dpo")
