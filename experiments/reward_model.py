"""A Bradley–Terry reward model (eq. 11) on your preference pairs: r_φ(x, y) is a scalar head on the
start model's last hidden state, trained so that r_φ(x, chosen) > r_φ(x, rejected).

    python experiments/reward_model.py --config.model=M --config.data.train=PAIRS [--config.data.eval=PAIRS]
        [--config.steps=N] [--config.workdir=DIR]

summary.json reports the held-out pair accuracy and loss before and after; DIR/reward_model/ holds
backbone/ (Hugging Face format) and head.safetensors (`arlm.jobs.finetune.load_reward_model`).
"""

from _finetune_main import main

if __name__ == "__main__":
    main(__doc__, "reward_model")
