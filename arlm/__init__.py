"""arlm: LLMs as high-dimensional nonlinear autoregressive models with attention (arXiv 2602.00426)."""
from arlm.config import ModelConfig
from arlm.model import ModelOutput, apply_model, count_params, embed_tokens, forward, init_params

__all__ = ["ModelConfig", "ModelOutput", "apply_model", "count_params", "embed_tokens", "forward",
           "init_params"]
from arlm.checkpoints import LoadedModel, load, save_hf

__all__ += ["LoadedModel", "load", "save_hf"]
from arlm.inference import GenerateOutput, Sampler, generate
from arlm.inference.perplexity import WindowedNLL, windowed_nll

__all__ += ["GenerateOutput", "Sampler", "WindowedNLL", "generate", "windowed_nll"]
