"""Train on a researcher's own data: pretraining (eq. 7), SFT (eq. 8), DPO (eq. 13) and reward
modelling (eq. 11), one job, one generic train step (`arlm.train.step`), one registry of methods.

    python experiments/sft.py --config.model=M --config.data.train=FILE [--config.data.eval=FILE]
    python experiments/dpo.py --config.model=M --config.data.train=PAIRS --config.dpo.variant=ipo --config.beta=0.1
    python experiments/reward_model.py --config.model=M --config.data.train=PAIRS
    python experiments/pretrain.py --config.data.train=FILE [--config.model=M]    (continue M, or from scratch)

`run(config)` is what those commands call. The data walk: rows (`arlm.data.rows`: JSONL, JSON,
Parquet, text, save_to_disk folders, globs, mixtures) → TRL formats (`arlm.data.formats`) → the
model's tokenizer and chat template (`arlm.data.tokenize`) → a token store on disk
(`arlm.data.store`) → packed or padded rows and grain batches (`arlm.data.loader`). Training runs in
`arlm.train.loop.run_training`: a progress bar with ETA, metrics.jsonl and TensorBoard, orbax
checkpoints holding the data position (a rerun with the same workdir resumes exactly), and a
held-out evaluation before and after. Outputs in the workdir: summary.json, loss.png,
metrics.jsonl, tensorboard/, checkpoints/, data/ (the token stores), model/ (Hugging Face format,
any LoRA adapter merged), adapter/ (PEFT's format, with LoRA), reward_model/ (the reward job: backbone/ and head.safetensors),
samples_before.jsonl / samples_after.jsonl (with `eval.generate`).

Job → method of the registry (`arlm.alignment.methods`): pretrain and sft → "sft" (eq. 8; pretraining
scores every token, which is eq. 7), dpo → "dpo" with π_ref the start model; reward → the
Bradley–Terry loss of eq. 11 on a reward head (`arlm.objectives.heads`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from arlm import distributed
from arlm.alignment import methods
from arlm.config import ModelConfig
from arlm.data import pipeline
from arlm.data.bundled import FORMAT_REGEX
from arlm.data.formats import CANONICAL, ColumnMap, detect_format, normalize
from arlm.data.loader import PairRows, SequenceRows, fixed_batches, row_length, train_batches
from arlm.data.rows import RowError, read_rows
from arlm.data.store import TokenStore, build_store
from arlm.data.tokenize import DataReport, TextCodec, TokenizeConfig, prompt_tokens
from arlm.model.lora import LoraConfig
from arlm.objectives.heads import init_reward_model, pair_scores, reward_model_loss
from arlm.objectives.kl_regularized import preference_rows
from arlm.objectives.lm import response_nll
from arlm.objectives.preference import bradley_terry_loss, dpo_loss, dpo_margin
from arlm.sharding import batch_sharding, mesh_from_fields, named
from arlm.train.checkpoint import Checkpointer
from arlm.train.loop import LoopConfig, run_training
from arlm.train.metrics import MetricsWriter
from arlm.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from arlm.train.state import state_from_params
from arlm.train.step import make_train_step

__all__ = ["JOBS", "Job", "default_config", "run", "StartModel", "start_model", "load_reward_model"]


@dataclasses.dataclass(frozen=True)
class Job:
    """task: the token store's task; method: the registry's method (None: the reward model's eq. 11);
    completion_only: score completions and assistant turns only; truncation: the default policy."""

    task: str
    method: str | None
    completion_only: bool
    truncation: str
    default_data: str
    default_eval: str


JOBS: dict[str, Job] = {
    "pretrain": Job("sequences", "sft", False, "split", "bundled:text_train", "bundled:text_test"),
    "sft": Job("sequences", "sft", True, "error", "bundled:chat_train", "bundled:chat_test"),
    "dpo": Job("preference", "dpo", True, "error", "bundled:preferences_train", "bundled:preferences_test"),
    "reward": Job("preference", None, True, "error", "bundled:preferences_train", "bundled:preferences_test"),
}


def default_config(job: str) -> ml_collections.ConfigDict:
    """The defaults of one job (every field can be overridden as --config.FIELD=VALUE)."""
    if job not in JOBS:
        raise ValueError(f"unknown job {job!r}; expected one of {sorted(JOBS)}")
    j = JOBS[job]
    c = ml_collections.ConfigDict()
    c.job = job
    c.model = "" if job == "pretrain" else "smollm2-135m-instruct"   # anything arlm.load takes; "" = from scratch
    c.workdir = f"runs/{job}"
    c.seed = 0
    # sized for 2 CPU cores; on an accelerator raise steps and batch_size
    c.steps = {"pretrain": 200, "sft": 20, "dpo": 10, "reward": 20}[job]
    c.batch_size = 4
    # 0: chosen by run_learning_rate (pretrain: from scratch or continuing); LoRA adapters take larger steps
    c.learning_rate = {"pretrain": 0.0, "sft": 2e-3, "dpo": 2e-3, "reward": 1e-4}[job]
    c.warmup_steps = 2 if job in ("sft", "dpo") else 10
    c.min_lr_ratio = 0.1
    c.weight_decay = 0.0
    c.clip_norm = 1.0
    c.grad_accum = 1
    c.beta = 0.1                                   # DPO's β (eq. 13)
    c.dtype = ""                                   # "" keeps the model's; "bfloat16" for the matmuls
    # LoRA (eq. 24) on every projection by default for sft and dpo; rank 0: full fine-tuning
    c.lora = ml_collections.ConfigDict(dict(rank=8 if job in ("sft", "dpo") else 0, alpha=16.0, targets=""))
    c.dpo = ml_collections.ConfigDict(dict(variant="sigmoid", label_smoothing=0.0))
    c.data = ml_collections.ConfigDict(dict(
        train=j.default_data,
        eval="",                    # "": the bundled test set with the bundled default, else held out of train
        eval_fraction=0.1,          # held out: every k-th training row (k = 1/fraction)
        text_per="line" if job == "pretrain" else "file",   # text files: one document per line or per file
        max_length=0,               # longest example in tokens; 0: the model's context window
        seq_len=0,                  # row length; 0: the longest example rounded up to 64
        truncation=j.truncation,    # error | keep_start | keep_end | drop | split (text rows)
        on_error="error",           # error | skip (skipped rows are counted by reason in summary.json)
        packing=j.task == "sequences", completion_only=j.completion_only))
    c.data.columns = ml_collections.ConfigDict({k: "" for k in CANONICAL})   # your column for each field
    c.eval = ml_collections.ConfigDict(dict(
        every=0,                    # also evaluate every N steps (0: before and after only)
        batch_size=16, generate=24 if job in ("sft", "dpo") else 0,   # greedy replies to N held-out prompts
        max_new_tokens=48, match=FORMAT_REGEX if job in ("sft", "dpo") else ""))  # regex a reply must fullmatch
    if job == "pretrain":           # from scratch (model ""): the architecture and the tokenizer
        c.arch = ml_collections.ConfigDict(dict(
            family="llama", d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, max_seq_len=256,
            tie_embeddings=True, rope_theta=10000.0))
        c.data.tokenizer = "bytes"  # bytes | bpe (trained on the training rows) | a model name or path
        c.data.vocab_size = 2048    # bpe only
    c.log_every = 10
    c.checkpoint_every = 100
    c.keep_checkpoints = 2
    c.progress = True
    c.save = True
    c.stop_after = config_dict.placeholder(int)    # stop (and checkpoint) after N steps; a rerun resumes
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, param_sharding="replicate", num_devices=0))
    return c


# ----------------------------------------------------------------------------------------- the start model

@dataclasses.dataclass
class StartModel:
    config: ModelConfig
    params: Any
    codec: TextCodec
    loaded: Any = None          # the arlm.load result, when the job starts from a checkpoint
    name: str = ""


def start_model(cfg: ml_collections.ConfigDict, train_rows: Any = None) -> StartModel:
    """The model a job starts from: `cfg.model` loaded, or (pretraining) a fresh `cfg.arch` with the
    tokenizer `cfg.data.tokenizer` (bytes, a BPE trained on the training rows, or a model's)."""
    import arlm
    from arlm.data.tokenizers import ByteTokenizer, train_bpe
    from arlm.jobs.pretrain import model_config_from
    from arlm.model import init_params

    if cfg.model:
        loaded = arlm.load(cfg.model)
        config = loaded.config.replace(dtype=cfg.dtype) if cfg.dtype else loaded.config
        return StartModel(config, loaded.params, TextCodec.of(loaded), loaded, cfg.model)
    if cfg.job != "pretrain":
        raise ValueError(f"the {cfg.job} job fine-tunes a model: give --config.model (anything arlm.load takes)")
    name = cfg.data.tokenizer
    if name == "bytes":
        codec = TextCodec.of(ByteTokenizer())
    elif name == "bpe":
        texts = []
        for i in range(len(train_rows)):
            try:
                texts.append(str(train_rows[i].get("text", "")))
            except RowError:
                continue
            if sum(map(len, texts)) > 32 << 20:         # 32 MB of text is plenty for a BPE vocabulary
                break
        codec = TextCodec.of(train_bpe("\n".join(texts), cfg.data.vocab_size))
    else:
        codec = TextCodec.of(arlm.load(name, weights=False))
    fields = cfg.arch.to_dict()
    if cfg.dtype:
        fields["dtype"] = cfg.dtype
    config = model_config_from(ml_collections.ConfigDict(fields), codec.tokenizer.vocab_size)
    return StartModel(config, jax.device_get(init_params(config, jax.random.PRNGKey(cfg.seed))), codec, None,
                      f"{cfg.arch.family} from scratch ({name} tokenizer)")


# ----------------------------------------------------------------------------------------- data

def eval_spec(cfg: ml_collections.ConfigDict) -> str:
    """The eval data: `data.eval`, or with the bundled default training set its bundled test set ("" means
    hold out part of the training rows)."""
    job = JOBS[cfg.job]
    return cfg.data.eval or (job.default_eval if cfg.data.train == job.default_data else "")


def _columns(cfg: ml_collections.ConfigDict) -> ColumnMap:
    return ColumnMap.from_mapping({k: v for k, v in cfg.data.columns.to_dict().items() if v})


def _held_out(store: TokenStore, fraction: float) -> tuple[TokenStore, TokenStore]:
    """(train, eval): every k-th source row (k = round(1/fraction)) goes to eval, with all its pieces."""
    k = max(2, int(round(1.0 / fraction)))
    is_eval = (store.rows % k) == (k - 1)
    if not is_eval.any():
        is_eval[-1] = True
    held = store.subset(np.flatnonzero(is_eval))
    # the file's report (every row read, skipped or kept) stays with train; eval's counts its own examples
    held.report = DataReport(rows=int(np.unique(held.rows).size), kept=int(np.unique(held.rows).size),
                             examples=len(held), format=store.report.format)
    return store.subset(np.flatnonzero(~is_eval)), held


def _overlap(train: TokenStore, evals: TokenStore) -> float:
    """The fraction of eval examples whose tokens are also a training example."""
    def key(e: dict[str, np.ndarray]) -> bytes:
        return b"|".join(e[f].tobytes() for f in train.fields)
    seen = {key(train[i]) for i in range(len(train))}
    return sum(key(evals[i]) in seen for i in range(len(evals))) / max(len(evals), 1)


def prepare_data(cfg: ml_collections.ConfigDict, model: StartModel, train_rows: Any) -> dict[str, Any]:
    """Token stores (train, eval), the rows the loader batches, and the facts summary.json reports."""
    job = JOBS[cfg.job]
    d = cfg.data
    max_length = int(d.max_length or model.config.max_seq_len)
    if max_length > model.config.max_seq_len:
        raise ValueError(f"data.max_length = {max_length} exceeds the model's context window "
                         f"Δ = {model.config.max_seq_len}")
    tcfg = TokenizeConfig(max_length=max_length, truncation=d.truncation,
                          completion_only=job.completion_only and d.completion_only)
    columns = _columns(cfg)
    data_dir = os.path.join(cfg.workdir, "data")
    train = build_store(train_rows, model.codec, job.task, tcfg, columns=columns, on_error=d.on_error,
                        directory=os.path.join(data_dir, "train"))
    eval_source = eval_spec(cfg)
    if eval_source:
        evals = build_store(read_rows(eval_source, text_per=d.text_per), model.codec, job.task, tcfg, columns=columns,
                            on_error=d.on_error, directory=os.path.join(data_dir, "eval"))
    else:
        train, evals = _held_out(train, d.eval_fraction)
        eval_source = f"every {max(2, int(round(1 / d.eval_fraction)))}th training row"
    overlap = _overlap(train, evals)
    if overlap == 1.0:
        print(f"warning: every eval example also occurs in the training data ({eval_source}): the "
              "held-out figures measure memorisation, not generalisation", flush=True)
    elif overlap > 0:
        print(f"warning: {overlap:.1%} of the eval examples also occur in the training data", flush=True)
    if job.task == "sequences":
        longest = int(max(train.lengths("ids").max(), evals.lengths("ids").max()))
        seq_len = int(d.seq_len or row_length(longest, max_length))
        train_rows_, eval_rows_ = (SequenceRows(s, seq_len, pack=d.packing) for s in (train, evals))
    else:
        pairs = [PairRows(s) for s in (train, evals)]
        seq_len = max(p.length for p in pairs)
        train_rows_, eval_rows_ = (PairRows(s, seq_len) for s in (train, evals))
    return {"train": train, "eval": evals, "train_rows": train_rows_, "eval_rows": eval_rows_, "seq_len": seq_len,
            "max_length": max_length, "tokenize": tcfg, "eval_source": eval_source, "eval_overlap": overlap}


# ----------------------------------------------------------------------------------------- objective and steps

def _lora(cfg: ml_collections.ConfigDict) -> LoraConfig | None:
    if not cfg.lora.rank:
        return None
    targets = tuple(t.strip() for t in cfg.lora.targets.split(",") if t.strip()) or None
    return LoraConfig(rank=cfg.lora.rank, alpha=cfg.lora.alpha, targets=targets)


SCRATCH_LEARNING_RATE, CONTINUING_LEARNING_RATE = 3e-3, 1e-4


def run_learning_rate(cfg: ml_collections.ConfigDict) -> float:
    """The peak learning rate a run uses: cfg.learning_rate, or for 0 one chosen by whether the run starts from
    scratch (cfg.model "") or continues a model, known only once the command line has set cfg.model."""
    return cfg.learning_rate or (CONTINUING_LEARNING_RATE if cfg.model else SCRATCH_LEARNING_RATE)


class _Trainable:
    """The job's trainable params, frozen weights, compiled train step and evaluation, on one mesh."""

    def __init__(self, cfg: ml_collections.ConfigDict, model: StartModel, mesh: Any) -> None:
        job = JOBS[cfg.job]
        self.cfg, self.model, self.mesh = cfg, model, mesh
        optim = OptimConfig(learning_rate=run_learning_rate(cfg), warmup_steps=min(cfg.warmup_steps, cfg.steps),
                            total_steps=cfg.steps, min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay,
                            clip_norm=cfg.clip_norm, grad_accum=cfg.grad_accum)
        optimizer = make_optimizer(optim)
        self.batch_sharding = batch_sharding(mesh)
        ref = model.params
        self.lora = _lora(cfg)
        if job.method is None:                                  # the reward model (eq. 11)
            if self.lora is not None:
                raise ValueError("the reward job trains the whole reward model; set lora.rank=0")
            self.objective = None
            params0 = init_reward_model(ref, model.config)

            def loss_fn(rm, batch):
                return reward_model_loss(model.config, rm, batch)
            self.state, sharding = state_from_params(params0, optimizer, mesh, _mesh_cfg(cfg), cfg.seed)
            self._step = make_train_step(loss_fn, optimizer, sharding, self.batch_sharding,
                                         grad_accum=cfg.grad_accum, lr_schedule=learning_rate_schedule(optim))
            self.frozen = None
        else:
            options = {"variant": cfg.dpo.variant, "label_smoothing": cfg.dpo.label_smoothing} \
                if job.method == "dpo" else {}
            self.objective = methods.make_objective(job.method, model.config, cfg.beta, lora=self.lora, **options)
            params0 = self.objective.init_params(ref, jax.random.PRNGKey(cfg.seed))
            frozen_sharding = named(mesh, _param_specs({"ref": ref}, mesh, cfg))
            self.frozen = jax.device_put({"ref": ref}, frozen_sharding)
            self.state, sharding = state_from_params(params0, optimizer, mesh, _mesh_cfg(cfg), cfg.seed)
            self._step = make_train_step(self.objective.loss, optimizer, sharding, self.batch_sharding,
                                         grad_accum=cfg.grad_accum, lr_schedule=learning_rate_schedule(optim),
                                         frozen_sharding=frozen_sharding)
            self._prepare = jax.jit(self.objective.prepare, out_shardings=self.batch_sharding) \
                if job.method == "dpo" else None
        self.state_sharding = sharding
        self._eval = jax.jit(self._eval_batch)

    def train_step(self, state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        if self.frozen is None:
            return self._step(state, batch)
        if self._prepare is not None:
            batch = self._prepare(state.params, batch, self.frozen, jax.random.PRNGKey(0))
        return self._step(state, batch, self.frozen)

    def put(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return distributed.put_batch(batch, self.batch_sharding)

    def model_params(self, params: Any) -> Any:
        """The model π_θ (LoRA merged), for generation and saving."""
        if self.objective is None:
            return params["backbone"]
        return self.objective.policy.model_params(params, self.frozen)

    def _eval_batch(self, params: Any, frozen: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-batch evaluation sums; the frozen weights are an argument (never constants of the program)."""
        if self.objective is None:
            return {"scores_Bx2": pair_scores(self.model.config, params, batch)}
        if JOBS[self.cfg.job].task == "sequences":
            nll, m = response_nll(self.objective.policy.outputs(params, frozen, batch))
            return {"nll_sum": nll * m["tokens"], "tokens": m["tokens"]}
        rows = preference_rows(batch)
        logp = self.objective.policy.outputs(params, frozen, rows).sequence_logp().reshape(-1, 2)
        ref = self.objective.policy.reference_outputs(frozen, rows).sequence_logp().reshape(-1, 2)
        return {"logp_Bx2": logp, "ref_Bx2": ref}

    def evaluate(self, params: Any, batches: list[dict[str, jax.Array]], n_rows: int) -> dict[str, float]:
        outs = jax.device_get([self._eval(params, self.frozen, b) for b in batches])
        if "nll_sum" in outs[0]:
            tokens = float(sum(o["tokens"] for o in outs))
            loss = float(sum(o["nll_sum"] for o in outs)) / max(tokens, 1.0)
            return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
        if "scores_Bx2" in outs[0]:
            r = np.concatenate([o["scores_Bx2"] for o in outs])[:n_rows]
            return {"loss": float(np.mean(np.asarray(bradley_terry_loss(jnp.asarray(r[:, 0]), jnp.asarray(r[:, 1]))))),
                    "accuracy": float(np.mean(r[:, 0] > r[:, 1])), "reward_margin": float(np.mean(r[:, 0] - r[:, 1]))}
        logp = np.concatenate([o["logp_Bx2"] for o in outs])[:n_rows]
        ref = np.concatenate([o["ref_Bx2"] for o in outs])[:n_rows]
        margin = np.asarray(dpo_margin(logp[:, 0], logp[:, 1], ref[:, 0], ref[:, 1]))
        losses = dpo_loss(jnp.asarray(margin), self.cfg.beta, self.cfg.dpo.variant, self.cfg.dpo.label_smoothing)
        return {"loss": float(np.mean(np.asarray(losses))), "accuracy": float(np.mean(margin > 0)),
                "margin": float(np.mean(margin)), "reward_margin": float(self.cfg.beta * np.mean(margin)),
                "logp_accuracy": float(np.mean(logp[:, 0] > logp[:, 1])),
                "ref_logp_chosen": float(np.mean(ref[:, 0]))}          # π_ref's own log-prob: must never move


def _mesh_cfg(cfg: ml_collections.ConfigDict):
    from arlm.sharding import MeshConfig
    fields = cfg.mesh.to_dict()
    fields.pop("num_devices", None)
    return MeshConfig(**fields)


def _param_specs(tree: Any, mesh: Any, cfg: ml_collections.ConfigDict) -> Any:
    from arlm.model.partitioning import param_specs
    return param_specs(tree, mesh, _mesh_cfg(cfg))


# ----------------------------------------------------------------------------------------- generation eval

def _eval_prompts(cfg: ml_collections.ConfigDict, model: StartModel, eval_rows: Any, n: int,
                  indices: Any = None) -> list[np.ndarray]:
    """The prompts of the first `n` held-out rows (`indices` of `eval_rows`, default all), as the model reads
    them before it replies."""
    columns = _columns(cfg)
    tcfg = TokenizeConfig(max_length=model.config.max_seq_len, truncation="error")
    prompts, fmt = [], None
    for i in (range(len(eval_rows)) if indices is None else indices):
        if len(prompts) == n:
            break
        try:
            row = columns.apply(eval_rows[i])
            fmt = fmt or detect_format(row)
            ex = normalize(row, fmt)
        except RowError:
            continue
        if ex.format.kind == "language_modeling" and ex.messages is not None:
            first = next((k for k, m in enumerate(ex.messages) if m["role"] == "assistant"), None)
            if not first:
                continue
            ex = dataclasses.replace(ex, prompt=ex.messages[:first])
        if ex.prompt is None:
            continue
        prompts.append(prompt_tokens(model.codec, ex, tcfg))
    return prompts


def _replies(model: StartModel, params: Any, prompts: list[np.ndarray], max_new_tokens: int) -> list[str]:
    from arlm.inference import generate

    stop = model.loaded.stop_ids if model.loaded is not None else (model.codec.eos_id,)
    out: list[str] = []
    for start in range(0, len(prompts), 16):
        chunk = [list(map(int, p)) for p in prompts[start:start + 16]]
        g = generate(model.config, params, chunk, key=jax.random.PRNGKey(0), max_new_tokens=max_new_tokens,
                     eos_id=model.codec.eos_id, stop_ids=stop)
        tokens, lengths = np.asarray(g.tokens_BxN), np.asarray(g.lengths_B)
        for row, n in zip(tokens, lengths):
            ids = [int(t) for t in row[:n] if int(t) not in stop]
            out.append(model.codec.tokenizer.decode(ids))
    return out


def _generation_eval(cfg, model: StartModel, params: Any, prompts: list[np.ndarray], path: str) -> dict[str, Any]:
    from arlm.analysis.rates import wilson_interval

    replies = _replies(model, params, prompts, cfg.eval.max_new_tokens)
    pattern = re.compile(cfg.eval.match, re.DOTALL) if cfg.eval.match else None
    matches = [bool(pattern.fullmatch(r.strip())) for r in replies] if pattern else []
    with open(path, "w", encoding="utf-8") as f:
        for p, r, ok in zip(prompts, replies, matches or [None] * len(replies)):
            f.write(json.dumps({"prompt": model.codec.tokenizer.decode([int(t) for t in p]), "reply": r,
                                "match": ok}, ensure_ascii=False) + "\n")
    if not pattern:
        return {"n": len(replies)}
    k = sum(matches)
    return {"match_rate": k / max(len(replies), 1), "match_ci95": list(wilson_interval(k, len(replies))),
            "matches": k, "n": len(replies)}


# ----------------------------------------------------------------------------------------- the job

def _data_spec(spec: str, cfg: ml_collections.ConfigDict) -> Any:
    if not spec:
        raise ValueError("give the training data: --config.data.train=FILE (JSONL, JSON, Parquet, text, a "
                         "save_to_disk folder, a glob, or a@w,b@w for a mixture)")
    return read_rows(spec, text_per=cfg.data.text_per)


def run(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Train, evaluate before and after, checkpoint, save and report; returns summary.json's contents."""
    wall0 = time.perf_counter()
    phases: dict[str, float] = {}
    mark = [wall0]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 2)
        mark[0] = now

    cfg = config
    if cfg.job not in JOBS:
        raise ValueError(f"unknown job {cfg.job!r}; expected one of {sorted(JOBS)}")
    job = JOBS[cfg.job]
    main = distributed.is_main_process()
    os.makedirs(cfg.workdir, exist_ok=True)
    train_source = _data_spec(cfg.data.train, cfg)
    model = start_model(cfg, train_source)
    phase("load_model")
    data = prepare_data(cfg, model, train_source)
    phase("tokenize")
    mesh = mesh_from_fields(cfg.mesh.to_dict())
    trainable = _Trainable(cfg, model, mesh)

    eval_batches = [trainable.put(distributed.local_rows(b))
                    for b in fixed_batches(data["eval_rows"], cfg.eval.batch_size)]
    n_eval = len(data["eval_rows"])

    def evaluate(state) -> dict[str, float]:
        return trainable.evaluate(state.params, eval_batches, n_eval)

    before = evaluate(trainable.state)
    phase("eval_before")
    if not cfg.eval.generate:
        prompts = []
    elif eval_spec(cfg):
        prompts = _eval_prompts(cfg, model, read_rows(eval_spec(cfg), text_per=cfg.data.text_per), cfg.eval.generate)
    else:                                    # the training rows held out for evaluation
        prompts = _eval_prompts(cfg, model, train_source, cfg.eval.generate, np.unique(data["eval"].rows).tolist())
    gen_before = _generation_eval(cfg, model, trainable.model_params(trainable.state.params), prompts,
                                  os.path.join(cfg.workdir, "samples_before.jsonl")) if prompts and main else None
    phase("generate_before")

    train_iter = pipeline.iterate(train_batches(data["train_rows"], cfg.batch_size, cfg.seed,
                                                process_index=jax.process_index(), process_count=jax.process_count()))
    checkpointer = Checkpointer(os.path.join(cfg.workdir, "checkpoints"), save_every=cfg.checkpoint_every,
                                keep=cfg.keep_checkpoints)
    writer = MetricsWriter(cfg.workdir) if main else None
    if writer is not None and checkpointer.latest_step() is None:
        writer.truncate_after(-1)          # a fresh run keeps no records of an earlier one in this workdir
        writer.write(0, "val", before)
    try:
        result = run_training(
            trainable.state, trainable.train_step, train_iter, trainable.put,
            LoopConfig(total_steps=cfg.steps, eval_every=cfg.eval.every or cfg.steps, log_every=cfg.log_every,
                       progress=cfg.progress and main, stop_after=cfg.get("stop_after")),
            evaluate=evaluate, checkpointer=checkpointer,
            data_state=lambda: pipeline.iterator_state_to_json(train_iter),
            restore_data=lambda s: pipeline.restore_iterator(train_iter, s), writer=writer)
    finally:
        if writer is not None:
            writer.close()
        checkpointer.close()
    phase("train")
    state = result.state
    summary: dict[str, Any] = {
        "job": cfg.job, "model": model.name, "method": job.method or "bradley_terry (eq. 11)",
        "steps": int(state.step), "complete": int(state.step) == cfg.steps, "resumed_from": result.resumed_from, "interrupted": result.interrupted,
        "tokens": int(result.train_tokens), "train_tokens_per_second": result.steady_tokens_per_second,
        "lora": None if trainable.lora is None else dataclasses.asdict(trainable.lora),
        "data": {"train": data["train"].report.to_json(), "eval": data["eval"].report.to_json(),
                 "eval_source": data["eval_source"], "eval_overlap_fraction": data["eval_overlap"],
                 "train_examples": len(data["train"]), "eval_examples": len(data["eval"]),
                 "seq_len": data["seq_len"], "max_length": data["max_length"],
                 "truncation": cfg.data.truncation, "packing": bool(job.task == "sequences" and cfg.data.packing),
                 "rows_per_epoch": len(data["train_rows"]),
                 "padding_fraction": getattr(data["train_rows"], "padding_fraction", None)},
    }
    skipped = {split: dict(data[split].report.skipped) for split in ("train", "eval")}
    summary["rows_skipped"] = {"total": sum(sum(v.values()) for v in skipped.values()), **skipped}
    if result.interrupted:
        summary["wall_seconds"] = time.perf_counter() - wall0
        if main:
            _write_json(os.path.join(cfg.workdir, "summary.json"), summary)
        return summary
    after = result.last_eval or evaluate(state)
    for k in before:
        summary[f"eval_{k}_before"], summary[f"eval_{k}_after"] = before[k], after[k]
    params = state.params if jax.process_count() == 1 else distributed.gather(state.params)
    if not main:
        return summary
    if prompts:
        gen_after = _generation_eval(cfg, model, trainable.model_params(params), prompts,
                                     os.path.join(cfg.workdir, "samples_after.jsonl"))
        for k in gen_after:
            summary[f"eval_{k}_before"], summary[f"eval_{k}_after"] = gen_before[k], gen_after[k]
        phase("generate_after")
    if cfg.save:
        summary["saved"] = _save(cfg, model, trainable, params)
        phase("save")
    from arlm.jobs.pretrain import plot_loss_curve
    plot_loss_curve(os.path.join(cfg.workdir, "metrics.jsonl"), os.path.join(cfg.workdir, "loss.png"),
                    title=f"{cfg.job} on {cfg.data.train} ({model.name})",
                    ylabel="DPO loss" if cfg.job == "dpo" else "Bradley–Terry loss" if cfg.job == "reward"
                    else "cross-entropy on scored tokens (nats/token)")
    summary["wall_seconds"] = time.perf_counter() - wall0
    summary["phase_seconds"] = phases        # train includes its compile and the final evaluation
    _write_json(os.path.join(cfg.workdir, "summary.json"), summary)
    return summary


def _save(cfg: ml_collections.ConfigDict, model: StartModel, trainable: _Trainable, params: Any) -> dict[str, str]:
    from arlm.checkpoints.peft_adapter import save_peft_adapter

    saved = {}
    host = jax.device_get(params)
    if trainable.objective is None:                              # the reward model: backbone + head
        directory = os.path.join(cfg.workdir, "reward_model")
        _save_model(os.path.join(directory, "backbone"), model, host["backbone"])
        from safetensors.numpy import save_file
        save_file({k: np.asarray(v, np.float32).reshape(-1) for k, v in host["head"].items()},
                  os.path.join(directory, "head.safetensors"))
        saved["reward_model"] = directory
        return saved
    merged = jax.device_get(trainable.model_params(params))
    saved["model"] = _save_model(os.path.join(cfg.workdir, "model"), model, merged)
    if trainable.lora is not None:
        saved["adapter"] = save_peft_adapter(os.path.join(cfg.workdir, "adapter"), model.config, trainable.lora,
                                             host["policy"], base_model=model.name,
                                             architecture=getattr(model.loaded, "architecture", None))
    return saved


def _save_model(directory: str, model: StartModel, params: Any) -> str:
    from arlm.checkpoints.hf import save_hf
    from arlm.data.tokenizers import BPETokenizer

    if model.loaded is not None:         # keeps the tokenizer, chat template and stop ids
        return dataclasses.replace(model.loaded, params=params, config=model.config).save_hf(directory)
    tok = model.codec.tokenizer
    return save_hf(directory, model.config, params, tok if isinstance(tok, BPETokenizer) else None)


def load_reward_model(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, reward-model params) saved by the reward job, for `reward_model_scores`."""
    from safetensors.numpy import load_file

    from arlm.checkpoints.hf import load_hf_dir

    config, backbone, _ = load_hf_dir(os.path.join(directory, "backbone"))
    head = load_file(os.path.join(directory, "head.safetensors"))
    return config, {"backbone": backbone, "head": {"w": head["w"], "b": head["b"].reshape(())}}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, default=float)
