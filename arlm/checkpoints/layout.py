"""Hugging Face tensor layouts ⇄ arlm's params pytree: GPT-2 and the Llama family
(Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 2/3, Phi-3).

Both directions work on dicts keyed by Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`, `h.0.attn.c_attn.weight`, …), so
GGUF files (after de-quantisation and un-permuting Q/K) and safetensors
directories share one conversion.

Loading streams: a checkpoint reader hands over `LazyTensor`s (shape known, data read
on use), each stacked leaf ([L, …]) is allocated once and filled layer by layer, and
every tensor read is dropped as soon as it is copied in. Peak memory is then the
float32 params plus one tensor's temporaries, not the file's tensors plus the params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from arlm.config import ModelConfig

Tensors = dict[str, np.ndarray]


class CheckpointFormatError(ValueError):
    """A checkpoint file is malformed, truncated, or describes something arlm cannot load."""


@dataclasses.dataclass(frozen=True)
class LazyTensor:
    """A checkpoint tensor whose data is read only when asked for, and not kept.

    shape: the shape `read()` returns (known from the file's header, before any data is read).
    read: returns a fresh array on each call; the caller owns it and drops it when done.
    """

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]

    @property
    def ndim(self) -> int:
        """Number of dimensions, as for a numpy array."""
        return len(self.shape)


TensorSource = Mapping[str, np.ndarray | LazyTensor]


class TrackedTensors(dict):
    """A tensor dict that records which names were read, so that leftovers can be refused.

    A checkpoint whose file holds tensors that its config does not account for (more layers
    than `num_hidden_layers`, stray weights of another architecture) describes a different
    model: loading the rest would silently run the wrong network. Values are numpy arrays
    or `LazyTensor`s (read on each `take`).
    """

    def __init__(self, tensors: TensorSource) -> None:
        super().__init__(tensors)
        self.used: set[str] = set()

    def take(self, name: str) -> np.ndarray:
        """Tensor `name` as float32 (read now if lazy), marked as used."""
        if name not in self:
            raise CheckpointFormatError(f"checkpoint is missing tensor {name!r}")
        self.used.add(name)
        x = self[name]
        return np.asarray(x.read() if isinstance(x, LazyTensor) else x, np.float32)

    def check_all_used(self, where: str) -> None:
        unused = sorted(set(self) - self.used)
        if unused:
            shown = ", ".join(unused[:8]) + (f", … ({len(unused)} in all)" if len(unused) > 8 else "")
            raise CheckpointFormatError(
                f"{where} holds tensors that its config does not account for: {shown}; the config (layer "
                "count, architecture) does not describe this file")


def _tracked(t: TensorSource) -> TrackedTensors:
    return t if isinstance(t, TrackedTensors) else TrackedTensors(t)


def _stack_many(n_layers: int, fn: Callable[[int], tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    """Leaves [L, …] whose layer i is fn(i)[j], each allocated once and filled layer by layer.

    Equal to `np.stack` per output, but without the per-layer list: beside the results, only
    one layer's arrays are alive at a time. fn(i) is called once per layer, so a fused tensor
    (q/k/v in one) is read once and split into several leaves.
    """
    if n_layers < 1:
        raise ValueError(f"need at least one layer to stack, got n_layers={n_layers}")
    parts = fn(0)
    outs_LxS = tuple(np.empty((n_layers, *x.shape), x.dtype) for x in parts)
    for i in range(n_layers):
        if i:
            parts = fn(i)
        for out_LxS, x in zip(outs_LxS, parts, strict=True):
            if x.shape != out_LxS.shape[1:]:
                raise CheckpointFormatError(f"layer {i} gives shape {x.shape}, layer 0 gave {out_LxS.shape[1:]}")
            out_LxS[i] = x
        del parts       # this layer's temporaries go before the next layer's are read
    return outs_LxS


def _stack(n_layers: int, fn: Callable[[int], np.ndarray]) -> np.ndarray:
    """fn(0), …, fn(n_layers - 1) stacked on a new leading [L] axis (see `_stack_many`)."""
    return _stack_many(n_layers, lambda i: (fn(i),))[0]


def _check_shape(name: str, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if x.shape != shape:
        raise CheckpointFormatError(f"tensor {name} has shape {x.shape}, expected {shape} from the config")
    return x


# ----------------------------------------------------------------------------------------- Llama family
@dataclasses.dataclass(frozen=True)
class LlamaLayout:
    """How one Hugging Face family of Llama-like models names and stores its tensors.

    norms: (arlm norm, Hugging Face layer norm) pairs of one layer.
    norm_offset: the file stores w of a (1 + w) RMSNorm scale (Gemma); arlm keeps 1 + w.
    fused: q/k/v in one `qkv_proj` and gate/up in one `gate_up_proj` (Phi-3).
    """

    norms: tuple[tuple[str, str], ...] = (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm"))
    norm_offset: bool = False
    fused: bool = False


LLAMA_LAYOUT = LlamaLayout()
GEMMA_LAYOUT = LlamaLayout(norms=(("attn_norm", "input_layernorm"), ("attn_post_norm", "post_attention_layernorm"),
                                  ("mlp_norm", "pre_feedforward_layernorm"),
                                  ("mlp_post_norm", "post_feedforward_layernorm")), norm_offset=True)
PHI3_LAYOUT = LlamaLayout(fused=True)


def llama_params_from_hf(cfg: ModelConfig, t: TensorSource, prefix: str = "model.",
                         layout: LlamaLayout = LLAMA_LAYOUT, where: str = "the checkpoint") -> dict[str, Any]:
    """arlm params from Llama-family tensors ([out, in] weight matrices): Llama, Mistral, Qwen2/3,
    Gemma 2/3 and Phi-3, whose differences `cfg` and `layout` describe. Every tensor of `t`
    must be used (see `TrackedTensors`)."""
    t = _tracked(t)
    d, h, n, k, f, v = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    offset = np.float32(1.0) if layout.norm_offset else np.float32(0.0)

    def w(i: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = f"{prefix}layers.{i}.{name}"
        return _check_shape(full, t.take(full), shape)

    def norm(i: int, name: str, size: int) -> np.ndarray:
        return w(i, f"{name}.weight", (size,)) + offset

    if layout.fused:
        def qkv(i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            w_QKVxD = w(i, "self_attn.qkv_proj.weight", ((h + 2 * n) * k, d))
            return (w_QKVxD[:h * k].T.reshape(d, h, k), w_QKVxD[h * k:(h + n) * k].T.reshape(d, n, k),
                    w_QKVxD[(h + n) * k:].T.reshape(d, n, k))

        def gate_up(i: int) -> tuple[np.ndarray, np.ndarray]:
            w_2FxD = w(i, "mlp.gate_up_proj.weight", (2 * f, d))
            return w_2FxD[:f].T, w_2FxD[f:].T
        wq, wk, wv = _stack_many(cfg.n_layers, qkv)
        w_gate, w_up = _stack_many(cfg.n_layers, gate_up)
    else:
        wq = _stack(cfg.n_layers, lambda i: w(i, "self_attn.q_proj.weight", (h * k, d)).T.reshape(d, h, k))
        wk = _stack(cfg.n_layers, lambda i: w(i, "self_attn.k_proj.weight", (n * k, d)).T.reshape(d, n, k))
        wv = _stack(cfg.n_layers, lambda i: w(i, "self_attn.v_proj.weight", (n * k, d)).T.reshape(d, n, k))
        w_gate = _stack(cfg.n_layers, lambda i: w(i, "mlp.gate_proj.weight", (f, d)).T)
        w_up = _stack(cfg.n_layers, lambda i: w(i, "mlp.up_proj.weight", (f, d)).T)
    attn: dict[str, Any] = {
        "wq": wq, "wk": wk, "wv": wv,
        "wo": _stack(cfg.n_layers, lambda i: w(i, "self_attn.o_proj.weight", (d, h * k)).T.reshape(h, k, d)),
    }
    mlp = {"w_gate": w_gate, "w_up": w_up,
           "w_out": _stack(cfg.n_layers, lambda i: w(i, "mlp.down_proj.weight", (d, f)).T)}
    if cfg.use_bias or cfg.qkv_bias:
        attn["wq_bias"] = _stack(cfg.n_layers, lambda i: w(i, "self_attn.q_proj.bias", (h * k,)).reshape(h, k))
        attn["wk_bias"] = _stack(cfg.n_layers, lambda i: w(i, "self_attn.k_proj.bias", (n * k,)).reshape(n, k))
        attn["wv_bias"] = _stack(cfg.n_layers, lambda i: w(i, "self_attn.v_proj.bias", (n * k,)).reshape(n, k))
    if cfg.use_bias:
        attn["wo_bias"] = _stack(cfg.n_layers, lambda i: w(i, "self_attn.o_proj.bias", (d,)))
        mlp["w_gate_bias"] = _stack(cfg.n_layers, lambda i: w(i, "mlp.gate_proj.bias", (f,)))
        mlp["w_up_bias"] = _stack(cfg.n_layers, lambda i: w(i, "mlp.up_proj.bias", (f,)))
        mlp["w_out_bias"] = _stack(cfg.n_layers, lambda i: w(i, "mlp.down_proj.bias", (d,)))
    if cfg.qk_norm:
        attn["q_norm"] = {"scale": _stack(cfg.n_layers, lambda i: norm(i, "self_attn.q_norm", k))}
        attn["k_norm"] = {"scale": _stack(cfg.n_layers, lambda i: norm(i, "self_attn.k_norm", k))}
    layers: dict[str, Any] = {"attn": attn, "mlp": mlp}
    for ours, theirs in _layer_norms(cfg, layout):
        layers[ours] = {"scale": _stack(cfg.n_layers, lambda i: norm(i, theirs, d))}
    embed = _check_shape("embed_tokens", t.take(f"{prefix}embed_tokens.weight"), (v, d))
    params: dict[str, Any] = {
        "embed": embed, "layers": layers,
        "final_norm": {"scale": _check_shape("norm", t.take(f"{prefix}norm.weight"), (d,)) + offset},
    }
    if not cfg.tie_embeddings:
        params["unembed"] = _check_shape("lm_head", t.take("lm_head.weight"), (v, d)).T
    elif "lm_head.weight" in t:
        # a tied model saved with its head: harmless only when the head is the embedding itself
        if not np.array_equal(t.take("lm_head.weight"), embed):
            raise CheckpointFormatError(
                f"{where}: the config ties the embeddings (tie_word_embeddings) but lm_head.weight differs "
                "from embed_tokens.weight; set tie_word_embeddings to false to load the separate head")
    for name in [n for n in t if n.endswith("rotary_emb.inv_freq")]:
        t.used.add(name)        # a buffer some exports include; recomputed from the config
    t.check_all_used(where)
    return params


def _layer_norms(cfg: ModelConfig, layout: LlamaLayout) -> tuple[tuple[str, str], ...]:
    if cfg.sandwich_norm != (len(layout.norms) == 4):
        raise CheckpointFormatError("sandwich_norm configs need the four-norm (Gemma) tensor layout")
    return layout.norms


def llama_params_to_hf(cfg: ModelConfig, params: dict[str, Any],
                       layout: LlamaLayout = LLAMA_LAYOUT) -> Tensors:
    """Llama-family tensors from arlm params (inverse of `llama_params_from_hf`)."""
    d, h, n, k = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    p = _numpy_tree(params)
    L, A, M = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]
    offset = np.float32(1.0) if layout.norm_offset else np.float32(0.0)
    out: Tensors = {"model.embed_tokens.weight": p["embed"], "model.norm.weight": p["final_norm"]["scale"] - offset}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        q, kk, vv = (A["wq"][i].reshape(d, h * k).T, A["wk"][i].reshape(d, n * k).T,
                     A["wv"][i].reshape(d, n * k).T)
        if layout.fused:
            out[pre + "self_attn.qkv_proj.weight"] = np.concatenate([q, kk, vv], 0)
            out[pre + "mlp.gate_up_proj.weight"] = np.concatenate([M["w_gate"][i].T, M["w_up"][i].T], 0)
        else:
            out[pre + "self_attn.q_proj.weight"], out[pre + "self_attn.k_proj.weight"] = q, kk
            out[pre + "self_attn.v_proj.weight"] = vv
            out[pre + "mlp.gate_proj.weight"] = M["w_gate"][i].T
            out[pre + "mlp.up_proj.weight"] = M["w_up"][i].T
        out[pre + "self_attn.o_proj.weight"] = A["wo"][i].reshape(h * k, d).T
        out[pre + "mlp.down_proj.weight"] = M["w_out"][i].T
        for ours, theirs in _layer_norms(cfg, layout):
            out[pre + f"{theirs}.weight"] = L[ours]["scale"][i] - offset
        if cfg.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = A["q_norm"]["scale"][i] - offset
            out[pre + "self_attn.k_norm.weight"] = A["k_norm"]["scale"][i] - offset
        if cfg.use_bias or cfg.qkv_bias:
            out[pre + "self_attn.q_proj.bias"] = A["wq_bias"][i].reshape(-1)
            out[pre + "self_attn.k_proj.bias"] = A["wk_bias"][i].reshape(-1)
            out[pre + "self_attn.v_proj.bias"] = A["wv_bias"][i].reshape(-1)
        if cfg.use_bias:
            out[pre + "self_attn.o_proj.bias"] = A["wo_bias"][i]
            out[pre + "mlp.gate_proj.bias"] = M["w_gate_bias"][i]
            out[pre + "mlp.up_proj.bias"] = M["w_up_bias"][i]
            out[pre + "mlp.down_proj.bias"] = M["w_out_bias"][i]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["unembed"].T
    return {name: np.ascontiguousarray(x, np.float32) for name, x in out.items()}


# ----------------------------------------------------------------------------------------- GPT-2
def gpt2_params_from_hf(cfg: ModelConfig, t: TensorSource, where: str = "the checkpoint") -> dict[str, Any]:
    """arlm params from `GPT2LMHeadModel` tensors (Conv1D weights are [in, out]); every tensor must be used."""
    t = _tracked(t)
    prefix = "transformer." if "transformer.wte.weight" in t else ""
    d, h, k, f, v = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff, cfg.vocab_size

    def g(i: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
        full = f"{prefix}h.{i}.{name}"
        return _check_shape(full, t.take(full), shape)

    def qkv(i: int) -> tuple[np.ndarray, ...]:
        """Layer i's (wq, wk, wv, wq_bias, wk_bias, wv_bias) from its fused c_attn, read once."""
        w_Dx3D = g(i, "attn.c_attn.weight", (d, 3 * d))
        b_3D = g(i, "attn.c_attn.bias", (3 * d,))
        return (*(w_Dx3D[:, j * d:(j + 1) * d].reshape(d, h, k) for j in range(3)),
                *(b_3D[j * d:(j + 1) * d].reshape(h, k) for j in range(3)))

    wq, wk, wv, wq_bias, wk_bias, wv_bias = _stack_many(cfg.n_layers, qkv)
    attn = {"wq": wq, "wq_bias": wq_bias, "wk": wk, "wk_bias": wk_bias, "wv": wv, "wv_bias": wv_bias}
    attn["wo"] = _stack(cfg.n_layers, lambda i: g(i, "attn.c_proj.weight", (d, d)).reshape(h, k, d))
    attn["wo_bias"] = _stack(cfg.n_layers, lambda i: g(i, "attn.c_proj.bias", (d,)))

    def norm(name: str) -> dict[str, np.ndarray]:
        return {"scale": _stack(cfg.n_layers, lambda i: g(i, f"{name}.weight", (d,))),
                "bias": _stack(cfg.n_layers, lambda i: g(i, f"{name}.bias", (d,)))}

    params: dict[str, Any] = {
        "embed": _check_shape("wte", t.take(f"{prefix}wte.weight"), (v, d)),
        "pos_embed": _check_shape("wpe", t.take(f"{prefix}wpe.weight"), (cfg.max_seq_len, d)),
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
        "final_norm": {"scale": t.take(f"{prefix}ln_f.weight"), "bias": t.take(f"{prefix}ln_f.bias")},
    }
    if not cfg.tie_embeddings:
        params["unembed"] = _check_shape("lm_head", t.take("lm_head.weight"), (v, d)).T
    elif "lm_head.weight" in t and not np.array_equal(t.take("lm_head.weight"), params["embed"]):
        raise CheckpointFormatError(f"{where}: the config ties the embeddings but lm_head.weight differs from wte")
    for name in t:
        if name.endswith((".attn.bias", ".attn.masked_bias")) and t[name].ndim != 1:
            t.used.add(name)    # old exports' causal-mask buffers, not weights
    t.check_all_used(where)
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
