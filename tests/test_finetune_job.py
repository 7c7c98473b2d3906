"""The user-data jobs (`arlm.jobs.finetune`) end to end on a tiny chat model: SFT with LoRA (PEFT adapter,
exact resume mid-epoch), DPO (π_ref untouched, held-out margin up), the Bradley–Terry reward model,
pretraining from scratch through the command line, and bad rows counted in summary.json. The SmolLM2
acceptance runs are in test_finetune_smollm2.py (slow)."""

from __future__ import annotations

import _hf_oracle  # noqa: F401  (first: offline mode)

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import arlm
from _tiny_chat import tiny_chat_dir, write_jsonl
from arlm.jobs.finetune import default_config, load_reward_model, run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_chat_dir(str(tmp_path_factory.mktemp("tiny_chat")))


def _config(job, model, workdir, **fields):
    c = default_config(job)
    c.model, c.workdir, c.progress = model, str(workdir), False
    c.mesh.num_devices = 1
    c.batch_size, c.eval.batch_size, c.log_every = 4, 16, 1
    c.warmup_steps, c.lora.rank, c.eval.generate = 10, 0, 0       # what these tests measured; fields override
    c.update({k: v for k, v in fields.items() if "." not in k})
    for k, v in fields.items():
        if "." in k:
            section, name = k.split(".")
            c[section][name] = v
    return c


def _files(directory):
    return {name: open(os.path.join(directory, name), "rb").read() for name in sorted(os.listdir(directory))
            if name.endswith((".safetensors", ".json"))}


def test_sft_with_lora_resumes_mid_epoch_bitwise_and_writes_everything(tiny, tmp_path):
    fields = {"steps": 6, "learning_rate": 3e-3, "checkpoint_every": 2, "lora.rank": 4, "eval.generate": 4,
              "eval.max_new_tokens": 8}
    whole = run(_config("sft", tiny, tmp_path / "whole", **fields))
    assert whole["steps"] == 6 and whole["data"]["rows_per_epoch"] > 6 * 4        # mid-epoch
    for key in ("eval_loss_before", "eval_loss_after", "tokens", "rows_skipped", "eval_match_rate_before"):
        assert key in whole, key
    assert whole["eval_loss_after"] < whole["eval_loss_before"]
    assert whole["rows_skipped"] == {"total": 0, "train": {}, "eval": {}}
    assert whole["data"]["packing"] and whole["data"]["eval_source"] == "bundled:chat_test"
    for name in ("summary.json", "loss.png", "metrics.jsonl", "tensorboard", "checkpoints", "samples_after.jsonl",
                 "model/model.safetensors", "model/chat_template.jinja", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert os.path.exists(tmp_path / "whole" / name), name
    part = run(_config("sft", tiny, tmp_path / "resumed", stop_after=3, **fields))
    assert part["steps"] == 3 and not part["complete"] and whole["complete"]
    resumed = run(_config("sft", tiny, tmp_path / "resumed", **fields))
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 6
    assert _files(tmp_path / "whole" / "adapter") == _files(tmp_path / "resumed" / "adapter")
    assert _files(tmp_path / "whole" / "model") == _files(tmp_path / "resumed" / "model")
    train_losses = lambda d: [(r["step"], r["loss"]) for r in map(json.loads, open(d / "metrics.jsonl"))  # noqa: E731
                              if r["split"] == "train"]
    assert train_losses(tmp_path / "whole") == train_losses(tmp_path / "resumed")
    assert resumed["eval_loss_after"] == whole["eval_loss_after"]


def test_peft_loads_the_adapter_onto_the_base_model(tiny, tmp_path):
    """transformers + peft on the base model give the logits of arlm's merged model (and of DIR/model/)."""
    peft = pytest.importorskip("peft")
    torch, transformers = _hf_oracle.import_oracle()
    from arlm.checkpoints.peft_adapter import load_peft_adapter
    from arlm.model.lora import init_lora, merge_lora, LoraConfig
    from arlm.checkpoints.peft_adapter import save_peft_adapter

    m = arlm.load(tiny)
    lora_cfg = LoraConfig(rank=3, alpha=5.0)
    lora = init_lora(lora_cfg, m.params, jax.random.PRNGKey(0))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), lora)   # b ≠ 0
    save_peft_adapter(str(tmp_path / "adapter"), m.config, lora_cfg, lora, base_model=tiny)
    ids = m.chat_prompt([{"role": "user", "content": "What is 2 plus 6?"}])
    ours = np.asarray(arlm.forward(m.config, merge_lora(lora_cfg, m.params, lora), np.asarray([ids])))[0]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(_hf_oracle.hf_logits(model, ids), ours, rtol=1e-4, atol=1e-4)
    back_cfg, back = load_peft_adapter(str(tmp_path / "adapter"), m.config)
    assert back_cfg.rank == 3 and back_cfg.scale == lora_cfg.scale
    np.testing.assert_array_equal(np.asarray(merge_lora(back_cfg, m.params, back)["layers"]["attn"]["wq"]),
                                  np.asarray(merge_lora(lora_cfg, m.params, lora)["layers"]["attn"]["wq"]))
    with pytest.raises(ValueError, match="GPT-2 style"):
        save_peft_adapter(str(tmp_path / "x"), arlm.ModelConfig.gpt2(vocab_size=8, d_model=8, n_layers=1, n_heads=2,
                                                                     d_ff=8, max_seq_len=8), lora_cfg, lora)


def test_dpo_raises_the_held_out_margin_and_leaves_pi_ref_alone(tiny, tmp_path):
    ref = arlm.load(tiny).params
    s = run(_config("dpo", tiny, tmp_path / "dpo", steps=8, learning_rate=1e-2, beta=0.5, **{"dpo.variant": "ipo"}))
    assert s["eval_margin_before"] == 0.0 and s["eval_accuracy_before"] == 0.0     # π_θ = π_ref at the start
    assert s["eval_margin_after"] > 0 and s["eval_accuracy_after"] > 0.5
    assert s["eval_loss_after"] < s["eval_loss_before"]
    assert jax.tree.all(jax.tree.map(np.array_equal, arlm.load(tiny).params, ref))   # the start model, unchanged
    trained = arlm.load(str(tmp_path / "dpo" / "model")).params
    assert not np.array_equal(trained["layers"]["attn"]["wq"], ref["layers"]["attn"]["wq"])


def test_reward_model_learns_the_preference_and_reloads(tiny, tmp_path):
    from arlm.objectives.heads import reward_model_scores
    from arlm.data.loader import PairRows, fixed_batches
    from arlm.data.rows import read_rows
    from arlm.data.store import build_store
    from arlm.data.tokenize import TextCodec, TokenizeConfig
    from arlm.objectives.kl_regularized import preference_rows

    s = run(_config("reward", tiny, tmp_path / "rm", steps=10, learning_rate=3e-3))
    assert s["eval_accuracy_after"] > 0.9 and s["eval_loss_after"] < s["eval_loss_before"]
    config, rm = load_reward_model(s["saved"]["reward_model"])
    store = build_store(read_rows("bundled:preferences_test"), TextCodec.of(arlm.load(tiny)), "preference",
                        TokenizeConfig(max_length=256))
    batch = fixed_batches(PairRows(store), len(store))[0]
    r = np.asarray(reward_model_scores(config, rm, preference_rows(batch))).reshape(-1, 2)
    assert np.mean(r[:, 0] > r[:, 1]) == pytest.approx(s["eval_accuracy_after"])


def test_pretrain_command_from_scratch_on_a_user_file_with_bad_rows_skipped(tmp_path):
    """`experiments/pretrain.py --config.data.train=FILE` trains from scratch with the byte tokenizer; a
    broken line and an empty text are skipped and counted by reason, and eval loss falls."""
    lines = [json.dumps({"text": t}) for t in open(os.path.join(REPO, "arlm/data/bundled/text_train.txt"),
                                                   encoding="utf-8").read().splitlines()[:120]]
    lines[5], lines[9] = "{not json", json.dumps({"text": "  "})
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cmd = [sys.executable, os.path.join(REPO, "experiments", "pretrain.py"),
           f"--config.data.train={tmp_path / 'docs.jsonl'}", "--config.data.eval=", "--config.data.on_error=skip",
           "--config.data.tokenizer=bytes", "--config.steps=25", f"--config.workdir={tmp_path / 'run'}",
           "--config.arch.d_model=32", "--config.arch.n_layers=1", "--config.arch.d_ff=64",
           "--config.batch_size=4", "--config.mesh.num_devices=1", "--config.progress=false"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["model"].startswith("llama from scratch (bytes") and s["steps"] == 25
    assert s["rows_skipped"]["total"] == 2 and s["rows_skipped"]["train"] == {"not_json": 1, "empty_field": 1}
    assert s["data"]["eval_source"].startswith("every 10th") and s["data"]["eval_overlap_fraction"] == 0.0
    assert s["eval_loss_after"] < s["eval_loss_before"] - 1.0
    assert arlm.load(str(tmp_path / "run" / "model")).config.vocab_size == 257


def test_an_eval_file_equal_to_the_train_file_is_reported(tiny, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(8)]
    path = write_jsonl(tmp_path / "same.jsonl", rows)
    s = run(_config("sft", tiny, tmp_path / "same", steps=1, save=False, **{"data.train": path, "data.eval": path}))
    assert s["data"]["eval_overlap_fraction"] == 1.0
    with pytest.raises(ValueError, match="no usable row .it has no rows"):
        write_jsonl(tmp_path / "empty.jsonl", [])
        run(_config("sft", tiny, tmp_path / "empty", steps=1, **{"data.train": str(tmp_path / "empty.jsonl")}))
