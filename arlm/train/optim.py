"""The optimizer: AdamW with linear warmup then cosine decay, and global-norm clipping.

Weight decay applies where `arlm.model.partitioning.decay_mask` says: the weights whose declared
logical axes touch the residual stream (embeddings, projections, experts), not norms or biases.
"""

from __future__ import annotations

import dataclasses

import optax

from arlm.model.partitioning import decay_mask


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW settings, and the number of micro-batches per update.

    grad_accum: `make_train_step` splits each batch into this many micro-batches and averages
      their gradients, weighted by each micro-batch's token count (`metrics["tokens"]`) when the
      loss reports one, so one update equals one pass over the whole batch
      (`arlm.train.step.accumulate_gradients`). The optimizer itself does not read it.
    """

    learning_rate: float = 3e-3
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.learning_rate <= 0 or self.total_steps <= 0 or self.grad_accum <= 0:
            raise ValueError("learning_rate, total_steps and grad_accum must be > 0")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total_steps={self.total_steps}]")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine decay to min_lr_ratio × peak."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio)



def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
