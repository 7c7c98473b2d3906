"""GGUF files (llama.cpp's format) → arlm config, params, tokenizer and chat template.

Architectures: llama (Llama, Mistral, SmolLM2, …), qwen2, qwen3 and phi3. Gemma 2/3
GGUFs are refused: llama.cpp does not store their attention scale
(query_pre_attn_scalar) nor, for Gemma 3, the local RoPE base and layer pattern
(it hard-codes them per model size), so the file alone does not say which model it is;
load the Hugging Face directory instead.

Tensors are de-quantised with the `gguf` package. llama.cpp's converter
permutes the rows of Q and K so that RoPE rotates interleaved pairs
(x_0, x_1), (x_2, x_3), …; arlm (like Hugging Face) rotates half-split pairs
(x_i, x_{i+K/2}), so the permutation is undone here and the model is the same.

Memory: `gguf.GGUFReader` builds Python objects for every metadata item (~160 MB for a
49k-token vocabulary), so `load_gguf` takes the config, tokenizer and each tensor's
place in the file (`GGUFTensorRef`) from it and drops it before any weight is read.
Tensors are then read with plain file reads (not through the reader's memory map,
whose touched pages would stay resident) and de-quantised a few MB at a time straight
into their float32 array, when the layout code asks for them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import IO, Any

import numpy as np

from arlm.checkpoints.gguf_metadata import field, required_field
from arlm.checkpoints.gguf_tokenizer import tokenizer_from_gguf
from arlm.checkpoints.layout import CheckpointFormatError, LazyTensor, llama_params_from_hf
from arlm.config import ModelConfig

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                          "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp architecture → (arlm's Hugging Face family, Q/K rows permuted by the converter)
ARCHITECTURES = {"llama": ("llama", True), "qwen2": ("qwen2", False), "qwen3": ("qwen3", False),
                 "phi3": ("phi3", False)}
_REFUSED = {
    "gemma2": "llama.cpp does not store Gemma 2's attention scale (query_pre_attn_scalar)",
    "gemma3": "llama.cpp does not store Gemma 3's attention scale, local RoPE base or local/global pattern",
}

DEQUANTIZE_CHUNK_BYTES = 8 * 2**20     # float32 output per de-quantisation step (bounds its temporaries)

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}


def open_gguf(path: str):
    """A `gguf.GGUFReader`, with a clear error for missing, truncated, hostile or non-GGUF files.

    The header is first walked by `validate_gguf_header` (bounded: no count in the file is
    trusted), and only a regular file is opened: a FIFO or device is refused by name.
    """
    import gguf

    from arlm.checkpoints.gguf_header import validate_gguf_header
    from arlm.checkpoints.paths import require_regular_file

    if not os.path.lexists(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    require_regular_file(path, what="GGUF file")
    validate_gguf_header(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as err:  # the reader raises ValueError/IndexError/struct errors on damage
        raise CheckpointFormatError(f"cannot read GGUF file {path}: truncated or corrupt ({err})") from err


def architecture(reader) -> str:
    """The file's llama.cpp architecture, refused by name unless arlm loads it exactly."""
    arch = field(reader, "general.architecture")
    if arch in _REFUSED:
        raise CheckpointFormatError(f"GGUF architecture {arch!r} is not supported: {_REFUSED[arch]}; load the "
                                    "Hugging Face directory instead")
    if arch not in ARCHITECTURES:
        raise CheckpointFormatError(f"unsupported GGUF architecture {arch!r}; arlm loads "
                                    f"{', '.join(ARCHITECTURES)}")
    return arch


def config_from_gguf(reader) -> ModelConfig:
    """ModelConfig from the `<arch>.*` metadata (validated like config.json, keys named)."""
    from arlm.checkpoints.hf_config import HfConfigReader

    arch = architecture(reader)
    meta = {key: f.contents() for key, f in reader.fields.items() if key.startswith(arch + ".")}
    r = HfConfigReader(meta, "GGUF metadata")
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise CheckpointFormatError(f"unsupported RoPE scaling {scaling!r}")
    names = {t.name for t in reader.tensors}
    if names & {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}:
        raise CheckpointFormatError("unsupported RoPE frequency factors in the GGUF (long-context RoPE scaling)")
    heads = r.int(f"{arch}.attention.head_count")
    d = r.int(f"{arch}.embedding_length")
    head_dim = r.int(f"{arch}.attention.key_length", None)
    if head_dim is None:
        if d % heads:
            raise CheckpointFormatError(f"GGUF metadata: embedding_length {d} is not divisible by head_count {heads}")
        head_dim = d // heads
    rotary = r.int(f"{arch}.rope.dimension_count", head_dim)
    if rotary != head_dim:
        raise CheckpointFormatError(f"GGUF metadata: rope.dimension_count {rotary} != head dim {head_dim} "
                                    "(partial rotary embeddings are not supported)")
    vocab = r.int(f"{arch}.vocab_size", None)
    if vocab is None:
        vocab = len(required_field(reader, "tokenizer.ggml.tokens"))
    n_kv = r.int(f"{arch}.attention.head_count_kv", heads)
    if heads % n_kv:
        raise CheckpointFormatError(f"GGUF metadata: head_count_kv {n_kv} must divide head_count {heads}")
    window = r.int(f"{arch}.attention.sliding_window", None) if arch == "phi3" else None
    try:
        return ModelConfig.llama(
            vocab_size=vocab, d_model=d, n_layers=r.int(f"{arch}.block_count"), n_heads=heads, n_kv_heads=n_kv,
            head_dim=head_dim, d_ff=r.int(f"{arch}.feed_forward_length"),
            max_seq_len=r.int(f"{arch}.context_length"),
            rope_theta=r.float(f"{arch}.rope.freq_base", 10000.0),
            norm_eps=r.float(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
            tie_embeddings="output.weight" not in names, qkv_bias=arch == "qwen2", qk_norm=arch == "qwen3",
            sliding_window=window)
    except CheckpointFormatError:
        raise
    except ValueError as err:
        raise CheckpointFormatError(f"GGUF metadata describes an invalid model: {err}") from err


@dataclasses.dataclass(frozen=True)
class GGUFTensorRef:
    """Where one tensor lies in a GGUF file: plain facts, holding no reference to the reader.

    shape: the float32 tensor's shape, [out, in] (PyTorch) order.
    raw_dtype, raw_shape: the stored items as `GGUFReader` types them (for quantised types,
      uint8 rows of whole blocks; for F32/F16, the values in the file's byte order).
    data_offset: absolute byte offset of the data in the file.
    """

    name: str
    tensor_type: Any
    shape: tuple[int, ...]
    raw_dtype: np.dtype
    raw_shape: tuple[int, ...]
    data_offset: int

    @classmethod
    def from_reader(cls, tensor: Any) -> GGUFTensorRef:
        """The reference of one `gguf.ReaderTensor`."""
        return cls(tensor.name, tensor.tensor_type, tuple(int(s) for s in reversed(tensor.shape)),
                   tensor.data.dtype, tuple(int(s) for s in tensor.data.shape), int(tensor.data_offset))

    @property
    def row_chunked(self) -> bool:
        """Whether slices along the first axis can be de-quantised separately (rows of whole blocks)."""
        return len(self.raw_shape) >= 2 and self.raw_shape[:-1] == self.shape[:-1]


def _check_supported(name: str, tensor_type: Any) -> str:
    kind = tensor_type.name
    if kind not in SUPPORTED_TENSOR_TYPES:
        raise CheckpointFormatError(
            f"tensor {name} has unsupported type {kind}; supported: {', '.join(SUPPORTED_TENSOR_TYPES)}")
    return kind


def _dequantize_raw(name: str, tensor_type: Any, raw: np.ndarray) -> np.ndarray:
    """`gguf`'s de-quantisation of stored items, as float32 (shape as `gguf` returns it)."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        return np.asarray(gguf_dequantize(raw, tensor_type), np.float32)
    except Exception as err:
        raise CheckpointFormatError(f"cannot de-quantise tensor {name} ({tensor_type.name}): {err}") from err


def _read_bytes(f: IO[bytes], start: int, n_bytes: int, name: str) -> np.ndarray:
    buf = np.empty(n_bytes, np.uint8)
    f.seek(start)
    if f.readinto(memoryview(buf)) != n_bytes:
        raise CheckpointFormatError(f"cannot read tensor {name}: the GGUF file ended inside it (truncated)")
    return buf


def read_gguf_tensor(f: IO[bytes], ref: GGUFTensorRef) -> np.ndarray:
    """Tensor `ref` of the open GGUF file `f` as a fresh float32 array of `ref.shape`.

    Read and de-quantised `DEQUANTIZE_CHUNK_BYTES` of output at a time (blocks never span
    rows, so the values are those of de-quantising the whole tensor at once).
    """
    _check_supported(ref.name, ref.tensor_type)
    n_rows, n_cols = (ref.shape[0], math.prod(ref.shape[1:])) if ref.row_chunked else (1, math.prod(ref.shape))
    out = np.empty(ref.shape, np.float32)
    out_RxC = out.reshape(n_rows, n_cols)
    row_bytes = math.prod(ref.raw_shape) * ref.raw_dtype.itemsize // max(n_rows, 1)
    step = max(1, DEQUANTIZE_CHUNK_BYTES // max(4 * n_cols, 1))
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        raw_shape = (r1 - r0, *ref.raw_shape[1:]) if ref.row_chunked else ref.raw_shape
        raw = _read_bytes(f, ref.data_offset + r0 * row_bytes, (r1 - r0) * row_bytes, ref.name)
        values = _dequantize_raw(ref.name, ref.tensor_type, raw.view(ref.raw_dtype).reshape(raw_shape))
        if values.size != out_RxC[r0:r1].size:
            raise CheckpointFormatError(f"cannot de-quantise tensor {ref.name} ({ref.tensor_type.name}): "
                                        f"{values.size} values for shape {ref.shape}")
        out_RxC[r0:r1] = values.reshape(r1 - r0, n_cols)
    return out


def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: interleaved-pair RoPE rows → half-split rows."""
    out, inp = w_OxI.shape
    return w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def _hf_tensor(f: IO[bytes], ref: GGUFTensorRef, n_heads: int | None) -> LazyTensor:
    """`ref` read on use, its Q/K rows un-permuted when `n_heads` is given."""
    def read() -> np.ndarray:
        w = read_gguf_tensor(f, ref)
        return w if n_heads is None else unpermute_rope_rows(w, n_heads)
    return LazyTensor(ref.shape, read)


def gguf_tensors_as_hf(f: IO[bytes], refs: list[GGUFTensorRef], cfg: ModelConfig,
                       arch: str = "llama") -> dict[str, LazyTensor | np.ndarray]:
    """All tensors under Hugging Face names, read from `f` (de-quantised, un-permuted for llama) on use.

    Types are checked here, before anything is read. A tensor arlm has no name for keeps its
    GGUF name, so the strict loader refuses it.
    """
    permuted = ARCHITECTURES[arch][1]
    whole = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    out: dict[str, LazyTensor | np.ndarray] = {}
    for ref in refs:
        name = ref.name
        if name in whole:
            _check_supported(name, ref.tensor_type)
            out[whole[name]] = _hf_tensor(f, ref, None)
        elif name.startswith("blk.") and name.count(".") == 3 and name.split(".", 3)[2] in _LAYER_NAMES:
            _check_supported(name, ref.tensor_type)
            _, layer, kind, suffix = name.split(".", 3)
            heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(kind) if permuted else None
            hf_kind = "mlp.gate_up_proj" if arch == "phi3" and kind == "ffn_up" else _LAYER_NAMES[kind]
            out[f"model.layers.{layer}.{hf_kind}.{suffix}"] = _hf_tensor(f, ref, heads)
        else:
            out[name] = np.zeros((0,), np.float32)     # unknown: left for the strict check to name
    return out


def load_gguf(path: str, *, weights: bool = True) -> tuple[ModelConfig, dict[str, Any] | None, Any, str | None, str]:
    """(config, params, tokenizer, chat_template, Hugging Face model_type) from a llama / qwen2 / qwen3 /
    phi3 GGUF file (params None without `weights`: no tensor is read)."""
    from arlm.checkpoints.hf_config import FAMILIES

    from arlm.checkpoints.paths import open_regular

    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    arch = architecture(reader)
    tokenizer = tokenizer_from_gguf(reader)
    template = field(reader, "tokenizer.chat_template")
    if not weights:
        return cfg, None, tokenizer, template, ARCHITECTURES[arch][0]
    refs = [GGUFTensorRef.from_reader(t) for t in reader.tensors]
    del reader          # its metadata objects go before the weights arrive (see the module docstring)
    layout = FAMILIES[ARCHITECTURES[arch][0]].layout
    with open_regular(path, what="GGUF file") as f:
        params = llama_params_from_hf(cfg, gguf_tensors_as_hf(f, refs, cfg, arch), layout=layout, where=path)
    return cfg, params, tokenizer, template, ARCHITECTURES[arch][0]
