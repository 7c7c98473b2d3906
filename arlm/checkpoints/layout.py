"""Hugging Face tensor layouts ⇄ arlm's params pytree, for the Llama and GPT-2 families.

Both directions work on plain numpy dicts keyed by Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, `h.0.attn.c_attn.weight`, …), so
GGUF files (after de-quantisation and un-permuting Q/K) and safetensors
directories share one conversion.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from arlm.config import ModelConfig

Tensors = dict[str, np.ndarray]


class CheckpointFormatError(ValueError):
    """A checkpoint file is malformed, truncated, or describes something arlm cannot load."""


def _get(t: Tensors, name: str) -> np.ndarray:
    if name not in t:
        raise CheckpointFormatError(f"checkpoint is missing tensor {name!r}")
    return np.asarray(t[name], np.float32)


def _stack(n_layers: int, fn: Callable[[int], np.ndarray]) -> np.ndarray:
    return np.stack([fn(i) for i in range(n_layers)])


def _check_shape(name: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape != shape:
        raise CheckpointFormatError(f"tensor {name} has shape {x.shape}, expected {shape} from the config")
    return x


# ----------------------------------------------------------------------------------------- Llama
def llama_params_from_hf(cfg: ModelConfig, t: Tensors, prefix: str = "model.") -> dict[str, Any]:
    """arlm params from `LlamaForCausalLM` tensors ([out, in] weight matrices)."""
    d, h, n, k, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size

    def w(i: int, name: str, shape: tuple[int, int]) -> np.ndarray:
        full = f"{prefix}layers.{i}.{name}"
        return _check_shape(full, _get(t, full), shape)

    def b(i: int, name: str, size: int) -> np.ndarray:
        full = f"{prefix}layers.{i}.{name}"
        return _check_shape(full, _get(t, full), (size,))

    attn = {
        "wq": _stack(cfg.n_layers, lambda i: w(i, "self_attn.q_proj.weight", (h * k, d)).T.reshape(d, h, k)),
        "wk": _stack(cfg.n_layers, lambda i: w(i, "self_attn.k_proj.weight", (n * k, d)).T.reshape(d, n, k)),
        "wv": _stack(cfg.n_layers, lambda i: w(i, "self_attn.v_proj.weight", (n * k, d)).T.reshape(d, n, k)),
        "wo": _stack(cfg.n_layers, lambda i: w(i, "self_attn.o_proj.weight", (d, h * k)).T.reshape(h, k, d)),
    }
    mlp = {
        "w_gate": _stack(cfg.n_layers, lambda i: w(i, "mlp.gate_proj.weight", (f, d)).T),
        "w_up": _stack(cfg.n_layers, lambda i: w(i, "mlp.up_proj.weight", (f, d)).T),
        "w_out": _stack(cfg.n_layers, lambda i: w(i, "mlp.down_proj.weight", (d, f)).T),
    }
    if cfg.use_bias:
        attn["wq_bias"] = _stack(cfg.n_layers, lambda i: b(i, "self_attn.q_proj.bias", h * k).reshape(h, k))
        attn["wk_bias"] = _stack(cfg.n_layers, lambda i: b(i, "self_attn.k_proj.bias", n * k).reshape(n, k))
        attn["wv_bias"] = _stack(cfg.n_layers, lambda i: b(i, "self_attn.v_proj.bias", n * k).reshape(n, k))
        attn["wo_bias"] = _stack(cfg.n_layers, lambda i: b(i, "self_attn.o_proj.bias", d))
        mlp["w_gate_bias"] = _stack(cfg.n_layers, lambda i: b(i, "mlp.gate_proj.bias", f))
        mlp["w_up_bias"] = _stack(cfg.n_layers, lambda i: b(i, "mlp.up_proj.bias", f))
        mlp["w_out_bias"] = _stack(cfg.n_layers, lambda i: b(i, "mlp.down_proj.bias", d))
    params: dict[str, Any] = {
        "embed": _check_shape("embed_tokens", _get(t, f"{prefix}embed_tokens.weight"), (v, d)),
        "layers": {
            "attn": attn,
            "attn_norm": {"scale": _stack(cfg.n_layers, lambda i: b(i, "input_layernorm.weight", d))},
            "mlp_norm": {"scale": _stack(cfg.n_layers, lambda i: b(i, "post_attention_layernorm.weight", d))},
            "mlp": mlp,
        },
        "final_norm": {"scale": _check_shape("norm", _get(t, f"{prefix}norm.weight"), (d,))},
    }
    if not cfg.tie_embeddings:
        params["unembed"] = _check_shape("lm_head", _get(t, "lm_head.weight"), (v, d)).T
    return params


def llama_params_to_hf(cfg: ModelConfig, params: dict[str, Any]) -> Tensors:
    """`LlamaForCausalLM` tensors from arlm params (inverse of `llama_params_from_hf`)."""
    d, h, n, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    p = _numpy_tree(params)
    L, A, M = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]
    out: Tensors = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        out[pre + "self_attn.q_proj.weight"] = A["wq"][i].reshape(d, h * k).T
        out[pre + "self_attn.k_proj.weight"] = A["wk"][i].reshape(d, n * k).T
        out[pre + "self_attn.v_proj.weight"] = A["wv"][i].reshape(d, n * k).T
        out[pre + "self_attn.o_proj.weight"] = A["wo"][i].reshape(h * k, d).T
        out[pre + "mlp.gate_proj.weight"] = M["w_gate"][i].T
        out[pre + "mlp.up_proj.weight"] = M["w_up"][i].T
        out[pre + "mlp.down_proj.weight"] = M["w_out"][i].T
        out[pre + "input_layernorm.weight"] = L["attn_norm"]["scale"][i]
        out[pre + "post_attention_layernorm.weight"] = L["mlp_norm"]["scale"][i]
        if cfg.use_bias:
            out[pre + "self_attn.q_proj.bias"] = A["wq_bias"][i].reshape(-1)
            out[pre + "self_attn.k_proj.bias"] = A["wk_bias"][i].reshape(-1)
            out[pre + "self_attn.v_proj.bias"] = A["wv_bias"][i].reshape(-1)
            out[pre + "self_attn.o_proj.bias"] = A["wo_bias"][i]
            out[pre + "mlp.gate_proj.bias"] = M["w_gate_bias"][i]
            out[pre + "mlp.up_proj.bias"] = M["w_up_bias"][i]
            out[pre + "mlp.down_proj.bias"] = M["w_out_bias"][i]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["unembed"].T
    return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


# ----------------------------------------------------------------------------------------- GPT-2
def gpt2_params_from_hf(cfg: ModelConfig, t: Tensors) -> dict[str, Any]:
    """arlm params from `GPT2LMHeadModel` tensors (Conv1D weights are [in, out])."""
    prefix = "transformer." if "transformer.wte.weight" in t else ""
    d, h, k, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size

    def g(i: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = f"{prefix}h.{i}.{name}"
        return _check_shape(full, _get(t, full), shape)

    def qkv(i: int, which: int) -> tuple[np.ndarray, np.ndarray]:
        w = g(i, "attn.c_attn.weight", (d, 3 * d))[:, which * d:(which + 1) * d]
        bias = g(i, "attn.c_attn.bias", (3 * d,))[which * d:(which + 1) * d]
        return w.reshape(d, h, k), bias.reshape(h, k)

    attn = {}
    for which, name in enumerate(("wq", "wk", "wv")):
        attn[name] = _stack(cfg.n_layers, lambda i: qkv(i, which)[0])
        attn[name + "_bias"] = _stack(cfg.n_layers, lambda i: qkv(i, which)[1])
    attn["wo"] = _stack(cfg.n_layers, lambda i: g(i, "attn.c_proj.weight", (d, d)).reshape(h, k, d))
    attn["wo_bias"] = _stack(cfg.n_layers, lambda i: g(i, "attn.c_proj.bias", (d,)))

    def norm(name: str) -> dict[str, np.ndarray]:
        return {"scale": _stack(cfg.n_layers, lambda i: g(i, f"{name}.weight", (d,))),
                "bias": _stack(cfg.n_layers, lambda i: g(i, f"{name}.bias", (d,)))}

    params: dict[str, Any] = {
        "embed": _check_shape("wte", _get(t, f"{prefix}wte.weight"), (v, d)),
        "pos_embed": _check_shape("wpe", _get(t, f"{prefix}wpe.weight"), (cfg.max_seq_len, d)),
        "layers": {
            "attn": attn,
            "attn_norm": norm("ln_1"),
            "mlp_norm": norm("ln_2"),
            "mlp": {
                "w_in": _stack(cfg.n_layers, lambda i: g(i, "mlp.c_fc.weight", (d, f))),
                "w_in_bias": _stack(cfg.n_layers, lambda i: g(i, "mlp.c_fc.bias", (f,))),
                "w_out": _stack(cfg.n_layers, lambda i: g(i, "mlp.c_proj.weight", (f, d))),
                "w_out_bias": _stack(cfg.n_layers, lambda i: g(i, "mlp.c_proj.bias", (d,))),
            },
        },
        "final_norm": {"scale": _get(t, f"{prefix}ln_f.weight"), "bias": _get(t, f"{prefix}ln_f.bias")},
    }
    if not cfg.tie_embeddings:
        params["unembed"] = _check_shape("lm_head", _get(t, "lm_head.weight"), (v, d)).T
    return params


def gpt2_params_to_hf(cfg: ModelConfig, params: dict[str, Any]) -> Tensors:
    """`GPT2LMHeadModel` tensors from arlm params (inverse of `gpt2_params_from_hf`)."""
    d = cfg.d_model
    p = _numpy_tree(params)
    L, A, M = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]
    out: Tensors = {"transformer.wte.weight": p["embed"], "transformer.wpe.weight": p["pos_embed"],
                    "transformer.ln_f.weight": p["final_norm"]["scale"],
                    "transformer.ln_f.bias": p["final_norm"]["bias"]}
    for i in range(cfg.n_layers):
        pre = f"transformer.h.{i}."
        out[pre + "attn.c_attn.weight"] = np.concatenate([A[n][i].reshape(d, d) for n in ("wq", "wk", "wv")], 1)
        out[pre + "attn.c_attn.bias"] = np.concatenate([A[n + "_bias"][i].reshape(d) for n in ("wq", "wk", "wv")])
        out[pre + "attn.c_proj.weight"] = A["wo"][i].reshape(d, d)
        out[pre + "attn.c_proj.bias"] = A["wo_bias"][i]
        for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[pre + f"{theirs}.weight"] = L[ours]["scale"][i]
            out[pre + f"{theirs}.bias"] = L[ours]["bias"][i]
        out[pre + "mlp.c_fc.weight"] = M["w_in"][i]
        out[pre + "mlp.c_fc.bias"] = M["w_in_bias"][i]
        out[pre + "mlp.c_proj.weight"] = M["w_out"][i]
        out[pre + "mlp.c_proj.bias"] = M["w_out_bias"][i]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["unembed"].T
    return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


def _numpy_tree(params: dict[str, Any]) -> dict[str, Any]:
    import jax
    return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), params)
