"""LoRA adapters (eq. 24) in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base_model, directory)` loads onto the Hugging Face base model.

arlm's adapter of a weight W [*stacked, d_in, d_out] is {"a": [L, d_in, r], "b": [L, r, d_out]} with
ΔW = (α/r) a @ b in arlm's x @ W layout (`arlm.model.lora`). A Hugging Face linear layer computes
x Wᵀ with W [out, in] and PEFT's update is (α/r) B A with A [r, in], B [out, r]; so for layer i,
A = a[i]ᵀ and B = b[i]ᵀ, under the module names of `arlm.checkpoints.layout` (q_proj, …, down_proj).
The Llama family's separate projections are supported (Llama, SmolLM2, Mistral, Qwen2/3, Gemma);
fused layouts (Phi-3's qkv_proj, GPT-2's c_attn) and expert weights are refused by name.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from arlm.checkpoints.layout import CheckpointFormatError
from arlm.config import ModelConfig
from arlm.model.lora import LoraConfig

__all__ = ["PEFT_MODULES", "save_peft_adapter", "load_peft_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# arlm weight → (params group, Hugging Face module under model.layers.<i>.)
PEFT_MODULES: dict[str, tuple[str, str]] = {
    "wq": ("attn", "self_attn.q_proj"), "wk": ("attn", "self_attn.k_proj"), "wv": ("attn", "self_attn.v_proj"),
    "wo": ("attn", "self_attn.o_proj"), "w_gate": ("mlp", "mlp.gate_proj"), "w_up": ("mlp", "mlp.up_proj"),
    "w_out": ("mlp", "mlp.down_proj"),
}
_PREFIX = "base_model.model.model.layers"


def _check_family(config: ModelConfig, architecture: str | None) -> None:
    if config.mlp == "gelu" or config.pos_embedding == "learned" or config.n_experts:
        raise ValueError("PEFT adapters are written for the Llama family's separate projections; this model is "
                         + ("a mixture of experts" if config.n_experts else "GPT-2 style (fused c_attn)"))
    if architecture == "phi3":
        raise ValueError("Phi-3 fuses q/k/v and gate/up into single modules (qkv_proj, gate_up_proj), which "
                         "arlm's per-projection adapters do not map onto; merge the adapter and save_hf instead")


def save_peft_adapter(directory: str, config: ModelConfig, lora_cfg: LoraConfig, lora_params: dict[str, Any], *,
                      base_model: str | None = None, architecture: str | None = None) -> str:
    """Write `lora_params` (from `init_lora(lora_cfg, params, key)`, trained) as a PEFT LoRA adapter."""
    from safetensors.numpy import save_file

    _check_family(config, architecture)
    layers = lora_params.get("layers", {})
    tensors: dict[str, np.ndarray] = {}
    modules = []
    for name, (group, module) in PEFT_MODULES.items():
        adapter = layers.get(group, {}).get(name)
        if adapter is None:
            continue
        a_LxIxR, b_LxRxO = np.asarray(adapter["a"], np.float32), np.asarray(adapter["b"], np.float32)
        for i in range(config.n_layers):
            tensors[f"{_PREFIX}.{i}.{module}.lora_A.weight"] = np.ascontiguousarray(a_LxIxR[i].T)
            tensors[f"{_PREFIX}.{i}.{module}.lora_B.weight"] = np.ascontiguousarray(b_LxRxO[i].T)
        modules.append(module.split(".")[-1])
    extra = sorted((set(layers.get("attn", {})) | set(layers.get("mlp", {}))) - set(PEFT_MODULES))
    if extra or set(lora_params) - {"layers"}:
        raise ValueError(f"adapters on {extra or sorted(set(lora_params) - {'layers'})} have no PEFT module")
    if not modules:
        raise ValueError("lora_params holds no adapter")
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank, "lora_alpha": lora_cfg.alpha,
        "target_modules": modules, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "base_model_name_or_path": base_model,
        "revision": None,
    }
    with open(os.path.join(directory, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config, f, indent=2)
    return directory


def load_peft_adapter(directory: str, config: ModelConfig) -> tuple[LoraConfig, dict[str, Any]]:
    """(LoraConfig, lora_params) from a PEFT LoRA adapter directory, for `merge_lora(cfg, params, lora)`."""
    from safetensors.numpy import load_file

    path = os.path.join(directory, ADAPTER_CONFIG)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {ADAPTER_CONFIG}")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    if meta.get("peft_type") != "LORA" or meta.get("use_rslora") or meta.get("use_dora") \
            or meta.get("bias", "none") != "none" or meta.get("fan_in_fan_out"):
        raise CheckpointFormatError(f"{path}: only plain LoRA adapters (no rsLoRA, DoRA, bias or fan_in_fan_out) load")
    tensors = load_file(os.path.join(directory, ADAPTER_WEIGHTS))
    by_module = {module.split(".")[-1]: (name, group, module) for name, (group, module) in PEFT_MODULES.items()}
    lora: dict[str, Any] = {"layers": {}}
    names = []
    for target in meta["target_modules"]:
        if target not in by_module:
            raise CheckpointFormatError(f"{path}: target module {target!r} is not one arlm adapts")
        name, group, module = by_module[target]
        try:
            a = np.stack([tensors[f"{_PREFIX}.{i}.{module}.lora_A.weight"].T for i in range(config.n_layers)])
            b = np.stack([tensors[f"{_PREFIX}.{i}.{module}.lora_B.weight"].T for i in range(config.n_layers)])
        except KeyError as err:
            raise CheckpointFormatError(f"{directory}: adapter tensor {err.args[0]} is missing") from None
        lora["layers"].setdefault(group, {})[name] = {"a": a.astype(np.float32), "b": b.astype(np.float32)}
        names.append(name)
    return LoraConfig(rank=int(meta["r"]), alpha=float(meta["lora_alpha"]), targets=tuple(names)), lora
