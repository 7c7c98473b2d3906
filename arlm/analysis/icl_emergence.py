"""Open question 4: when does in-context learning appear as a model grows? Eq. 21 asks for
p_θ(y | P, x), the answer to x given in-context demonstrations P; here P is a mapping that exists
only in the context, so the weights cannot have memorised it, and small models are trained from
scratch over a grid of depth (n_layers) × width (d_model) × training steps.

Task (associative recall). Each sequence draws a fresh random mapping: K distinct keys from a key
sub-vocabulary and K distinct values from a disjoint value sub-vocabulary,

    BOS k_1 v_1 k_2 v_2 … k_K v_K  q_1 a_1 q_2 a_2 … q_Q a_Q,     a_j = v_i where q_j = k_i,

the queries q_j drawn uniformly with replacement from the K keys shown (P = the K pairs, x = q_j,
y = a_j). Training is plain next-token prediction (eq. 7) on every token; key tokens and first
values are unpredictable, so their loss is irreducible.

Accuracy is greedy: argmax_v p_θ(v | x_<t) over the whole vocabulary equals a_j, at every query
answer. Chance is 1/K, the accuracy of a model that knows which values the context holds but not
which key each belongs to (it is above 1/|values|, the accuracy of one that ignores the context).
Emergence: for each (depth, width, seed), the first evaluated step at which the 95% Wilson lower
bound of accuracy exceeds `margin` × chance (the Q answers of a sequence are counted as
independent trials, which makes the interval somewhat narrow). For a (depth, width) it is the step
by which every seed has emerged; None ("not within the steps") if one has not.

ICL score (in the spirit of Olsson et al. 2022: the loss where the context determines the token
minus the loss where it cannot yet):

    S = (1/|A|) Σ_{t∈A} −log p_θ(x_t | x_<t)  −  (1/|F|) Σ_{t∈F} −log p_θ(x_t | x_<t),        (nats)

A the query-answer positions, F the positions of the values' first occurrence (v_i in the pairs).
S < 0 means the context is used. Perfect recall with the best first-value predictions reaches
S* = −(1/K) Σ_{i<K} log(|values| − i); a binding-free model, which copies one of the context's K
values without knowing its key, reaches at best log K + S* (−0.47 nats for K = 4 of 8 values). S can
fall below S* when the first values are predicted worse than their optimum (uniform over the unused).

Each (depth, width, seed) model is trained once to max(eval_steps) with one Adam state throughout
and evaluated at every step of `eval_steps` on a fixed held-out set of sequences.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arlm.analysis.continual import Batch, Runner, mean_ci
from arlm.analysis.rates import Rate
from arlm.config import ModelConfig
from arlm.model import apply_model, init_params
from arlm.model.log_probs import token_log_probs
from arlm.objectives.lm import pretrain_loss
from arlm.sharding import MeshConfig
from arlm.train.state import TrainState, state_from_params

BOS = 0
CLAIM = ("open question 4: when does in-context learning, p_θ(y | P, x) with P the in-context demonstrations "
         "(eq. 21), appear as a model grows in depth, width and training steps?")


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Associative recall: `n_pairs` key→value pairs then `n_queries` queries, keys in
    [first_key, first_key + n_keys), values in [first_value, first_value + n_values), token 0 = BOS."""

    n_keys: int = 8
    n_values: int = 8
    n_pairs: int = 4
    n_queries: int = 8

    def __post_init__(self) -> None:
        if not 1 <= self.n_pairs <= min(self.n_keys, self.n_values):
            raise ValueError(f"n_pairs must be in [1, min(n_keys, n_values)], got {self.n_pairs} "
                             f"with {self.n_keys} keys and {self.n_values} values")
        if self.n_queries < 1:
            raise ValueError(f"n_queries must be ≥ 1, got {self.n_queries}")

    @property
    def first_key(self) -> int:
        return 1

    @property
    def first_value(self) -> int:
        return 1 + self.n_keys

    @property
    def vocab_size(self) -> int:
        return 1 + self.n_keys + self.n_values

    @property
    def seq_len(self) -> int:
        """Model input length T: the sequence (BOS + 2K + 2Q tokens) less its last token."""
        return 2 * (self.n_pairs + self.n_queries)

    @property
    def chance(self) -> float:
        """1/K: accuracy knowing the context's values but not their keys."""
        return 1.0 / self.n_pairs

    @property
    def ideal_score(self) -> float:
        """S of perfect recall: 0 at the answers minus the best first-value loss, the mean of
        log(|values| − i) over the pairs i (the values of a sequence are distinct)."""
        return -float(np.mean(np.log(self.n_values - np.arange(self.n_pairs))))

    @property
    def binding_free_score(self) -> float:
        """S of the best model that copies a value of the context without its key: log K at the answers."""
        return float(np.log(self.n_pairs)) + self.ideal_score


def task_of(cfg: Any) -> RecallTask:
    return RecallTask(n_keys=int(cfg.n_keys), n_values=int(cfg.n_values), n_pairs=int(cfg.n_pairs),
                      n_queries=int(cfg.n_queries))


def _distinct(rng: np.random.Generator, n_rows: int, pool: int, k: int) -> np.ndarray:
    """[n_rows, k] ints in [0, pool), distinct within each row, uniform."""
    return np.argsort(rng.random((n_rows, pool)), axis=1)[:, :k]


def recall_sequences(task: RecallTask, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """n sequences of the task, each with its own mapping: "tokens_BxS" (S = 1 + 2K + 2Q), and the
    drawn "keys_BxK", "values_BxK", "queries_BxQ" (indices into the K pairs), "answers_BxQ" tokens."""
    k, q = task.n_pairs, task.n_queries
    keys = task.first_key + _distinct(rng, n, task.n_keys, k)
    values = task.first_value + _distinct(rng, n, task.n_values, k)
    which = rng.integers(0, k, (n, q))
    answers = np.take_along_axis(values, which, axis=1)
    tokens = np.empty((n, 1 + 2 * (k + q)), np.int32)
    tokens[:, 0] = BOS
    tokens[:, 1:1 + 2 * k:2], tokens[:, 2:2 + 2 * k:2] = keys, values
    tokens[:, 1 + 2 * k::2], tokens[:, 2 + 2 * k::2] = np.take_along_axis(keys, which, axis=1), answers
    return {"tokens_BxS": tokens, "keys_BxK": keys.astype(np.int32), "values_BxK": values.astype(np.int32),
            "queries_BxQ": which.astype(np.int32), "answers_BxQ": answers.astype(np.int32)}


def target_masks(task: RecallTask) -> tuple[np.ndarray, np.ndarray]:
    """(answer_T, first_T): boolean masks over the T target positions; target t is token t + 1, so
    value i (token 2 + 2i) is target 1 + 2i and answer j (token 2 + 2K + 2j) is target 1 + 2K + 2j."""
    t = np.arange(task.seq_len)
    first = (t % 2 == 1) & (t < 2 * task.n_pairs)
    return (t % 2 == 1) & (t >= 2 * task.n_pairs), first


def lm_batch(task: RecallTask, n: int, rng: np.random.Generator) -> Batch:
    """A training batch for eq. 7: {"inputs", "targets"} int32 [n, T] of fresh sequences."""
    tokens = recall_sequences(task, n, rng)["tokens_BxS"]
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def eval_batch(task: RecallTask, n: int, seed: int) -> dict[str, np.ndarray]:
    """The held-out batch: lm_batch's fields plus "answer_mask_BxT" and "first_mask_BxT"."""
    batch = lm_batch(task, n, np.random.default_rng(seed))
    answer_T, first_T = target_masks(task)
    return batch | {"answer_mask_BxT": np.broadcast_to(answer_T, (n, task.seq_len)).copy(),
                    "first_mask_BxT": np.broadcast_to(first_T, (n, task.seq_len)).copy()}


def logp_and_argmax(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log p of each target (eq. 7's terms) and the greedy prediction at each position."""
    return token_log_probs(logits_BxTxV, targets_BxT), jnp.argmax(logits_BxTxV, axis=-1)


def icl_metrics(logp_BxT: np.ndarray, pred_BxT: np.ndarray, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Accuracy at the answers (Wilson 95%), their loss, the first-value loss, S and the mean loss."""
    logp, pred = np.asarray(logp_BxT, np.float64), np.asarray(pred_BxT)
    answer, first = batch["answer_mask_BxT"], batch["first_mask_BxT"]
    rate = Rate.of(pred[answer] == batch["targets"][answer])
    answer_loss, first_loss = float(-logp[answer].mean()), float(-logp[first].mean())
    return {"accuracy": rate.value, "ci95": list(rate.ci95), "k": rate.k, "n": rate.n,
            "answer_loss": answer_loss, "first_loss": first_loss, "icl_score": answer_loss - first_loss,
            "loss": float(-logp.mean())}


@functools.lru_cache(maxsize=8)
def _scorer(config: ModelConfig) -> Callable:
    return jax.jit(lambda params, inputs, targets: logp_and_argmax(apply_model(config, params, inputs).logits_BxTxV,
                                                                   targets))


def accuracy_and_score(config: ModelConfig, params: Any, batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """`icl_metrics` of the model on an `eval_batch`."""
    logp, pred = _scorer(config)(params, jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"]))
    return icl_metrics(np.asarray(logp), np.asarray(pred), batch)


class CheckpointRunner(Runner):
    """`Runner`'s compiled eq. 7 step, with the Adam state kept across chunks: `Runner.train` builds
    a fresh optimizer state on each call, so training in chunks through it would restart Adam's
    moments (and its bias correction) at every evaluation."""

    def start(self, params: Any) -> TrainState:
        trained = jax.tree_util.tree_map(jnp.copy, params)        # the step donates its state
        state, self._sharding = state_from_params(trained, self.optimizer, self.mesh, MeshConfig(data=1), seed=0)
        return state

    def advance(self, state: TrainState, batches: Iterator[Batch], steps: int) -> TrainState:
        """`steps` Adam updates of eq. 7 from `state` (one compiled step per config)."""
        cfg = self.config
        step = self._step(("icl_emergence",), lambda p, b: pretrain_loss(cfg, p, b), self._sharding, None)
        for _ in range(steps):
            state, _ = step(state, next(batches))
        return state


@functools.lru_cache(maxsize=8)
def checkpoint_runner(config: ModelConfig, lr: float) -> CheckpointRunner:
    """The `CheckpointRunner` of (config, lr), built once: the seeds of a grid point share its step."""
    return CheckpointRunner(config, lr)


@functools.lru_cache(maxsize=8)
def _initializer(config: ModelConfig) -> Callable:
    return jax.jit(functools.partial(init_params, config))


def fresh_params(config: ModelConfig, seed: int) -> Any:
    """`init_params` compiled once per config (eager init costs seconds per call on a CPU)."""
    return _initializer(config)(jax.random.PRNGKey(seed))


def model_config(cfg: Any, task: RecallTask, n_layers: int, d_model: int) -> ModelConfig:
    return ModelConfig.llama(vocab_size=task.vocab_size, d_model=int(d_model), n_layers=int(n_layers),
                             n_heads=int(cfg.n_heads), d_ff=int(cfg.ff_mult) * int(d_model), max_seq_len=task.seq_len)


def emergence_step(steps: Sequence[int], curve: Sequence[dict[str, Any]], threshold: float) -> int | None:
    """The first step whose accuracy's Wilson lower bound exceeds `threshold`; None if none does."""
    return next((int(s) for s, point in zip(steps, curve) if point["ci95"][0] > threshold), None)


def train_and_evaluate(cfg: Any, task: RecallTask, n_layers: int, d_model: int, seed: int,
                       held_out: dict[str, np.ndarray]) -> dict[str, Any]:
    """One model trained to max(eval_steps); `icl_metrics` at each eval step and its emergence step."""
    config = model_config(cfg, task, n_layers, d_model)
    trainer = checkpoint_runner(config, float(cfg.learning_rate))
    rng = np.random.default_rng(seed)
    batches = iter(lambda: lm_batch(task, int(cfg.batch_size), rng), None)
    state, done, curve = trainer.start(fresh_params(config, seed)), 0, []
    steps = sorted({int(s) for s in cfg.eval_steps})
    for s in steps:
        state = trainer.advance(state, batches, s - done)
        done = s
        curve.append(accuracy_and_score(config, state.params, held_out))
    return {"seed": int(seed), "curve": curve,
            "emergence_step": emergence_step(steps, curve, float(cfg.margin) * task.chance)}


def _aggregate(runs: list[dict[str, Any]], n_steps: int) -> dict[str, list[dict[str, float]]]:
    """mean_ci over seeds, per eval step, of accuracy, S and the losses."""
    keys = ("accuracy", "icl_score", "answer_loss", "first_loss", "loss")
    return {key: [mean_ci([r["curve"][i][key] for r in runs]) for i in range(n_steps)] for key in keys}


def summarize_point(n_layers: int, d_model: int, runs: list[dict[str, Any]], n_steps: int) -> dict[str, Any]:
    """One (depth, width): its runs, mean curves over seeds (if several) and the emergence step, the
    step by which every seed has emerged (None if one has not)."""
    per_seed = [r["emergence_step"] for r in runs]
    point: dict[str, Any] = {"n_layers": int(n_layers), "d_model": int(d_model), "runs": runs,
                             "emergence": {"step": None if None in per_seed else max(per_seed),
                                           "per_seed": per_seed,
                                           "seeds_emerged": sum(s is not None for s in per_seed)}}
    if len(runs) > 1:
        point["mean"] = _aggregate(runs, n_steps)
        if None not in per_seed:
            point["emergence"]["mean_ci"] = mean_ci([float(s) for s in per_seed])
    return point


def _describe(point: dict[str, Any], last: int) -> str:
    """"L=2 d=32: ICL on 2/3 seeds (at steps 1000, 800, –), final accuracy 1.00, 1.00, 0.26, S −1.46"."""
    e, runs = point["emergence"], point["runs"]
    steps = ", ".join("–" if s is None else str(s) for s in e["per_seed"])
    where = (f"ICL on {e['seeds_emerged']}/{len(runs)} seeds (at steps {steps})" if e["seeds_emerged"]
             else f"no ICL within {last} steps")
    finals = [r["curve"][-1] for r in runs]
    if len(runs) == 1:
        lo, hi = finals[0]["ci95"]
        acc = f"final accuracy {finals[0]['accuracy']:.2f} [{lo:.2f}, {hi:.2f}]"
    else:
        acc = "final accuracy per seed " + ", ".join(f"{f['accuracy']:.2f}" for f in finals)
    score = np.mean([f["icl_score"] for f in finals])
    return f"L={point['n_layers']} d={point['d_model']}: {where}, {acc}, S {score:+.2f}"


def verdict(summary: dict[str, Any]) -> str:
    """One sentence with the measured figures: where ICL appears (on how many seeds) and where it does not."""
    last, grid = summary["eval_steps"][-1], summary["grid"]
    some = [p for p in grid if p["emergence"]["seeds_emerged"]]
    every = [p for p in some if p["emergence"]["step"] is not None]
    head = (f"ICL appears on some seed at {len(some)} of {len(grid)} (depth, width) points within {last} steps "
            f"(on every seed at {len(every)})"
            + (f", at depths {sorted({p['n_layers'] for p in some})} only" if some else "")
            + f" (associative recall, chance 1/K = {summary['chance']:.2f}, ICL = accuracy's 95% lower bound > "
              f"{summary['threshold']:.2f})")
    return head + ": " + "; ".join(_describe(p, last) for p in grid)


def run(cfg: Any, progress: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Train every (n_layers, d_model, seed) and measure ICL at each of `cfg.eval_steps`; progress()
    after each trained model."""
    task = task_of(cfg)
    steps = sorted({int(s) for s in cfg.eval_steps})
    if not steps or steps[0] < 0:
        raise ValueError(f"eval_steps must be steps ≥ 0, got {cfg.eval_steps}")
    grid = []
    for n_layers in cfg.depths:
        for d_model in cfg.widths:
            runs = []
            for seed in cfg.seeds:
                held_out = eval_batch(task, int(cfg.eval_sequences), seed=10_000 + int(seed))
                runs.append(train_and_evaluate(cfg, task, int(n_layers), int(d_model), int(seed), held_out))
                progress()
            grid.append(summarize_point(int(n_layers), int(d_model), runs, len(steps)))
    out = {"eval_steps": steps, "depths": [int(d) for d in cfg.depths], "widths": [int(w) for w in cfg.widths],
           "seeds": [int(s) for s in cfg.seeds], "task": dataclasses.asdict(task), "vocab_size": task.vocab_size,
           "seq_len": task.seq_len, "chance": task.chance, "context_free_chance": 1.0 / task.n_values,
           "ideal_score": task.ideal_score, "binding_free_score": task.binding_free_score, "margin": float(cfg.margin),
           "threshold": float(cfg.margin) * task.chance, "grid": grid}
    out["claim"] = CLAIM
    out["verdict"] = verdict(out)
    return out
