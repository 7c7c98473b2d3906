"""Eqs. 23–24 at CPU scale: how much of corpus A each continual-learning penalty keeps while a model
learns corpus B (the paper's open question 2: which Ω forgets least?).

One run per seed: pretrain a small byte-level model on A (the bundled KJV text) to θ^(k); then train
copies of θ^(k) on B (integer additions, "17+25=42") for the same steps on the same batches, one arm
per (Ω, λ) of `arlm.objectives.continual` plus LoRA-only arms (eq. 24). Each arm reports

    forgetting = L_A(θ) − L_A(θ^(k))      (rise of A's validation loss, nats per token)
    learning   = L_B(θ^(k)) − L_B(θ)      (fall of B's validation loss)

and the frontier plot draws forgetting against learning, one curve per Ω over λ. "At equal learning"
compares an arm with λ = 0 only where its learning is within `tolerance` nats of λ = 0's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from arlm.config import ModelConfig
from arlm.data.corpus import load_corpus
from arlm.model import init_params
from arlm.model.lora import LoraConfig, init_lora, merge_lora
from arlm.objectives.continual import fisher_diagonal, penalized
from arlm.objectives.lm import pretrain_loss
from arlm.sharding import MeshConfig, batch_sharding, make_mesh, replicated
from arlm.train.state import state_from_params
from arlm.train.step import make_train_step

Array = jax.Array
Batch = dict[str, np.ndarray]
BYTE_VOCAB = 256


@dataclasses.dataclass(frozen=True)
class Arm:
    """One phase-2 run: penalty `omega` with weight `lam`, or (lora_rank > 0) a LoRA adapter only."""

    omega: str = "none"
    lam: float = 0.0
    lora_rank: int = 0

    @property
    def name(self) -> str:
        return f"lora r={self.lora_rank}" if self.lora_rank else f"{self.omega} λ={self.lam:g}"

    @property
    def family(self) -> str:
        return "lora" if self.lora_rank else ("none" if self.lam == 0 else self.omega)


def byte_tokens(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("ascii", "replace"), np.uint8).astype(np.int32)


def corpus_a(n_chars: int) -> np.ndarray:
    """The first n_chars of the bundled KJV text, as bytes."""
    return byte_tokens(load_corpus("kjv")[:n_chars])


def corpus_b(n_problems: int, max_operand: int, seed: int) -> np.ndarray:
    """n_problems lines "a+b=c" with a, b uniform in [0, max_operand], as bytes."""
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, max_operand + 1, (2, n_problems))
    return byte_tokens("".join(f"{x}+{y}={x + y}\n" for x, y in zip(a, b)))


def split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def _windows_at(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    """The windows of seq_len + 1 tokens at `starts`: {"inputs", "targets"} int32 [len(starts), seq_len]."""
    w = np.stack([tokens[s:s + seq_len + 1] for s in starts])
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}


def windows(tokens: np.ndarray, batch: int, seq_len: int, rng: np.random.Generator) -> Batch:
    """`batch` random windows."""
    return _windows_at(tokens, rng.integers(0, len(tokens) - seq_len - 1, batch), seq_len)


def val_windows(tokens: np.ndarray, n: int, seq_len: int) -> Batch:
    """n evenly spaced validation windows (the same for every arm)."""
    return _windows_at(tokens, np.linspace(0, len(tokens) - seq_len - 2, n).astype(int), seq_len)


def one_device_mesh():
    """A mesh over the first device: the CPU-sized studies train one small model at a time."""
    return make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])


class Runner:
    """Compiled train and eval steps for one model config, reused by every arm (λ is an argument) and,
    through `runner`, by every seed."""

    def __init__(self, config: ModelConfig, lr: float) -> None:
        self.config = config
        self.optimizer = optax.adam(lr)
        self.mesh = one_device_mesh()
        self._steps: dict[Any, Callable] = {}
        self._eval = jax.jit(lambda p, b: pretrain_loss(config, p, b)[1]["nll"])

    def nll(self, params: Any, batch: Batch) -> float:
        return float(self._eval(params, batch))

    def _step(self, key: Any, loss: Callable, state_sharding: Any, frozen: Any) -> Callable:
        if key not in self._steps:
            frozen_sharding = jax.tree_util.tree_map(lambda _: replicated(self.mesh), frozen)
            self._steps[key] = make_train_step(loss, self.optimizer, state_sharding, batch_sharding(self.mesh),
                                               frozen_sharding=frozen_sharding)
        return self._steps[key]

    def train(self, params: Any, batches: Iterator[Batch], steps: int, *, omega: str = "none",
              continual: dict[str, Any] | None = None, lora: LoraConfig | None = None,
              key: Array | None = None) -> Any:
        """`steps` Adam updates of eq. 7 (+ λ Ω, or of a LoRA adapter on frozen params); returns the
        model params."""
        cfg = self.config
        if lora is not None:
            base = jax.tree_util.tree_map(jnp.copy, params)
            frozen: Any = {"base": base}

            def loss(adapter, batch, fr):
                return pretrain_loss(cfg, merge_lora(lora, fr["base"], adapter), batch)
            trained = init_lora(lora, params, key)
            step_key: Any = ("lora", lora)
        else:
            if omega == "none" or continual is None:       # Ω = 0 reads nothing: one compiled step for all
                continual = {"lam": jnp.zeros((), jnp.float32)}
            frozen = {"continual": continual, "task": None}
            loss = penalized(lambda p, b: pretrain_loss(cfg, p, b), omega, None, cfg)
            trained = jax.tree_util.tree_map(jnp.copy, params)      # the step donates its state
            step_key = ("omega", omega)
        state, sharding = state_from_params(trained, self.optimizer, self.mesh, MeshConfig(data=1), seed=0)
        step = self._step(step_key, loss, sharding, frozen)
        for _ in range(steps):
            state, _ = step(state, next(batches), frozen)
        if lora is not None:
            return merge_lora(lora, base, state.params)
        return state.params


@functools.lru_cache(maxsize=8)
def runner(config: ModelConfig, lr: float) -> Runner:
    """The `Runner` of (config, lr), built once: seeds of one study share its compiled steps."""
    return Runner(config, lr)


def mean_ci(values: list[float]) -> dict[str, float]:
    """Mean and a 95% Student-t interval over seeds."""
    x = np.asarray(values, np.float64)
    half = (float(scipy.stats.t.ppf(0.975, len(x) - 1)) * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1
            else float("nan"))
    return {"mean": float(x.mean()), "lo": float(x.mean() - half), "hi": float(x.mean() + half), "n": len(x)}


def run_seed(cfg: Any, seed: int, arms: list[Arm], progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Pretrain on A, then every arm on B; the per-arm losses of one seed."""
    config = ModelConfig.llama(vocab_size=BYTE_VOCAB, d_model=cfg.d_model, n_layers=cfg.n_layers,
                               n_heads=cfg.n_heads, d_ff=cfg.d_ff, max_seq_len=cfg.seq_len)
    a_train, a_val = split(corpus_a(cfg.corpus_chars))
    b_train, b_val = split(corpus_b(cfg.b_problems, cfg.max_operand, seed=1000 + seed))
    va, vb = val_windows(a_val, cfg.val_windows, cfg.seq_len), val_windows(b_val, cfg.val_windows, cfg.seq_len)
    arms_runner = runner(config, cfg.learning_rate_b)
    rng_a = np.random.default_rng(seed)
    anchor = runner(config, cfg.learning_rate).train(init_params(config, jax.random.PRNGKey(seed)),
                          iter(lambda: windows(a_train, cfg.batch_size, cfg.seq_len, rng_a), None), cfg.steps_a)
    progress()
    la0, lb0 = arms_runner.nll(anchor, va), arms_runner.nll(anchor, vb)
    fisher_rng = np.random.default_rng(10_000 + seed)
    fisher = fisher_diagonal(config, anchor, [windows(a_train, cfg.batch_size, cfg.seq_len + 1, fisher_rng)["inputs"]
                                              for _ in range(cfg.fisher_batches)])
    earlier = windows(a_train, cfg.batch_size, cfg.seq_len, np.random.default_rng(20_000 + seed))["inputs"]
    rows = []
    for arm in arms:
        rng_b = np.random.default_rng(30_000 + seed)           # every arm sees the same B batches
        batches = iter(lambda: windows(b_train, cfg.batch_size, cfg.seq_len, rng_b), None)
        if arm.lora_rank:
            params = arms_runner.train(anchor, batches, cfg.steps_b, key=jax.random.PRNGKey(seed),
                                  lora=LoraConfig(rank=arm.lora_rank, alpha=2.0 * arm.lora_rank))
        else:
            continual = {"anchor": jax.tree_util.tree_map(jnp.copy, anchor), "fisher": fisher,
                         "earlier_BxT": jnp.asarray(earlier), "lam": jnp.asarray(arm.lam, jnp.float32)}
            params = arms_runner.train(anchor, batches, cfg.steps_b, omega=arm.omega if arm.lam else "none",
                                       continual=continual)
        la, lb = arms_runner.nll(params, va), arms_runner.nll(params, vb)
        rows.append({"arm": arm.name, "family": arm.family, "omega": arm.omega, "lam": arm.lam,
                     "lora_rank": arm.lora_rank, "forgetting": la - la0, "learning": lb0 - lb,
                     "loss_a": la, "loss_b": lb})
        progress()
    return {"seed": seed, "loss_a_anchor": la0, "loss_b_anchor": lb0, "arms": rows}


def arms_of(cfg: Any) -> list[Arm]:
    arms = [Arm("none", 0.0)]
    for omega, lams in (("l2", cfg.lams_l2), ("ewc", cfg.lams_ewc), ("representation", cfg.lams_representation)):
        arms += [Arm(omega, float(lam)) for lam in lams]
    return arms + [Arm(lora_rank=int(r)) for r in cfg.lora_ranks]


def summarize(runs: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    """Per-arm means and intervals over seeds, and each Ω's forgetting at (nearly) λ = 0's learning."""
    names = [r["arm"] for r in runs[0]["arms"]]
    arms = []
    for i, name in enumerate(names):
        per_seed = [run["arms"][i] for run in runs]
        arms.append({k: per_seed[0][k] for k in ("arm", "family", "omega", "lam", "lora_rank")}
                    | {"forgetting": mean_ci([r["forgetting"] for r in per_seed]),
                       "learning": mean_ci([r["learning"] for r in per_seed])})
    equal = {}
    for family in ("l2", "ewc", "representation", "lora"):
        wins = []
        for run in runs:
            base = next(r for r in run["arms"] if r["family"] == "none")
            close = [r for r in run["arms"] if r["family"] == family and r["learning"] >= base["learning"] - tolerance]
            if close:
                best = min(close, key=lambda r: r["forgetting"])
                wins.append({"seed": run["seed"], "arm": best["arm"], "forgetting": best["forgetting"],
                             "learning": best["learning"], "baseline_forgetting": base["forgetting"],
                             "baseline_learning": base["learning"],
                             "forgets_less": best["forgetting"] < base["forgetting"]})
            else:
                wins.append({"seed": run["seed"], "arm": None, "forgets_less": False})
        equal[family] = wins
    return {"arms": arms, "at_equal_learning": equal, "tolerance": tolerance}
