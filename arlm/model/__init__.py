"""The model, eqs. 1–6."""
from arlm.model.transformer import (ModelOutput, apply_model, count_params, embed_tokens, forward,
                                    init_params)

__all__ = ["ModelOutput", "apply_model", "count_params", "embed_tokens", "forward", "init_params"]
