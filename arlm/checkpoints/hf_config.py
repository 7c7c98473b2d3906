"""Hugging Face `config.json` ⇄ `ModelConfig`, for every family arlm loads.

Each family is the Llama (or GPT-2) map plus a few `ModelConfig` options:

| model_type    | class              | options beyond Llama                                             |
|---------------|--------------------|------------------------------------------------------------------|
| llama         | LlamaForCausalLM   | — (Llama 3.1/3.2: rope_scaling ("llama3", …))                    |
| mistral       | MistralForCausalLM | sliding_window on every layer                                    |
| qwen2         | Qwen2ForCausalLM   | qkv_bias                                                         |
| qwen3         | Qwen3ForCausalLM   | qk_norm, head_dim                                                |
| gemma2        | Gemma2ForCausalLM  | geglu, sandwich_norm, scale_embeddings, attn_scale_dim,          |
|               |                    | attn/logit soft-caps, sliding_window + global_every=2            |
| gemma3_text   | Gemma3ForCausalLM  | Gemma 2 + qk_norm, global_every=6, rope_local_theta, no caps     |
|               |                    | (linear rope_scaling of the global layers on the larger sizes)   |
| phi3          | Phi3ForCausalLM    | fused qkv / gate_up tensors (layout only), sliding_window        |
| gpt2          | GPT2LMHeadModel    | the GPT-2 base                                                   |

Every value is checked for type and range with the file and field named, so a
malformed config.json is a `CheckpointFormatError`, never a KeyError or a
ZeroDivisionError deep inside. Writing is checked the other way: a ModelConfig
is written as a family only if reading that config back gives the same model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from arlm.checkpoints.layout import (GEMMA_LAYOUT, LLAMA_LAYOUT, PHI3_LAYOUT, CheckpointFormatError,
                                     LlamaLayout)
from arlm.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face model family: its causal-LM class and tensor layout (None: GPT-2's own)."""

    model_type: str
    architecture: str
    layout: LlamaLayout | None


FAMILIES = {f.model_type: f for f in (
    Family("llama", "LlamaForCausalLM", LLAMA_LAYOUT),
    Family("mistral", "MistralForCausalLM", LLAMA_LAYOUT),
    Family("qwen2", "Qwen2ForCausalLM", LLAMA_LAYOUT),
    Family("qwen3", "Qwen3ForCausalLM", LLAMA_LAYOUT),
    Family("gemma2", "Gemma2ForCausalLM", GEMMA_LAYOUT),
    Family("gemma3_text", "Gemma3ForCausalLM", GEMMA_LAYOUT),
    Family("phi3", "Phi3ForCausalLM", PHI3_LAYOUT),
    Family("gpt2", "GPT2LMHeadModel", None),
)}
SUPPORTED_ARCHITECTURES = tuple(f.architecture for f in FAMILIES.values())

# transformers' defaults for keys a config.json may omit, where they differ between families
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, sliding_window=4096),
    "qwen2": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0),
    "qwen3": dict(rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0),
    "gemma2": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0, sliding_window=4096,
                   query_pre_attn_scalar=256, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1_000_000.0, sliding_window=4096,
                        rope_local_base_freq=10000.0, query_pre_attn_scalar=256),
    "phi3": dict(rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0),
}
_QUANTIZED_HINT = ("arlm loads unquantised weights only; load the original (bf16/fp32) checkpoint, or "
                   "de-quantise it first")


class HfConfigReader:
    """Typed, named access to one config.json dict: every error names the file and the field."""

    def __init__(self, hf: Any, where: str) -> None:
        if not isinstance(hf, dict):
            raise CheckpointFormatError(f"{where} must hold a JSON object, got {type(hf).__name__}")
        self.hf, self.where = hf, where

    def _bad(self, key: str, want: str, value: Any) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.where}: field {key!r} must be {want}, got {value!r}")

    def raw(self, key: str, default: Any = ...) -> Any:
        if key in self.hf and self.hf[key] is not None:
            return self.hf[key]
        if default is ...:
            raise CheckpointFormatError(f"{self.where} lacks the required field {key!r}")
        return default

    def int(self, key: str, default: Any = ..., *, positive: bool = True) -> int | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise self._bad(key, "an integer", value)
        if positive and value <= 0:
            raise self._bad(key, "a positive integer", value)
        return int(value)

    def float(self, key: str, default: Any = ..., *, positive: bool = True) -> float | None:
        value = self.raw(key, default)
        if value is None:
            return None
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self._bad(key, "a number", value)
        value = float(value)
        if not math.isfinite(value) or (positive and value <= 0):
            raise self._bad(key, "a finite positive number", value)
        return value

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise self._bad(key, "true or false", value)
        return bool(value)

    def str(self, key: str, default: Any = ...) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self._bad(key, "a string", value)
        return value


def config_from_hf(hf: Any, where: str = "config.json") -> tuple[ModelConfig, Family]:
    """(ModelConfig, family) from a Hugging Face config.json dict; refuses what arlm cannot run exactly."""
    r = HfConfigReader(hf, where)
    quant = hf.get("quantization_config")
    if quant is not None:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise CheckpointFormatError(f"{where} has a quantization_config (quant_method {method!r}); {_QUANTIZED_HINT}")
    model_type = r.str("model_type", None)
    archs = r.raw("architectures", [])
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointFormatError(f"{where}: field 'architectures' must be a list of strings, got {archs!r}")
    if model_type not in FAMILIES:
        raise CheckpointFormatError(
            f"{where}: unsupported architecture {archs or model_type!r} (model_type {model_type!r}); arlm loads "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    family = FAMILIES[model_type]
    if archs and family.architecture not in archs:
        # e.g. LlamaForSequenceClassification: the same body, but no LM head to load
        raise CheckpointFormatError(
            f"{where}: unsupported architecture {archs!r}; for model_type {model_type!r} arlm loads "
            f"{family.architecture}")
    try:
        cfg = _gpt2_config(r) if model_type == "gpt2" else _llama_like_config(r, model_type)
    except ValueError as err:
        if isinstance(err, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{where}: {err}") from err
    return cfg, family


def _rope(r: HfConfigReader, model_type: str) -> tuple[float, float | None, tuple | None]:
    """(global RoPE base, local base or None, scaling or None) from rope_parameters / rope_theta /
    rope_scaling. Linear and Llama-3 scaling are read; any other kind is refused by name."""
    defaults = _DEFAULTS[model_type]
    params = r.raw("rope_parameters", None)
    if params is not None and not isinstance(params, dict):
        raise CheckpointFormatError(f"{r.where}: field 'rope_parameters' must be an object, got {params!r}")
    per_type = params is not None and ("full_attention" in params or "sliding_attention" in params)
    full = dict((params or {}).get("full_attention") or {}) if per_type else dict(params or {})
    local = (params or {}).get("sliding_attention") if per_type else None
    legacy = r.raw("rope_scaling", None)
    if legacy is not None:
        if not isinstance(legacy, dict):
            raise CheckpointFormatError(f"{r.where}: field 'rope_scaling' must be an object, got {legacy!r}")
        legacy_kind = legacy.get("rope_type", legacy.get("type", "default"))
        if legacy_kind != "default" and full.get("rope_type", "default") == "default":
            # an older config's rope_scaling next to default rope_parameters: the scaling applies
            full = {**full, **legacy, "rope_type": legacy_kind}
    for p in (full, local):
        if p is not None and not isinstance(p, dict):
            raise CheckpointFormatError(f"{r.where}: field 'rope_parameters' must hold objects, got {p!r}")
        factor = (p or {}).get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise CheckpointFormatError(f"{r.where}: unsupported partial_rotary_factor {factor!r} (arlm rotates "
                                        "the whole head)")
    if model_type == "phi3" and r.raw("partial_rotary_factor", 1.0) != 1.0:
        raise CheckpointFormatError(f"{r.where}: unsupported partial_rotary_factor {r.raw('partial_rotary_factor')!r}")
    fr = HfConfigReader(full, f"{r.where} rope_parameters")
    kind = full.get("rope_type", full.get("type", "default"))
    scaling = None
    if kind == "linear":
        scaling = ("linear", fr.float("factor"))
    elif kind == "llama3":
        scaling = ("llama3", fr.float("factor"), fr.float("low_freq_factor"), fr.float("high_freq_factor"),
                   fr.float("original_max_position_embeddings"))
    elif kind != "default":
        raise CheckpointFormatError(f"{r.where}: unsupported RoPE scaling {kind!r} (arlm implements default, "
                                    "linear and llama3 RoPE)")
    theta = fr.float("rope_theta", None)
    if theta is None:
        theta = r.float("rope_theta", defaults["rope_theta"])
    local_theta = None
    if model_type == "gemma3_text":
        lr = HfConfigReader(local or {}, f"{r.where} rope_parameters.sliding_attention")
        if (local or {}).get("rope_type", "default") != "default":
            raise CheckpointFormatError(f"{r.where}: unsupported RoPE scaling {local['rope_type']!r} on the "
                                        "sliding-window layers")
        local_theta = lr.float("rope_theta", None)
        if local_theta is None:
            local_theta = r.float("rope_local_base_freq", defaults["rope_local_base_freq"])
    return theta, local_theta, scaling


def _windows(r: HfConfigReader, model_type: str, n_layers: int) -> tuple[int | None, int]:
    """(sliding_window, global_every) from sliding_window + layer_types (or each family's default pattern)."""
    window = r.int("sliding_window", _DEFAULTS[model_type].get("sliding_window"))
    types = r.raw("layer_types", None)
    if types is None:
        if model_type in ("qwen2", "qwen3") and r.bool("use_sliding_window", False):
            raise CheckpointFormatError(f"{r.where}: use_sliding_window without layer_types is not supported")
        if model_type in ("llama", "qwen2", "qwen3"):
            return None, 0
        every = {"gemma2": 2, "gemma3_text": r.int("sliding_window_pattern", 6)}.get(model_type, 0)
        types = ["full_attention" if every and (i + 1) % every == 0 else "sliding_attention" for i in range(n_layers)]
    if (not isinstance(types, list) or len(types) != n_layers
            or any(t not in ("full_attention", "sliding_attention") for t in types)):
        raise CheckpointFormatError(f"{r.where}: field 'layer_types' must list 'full_attention' or "
                                    f"'sliding_attention' for each of the {n_layers} layers, got {types!r}")
    if window is None or "sliding_attention" not in types:
        return None, 0
    if model_type == "llama":
        raise CheckpointFormatError(f"{r.where}: Llama has no sliding-window layers")
    global_ids = [i for i, t in enumerate(types) if t == "full_attention"]
    every = global_ids[0] + 1 if global_ids else 0
    if every and global_ids != [i for i in range(n_layers) if (i + 1) % every == 0]:
        raise CheckpointFormatError(f"{r.where}: layer_types {types!r} is not a periodic local/global pattern, "
                                    "which is all arlm's `global_every` expresses")
    return window, every


def _llama_like_config(r: HfConfigReader, model_type: str) -> ModelConfig:
    defaults = _DEFAULTS[model_type]
    d, heads, n_layers = r.int("hidden_size"), r.int("num_attention_heads"), r.int("num_hidden_layers")
    gemma = model_type.startswith("gemma")
    act_key = "hidden_activation" if gemma and "hidden_activation" in r.hf else "hidden_act"
    act = r.str(act_key, "gelu_pytorch_tanh" if gemma else "silu")
    want_act = ("gelu_pytorch_tanh",) if gemma else ("silu",)
    if act not in want_act:
        raise CheckpointFormatError(f"{r.where}: unsupported activation {act_key}={act!r} for {model_type} "
                                    f"(arlm implements {want_act[0]})")
    attn_bias = r.bool("attention_bias", False)
    mlp_bias = r.bool("mlp_bias", False)
    if model_type == "llama" and attn_bias != mlp_bias:
        raise CheckpointFormatError(f"{r.where}: attention_bias and mlp_bias must agree (arlm has one use_bias)")
    if model_type != "llama" and (attn_bias or mlp_bias):
        raise CheckpointFormatError(f"{r.where}: attention_bias/mlp_bias are not supported for {model_type}")
    theta, local_theta, scaling = _rope(r, model_type)
    window, every = _windows(r, model_type, n_layers)
    if local_theta is not None and window is None:
        local_theta = None       # no local layer to use it
    head_dim = r.int("head_dim", None)
    if head_dim is None and d % heads:
        raise CheckpointFormatError(f"{r.where}: hidden_size {d} is not divisible by num_attention_heads {heads} "
                                    "and no head_dim is given")
    options: dict[str, Any] = dict(
        vocab_size=r.int("vocab_size"), d_model=d, n_layers=n_layers, n_heads=heads,
        n_kv_heads=r.int("num_key_value_heads", heads), d_ff=r.int("intermediate_size"),
        max_seq_len=r.int("max_position_embeddings"), head_dim=head_dim or d // heads,
        rope_theta=theta, norm_eps=r.float("rms_norm_eps", defaults["rms_norm_eps"]),
        use_bias=attn_bias, tie_embeddings=r.bool("tie_word_embeddings", defaults["tie_word_embeddings"]),
        sliding_window=window, global_every=every, rope_local_theta=local_theta, rope_scaling=scaling)
    if heads % options["n_kv_heads"]:
        raise CheckpointFormatError(f"{r.where}: num_key_value_heads {options['n_kv_heads']} must divide "
                                    f"num_attention_heads {heads}")
    if model_type == "qwen2":
        options["qkv_bias"] = True
    if model_type == "qwen3":
        options["qk_norm"] = True
    if gemma:
        scale_dim = r.float("query_pre_attn_scalar", defaults["query_pre_attn_scalar"])
        options.update(
            mlp="geglu", sandwich_norm=True, scale_embeddings=True, qk_norm=model_type == "gemma3_text",
            attn_scale_dim=None if scale_dim == options["head_dim"] else scale_dim,
            attn_softcap=r.float("attn_logit_softcapping", defaults.get("attn_logit_softcapping")),
            logit_softcap=r.float("final_logit_softcapping", defaults.get("final_logit_softcapping")))
        if r.raw("use_bidirectional_attention", False):
            raise CheckpointFormatError(f"{r.where}: use_bidirectional_attention is not a causal LM")
    return ModelConfig.llama(**options)


def _gpt2_config(r: HfConfigReader) -> ModelConfig:
    act = r.str("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointFormatError(f"{r.where}: unsupported GPT-2 activation {act!r} (arlm uses tanh-approximated "
                                    "GELU)")
    for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if r.bool(flag, False):
            raise CheckpointFormatError(f"{r.where}: unsupported GPT-2 option {flag}=True")
    if not r.bool("scale_attn_weights", True):
        raise CheckpointFormatError(f"{r.where}: unsupported GPT-2 option scale_attn_weights=False")
    d, heads = r.int("n_embd"), r.int("n_head")
    if d % heads:
        raise CheckpointFormatError(f"{r.where}: n_embd {d} is not divisible by n_head {heads}")
    return ModelConfig.gpt2(
        vocab_size=r.int("vocab_size"), d_model=d, n_layers=r.int("n_layer"), n_heads=heads,
        d_ff=r.int("n_inner", 4 * d), max_seq_len=r.int("n_positions"),
        norm_eps=r.float("layer_norm_epsilon", 1e-5), tie_embeddings=r.bool("tie_word_embeddings", True))


# ------------------------------------------------------------------------------------------ writing
def infer_family(cfg: ModelConfig) -> str:
    """The Hugging Face model_type that expresses `cfg` most simply (Phi-3 is only chosen explicitly)."""
    if cfg.pos_embedding == "learned":
        return "gpt2"
    if cfg.sandwich_norm:
        return "gemma3_text" if cfg.qk_norm else "gemma2"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.qkv_bias:
        return "qwen2"
    if cfg.sliding_window is not None:
        return "mistral"
    return "llama"


def config_to_hf(cfg: ModelConfig, model_type: str | None = None) -> tuple[dict[str, Any], Family]:
    """(config.json dict, family) for `cfg`; ValueError when that family cannot express `cfg` exactly."""
    if cfg.n_experts:
        raise ValueError("mixture-of-experts models have no Hugging Face equivalent in arlm's families")
    if cfg.residual_gain != 1:
        raise ValueError(f"residual_gain={cfg.residual_gain} (a contractive residual map) has no Hugging Face "
                         "equivalent; only residual_gain=1 models can be saved")
    model_type = model_type or infer_family(cfg)
    if model_type not in FAMILIES:
        raise ValueError(f"unknown family {model_type!r}; arlm writes {', '.join(FAMILIES)}")
    family = FAMILIES[model_type]
    hf = _gpt2_dict(cfg) if model_type == "gpt2" else _llama_like_dict(cfg, model_type)
    # special-token ids are unknown here (no tokenizer): null, not each family's own defaults
    # (Phi-3's default pad id 32000 would lie outside a small vocabulary); save_hf fills them in
    hf = {"architectures": [family.architecture], "model_type": model_type, **hf, "torch_dtype": "float32",
          "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    try:
        back, _ = config_from_hf(hf)
    except CheckpointFormatError as err:
        raise ValueError(f"this ModelConfig cannot be written as {model_type}: {err}") from err
    keep = {"dtype", "init_std", "moe_top_k", "moe_aux_weight", "attention_impl", "remat"}   # not in the weights
    diff = [f.name for f in dataclasses.fields(cfg)
            if f.name not in keep and getattr(back, f.name) != getattr(cfg, f.name)]
    if diff:
        raise ValueError(f"this ModelConfig has no exact Hugging Face {family.architecture} equivalent: "
                         f"{', '.join(diff)} would change")
    return hf, family


def _llama_like_dict(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    gemma = model_type.startswith("gemma")
    hf: dict[str, Any] = {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta,
        ("hidden_activation" if gemma else "hidden_act"): "gelu_pytorch_tanh" if gemma else "silu",
    }
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        kind, *values = cfg.rope_scaling
        keys = ("factor",) if kind == "linear" else ("factor", "low_freq_factor", "high_freq_factor",
                                                      "original_max_position_embeddings")
        rope = {"rope_type": kind, "rope_theta": cfg.rope_theta, **dict(zip(keys, values))}
        if kind == "llama3":
            rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
    if model_type == "gemma3_text":
        local = cfg.rope_local_theta if cfg.rope_local_theta is not None else cfg.rope_theta
        hf["rope_local_base_freq"] = local
        hf["rope_parameters"] = {"full_attention": rope,
                                 "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    else:
        hf["rope_parameters"] = rope
    if model_type == "llama":
        hf.update(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias)
    if model_type != "llama":
        hf["sliding_window"] = cfg.sliding_window
    if model_type in ("qwen2", "qwen3", "gemma2", "gemma3_text"):
        hf["layer_types"] = ["full_attention" if cfg.is_global_layer(i) else "sliding_attention"
                             for i in range(cfg.n_layers)]
    if model_type in ("qwen2", "qwen3"):
        hf["use_sliding_window"] = cfg.sliding_window is not None
        hf["max_window_layers"] = 0
    if model_type == "phi3":
        hf["original_max_position_embeddings"] = cfg.max_seq_len
    if gemma:
        scale_dim = cfg.attn_scale_dim if cfg.attn_scale_dim is not None else cfg.head_dim
        hf.update(query_pre_attn_scalar=int(scale_dim) if float(scale_dim).is_integer() else scale_dim,
                  attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
                  sliding_window=cfg.sliding_window if cfg.sliding_window is not None else cfg.max_seq_len)
        if cfg.sliding_window is None:
            hf["layer_types"] = ["full_attention"] * cfg.n_layers
    return hf


def _gpt2_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": cfg.vocab_size, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads, "n_inner": cfg.d_ff, "n_positions": cfg.max_seq_len,
        "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
        "tie_word_embeddings": cfg.tie_embeddings,
    }
