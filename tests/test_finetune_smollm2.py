"""The user-data jobs on SmolLM2-135M-Instruct (slow): the acceptance runs of issue 24.

  * SFT with LoRA on the bundled chat set: on held-out prompts the trained model replies in the taught
    format ("Ahoy! … Arr!") far more often than the base model (Wilson intervals apart); transformers
    with peft, loading the saved adapter on the base model, and transformers on DIR/model/ give arlm's
    greedy reply token for token.
  * DPO with LoRA on the bundled pairs: held-out preference accuracy and the log-ratio margin rise;
    π_ref's log-probs are the same before and after.
  * Continued pretraining on a text file lowers held-out perplexity on that text.
Conversational ids of SmolLM2's own template equal transformers' (system prompt, non-ASCII).
"""

from __future__ import annotations

import _hf_oracle

import json
import os

import jax
import numpy as np
import pytest

import arlm
from arlm.jobs.finetune import default_config, run

pytestmark = pytest.mark.slow
NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """SmolLM2 as a Hugging Face directory (transformers' base model for peft, read in a second)."""
    _hf_oracle.gguf_path_or_skip(NAME)
    return arlm.load(NAME).save_hf(str(tmp_path_factory.mktemp("smollm2_hf")))


def _config(job, workdir, **fields):
    c = default_config(job)
    c.model, c.workdir, c.progress = NAME, str(workdir), False
    c.mesh.num_devices = 1
    c.warmup_steps, c.lora.rank, c.eval.generate = 10, 0, 0       # what these tests measured; fields override
    for k, v in fields.items():
        section, _, name = k.rpartition(".")
        (c[section] if section else c)[name] = v
    return c


def test_smollm2_chat_rows_tokenize_as_apply_chat_template():
    from arlm.data.rows import read_rows
    from arlm.data.store import build_store
    from arlm.data.tokenize import TextCodec, TokenizeConfig

    path = _hf_oracle.gguf_path_or_skip(NAME)
    hf = _hf_oracle.load_hf_tokenizer(path)
    m = arlm.load(NAME, weights=False)
    convs = [[{"role": "user", "content": "What is 2 plus 6?"}, {"role": "assistant", "content": "Ahoy! 8. Arr!"}],
             [{"role": "system", "content": "Tu es un pirate. Réponds en français ✓."},
              {"role": "user", "content": "Où est 東京 ?"}, {"role": "assistant", "content": "Au Japon, moussaillon 🏴‍☠️."},
              {"role": "user", "content": "Et Kyōto ?"}, {"role": "assistant", "content": "Aussi !"}]]
    store = build_store(read_rows([{"messages": c} for c in convs]), TextCodec.of(m), "sequences",
                        TokenizeConfig(max_length=8192))
    for i, conv in enumerate(convs):
        assert store[i]["ids"].tolist() == _hf_oracle.input_ids(hf.apply_chat_template(conv, tokenize=True,
                                                                                       return_dict=False))
        scored = hf.decode([t for t, k in zip(store[i]["ids"], store[i]["mask"]) if k])
        assert scored == "".join(msg["content"] + "<|im_end|>\n" for msg in conv if msg["role"] == "assistant")


def test_sft_lora_teaches_the_format_and_transformers_with_peft_agrees(base_dir, tmp_path):
    torch, transformers = _hf_oracle.import_oracle()
    peft = pytest.importorskip("peft")
    s = run(_config("sft", tmp_path / "sft", steps=8, batch_size=4, learning_rate=2e-3, **{
        "lora.rank": 8, "eval.generate": 16, "eval.max_new_tokens": 24, "eval.batch_size": 16}))
    lo_after, _ = s["eval_match_ci95_after"]
    _, hi_before = s["eval_match_ci95_before"]
    print(json.dumps({k: s[k] for k in s if k.startswith("eval_")} | {"phases": s["phase_seconds"]}, indent=1))
    assert lo_after > hi_before, (s["eval_match_rate_before"], s["eval_match_rate_after"])
    assert s["eval_match_rate_after"] >= 0.8 and s["eval_loss_after"] < s["eval_loss_before"]
    tok = transformers.AutoTokenizer.from_pretrained(s["saved"]["model"])
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
        s["saved"]["adapter"]).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(s["saved"]["model"], dtype=torch.float32).eval()
    ours = arlm.load(s["saved"]["model"])
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    for question in ("What is the capital of Peru?", "What sound does a frog make?"):
        ids = _hf_oracle.input_ids(tok.apply_chat_template([{"role": "user", "content": question}],
                                                           add_generation_prompt=True, tokenize=True, return_dict=False))
        out = arlm.generate(ours.config, ours.params, [ids], key=jax.random.PRNGKey(0), max_new_tokens=24,
                            stop_ids=ours.stop_ids)
        reply = [int(t) for t in np.asarray(out.tokens_BxN[0, :int(out.lengths_B[0])])]
        assert _hf_oracle.hf_greedy(with_adapter, ids, 24, eos) == reply == _hf_oracle.hf_greedy(merged, ids, 24, eos)
        assert tok.decode(reply).startswith("Ahoy!")


def test_dpo_lora_raises_held_out_preference_accuracy_and_margin(tmp_path):
    from arlm.data.bundled import bundled_path

    held_out = tmp_path / "pairs_test.jsonl"             # 16 of the 48 held-out pairs: each eval runs π_θ and π_ref
    held_out.write_text("".join(open(bundled_path("preferences_test"), encoding="utf-8").readlines()[:16]))
    s = run(_config("dpo", tmp_path / "dpo", steps=5, batch_size=4, learning_rate=2e-3, beta=0.1,
                    **{"lora.rank": 8, "eval.batch_size": 16, "data.eval": str(held_out)}))
    assert s["eval_accuracy_before"] == 0.0 and s["eval_margin_before"] == 0.0      # π_θ = π_ref at the start
    assert s["eval_accuracy_after"] > 0.9 and s["eval_margin_after"] > 1.0
    assert s["eval_loss_after"] < s["eval_loss_before"]
    assert s["eval_ref_logp_chosen_after"] == s["eval_ref_logp_chosen_before"]       # π_ref did not move
    assert os.path.exists(os.path.join(s["saved"]["adapter"], "adapter_model.safetensors"))
    print(json.dumps({k: s[k] for k in s if k.startswith("eval_")} | {"phases": s["phase_seconds"]}))


def test_continued_pretraining_lowers_held_out_perplexity(tmp_path):
    s = run(_config("pretrain", tmp_path / "pt", steps=3, batch_size=2, learning_rate=1e-4, save=False,
                    **{"data.seq_len": 128, "eval.batch_size": 32}))
    assert s["model"] == NAME and s["data"]["packing"] and s["data"]["padding_fraction"] < 0.35
    print(json.dumps({k: s[k] for k in s if k.startswith("eval_perplexity")} | {"phases": s["phase_seconds"]}))
    assert s["eval_perplexity_after"] < 0.8 * s["eval_perplexity_before"]
