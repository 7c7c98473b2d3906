"""The training loop: resume, step, evaluate, log, checkpoint, with a progress bar.

Metrics of step s are read after step s+1 has been dispatched, so the host
never makes the device wait. A non-finite loss stops the run with an error
that names the step; the last checkpoint on disk is the last good one.

SIGTERM and SIGINT (a scheduler's preemption notice, Ctrl-C) do not kill the
run mid-step: the loop finishes the step in flight, saves a checkpoint, waits
for it to be on disk and returns with `LoopResult.interrupted` set; a rerun
resumes from it. A second signal while saving falls through to the default.
In a multi-process run the processes agree every `log_every` steps whether any of
them received a signal, and then all stop at the same step (a checkpoint save is
a collective: one process stopping alone would leave the others waiting).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from tqdm.auto import tqdm

from arlm import distributed
from arlm.train.checkpoint import Checkpointer
from arlm.train.metrics import MetricsWriter
from arlm.train.state import TrainState

Batch = dict[str, np.ndarray]


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite."""


@dataclasses.dataclass
class LoopConfig:
    total_steps: int
    eval_every: int = 100
    log_every: int = 10
    progress: bool = True
    # Stop (evaluate and checkpoint) after this many steps in all, keeping the schedule of
    # total_steps: an interruption that a rerun resumes from. None: run to total_steps.
    stop_after: int | None = None


@dataclasses.dataclass
class LoopResult:
    state: TrainState
    train_tokens: int
    train_seconds: float
    last_eval: dict[str, float]
    resumed_from: int | None
    steady_tokens_per_second: float
    interrupted: str | None = None     # the signal that stopped the run early, e.g. "SIGTERM"


@contextlib.contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """Yield a list that receives the name of any of `signals` as it arrives (main thread only)."""
    received: list[str] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signal.Signals(signum).name)
        for s in signals:                      # a second signal: default behaviour
            signal.signal(s, previous[s])

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield received
    finally:
        for s in signals:
            signal.signal(s, previous[s])


def run_training(
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict]],
    train_iter: Iterator[Batch],
    put_batch: Callable[[Batch], Any],
    cfg: LoopConfig,
    *,
    evaluate: Callable[[TrainState], dict[str, float]] | None = None,
    checkpointer: Checkpointer | None = None,
    data_state: Callable[[], dict] | None = None,
    restore_data: Callable[[dict], None] | None = None,
    writer: MetricsWriter | None = None,
) -> LoopResult:
    """Train until `cfg.total_steps`, resuming from `checkpointer`'s newest intact checkpoint if any
    (damaged newer ones are set aside with a warning, see `Checkpointer.restore`).

    `data_state()` returns the input pipeline's JSON position *before* the next
    batch is drawn; `restore_data(d)` rewinds the pipeline to it.
    """
    resumed_from = None
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, data = checkpointer.restore(state)
        if restore_data is not None and data:
            restore_data(data)
        resumed_from = int(state.step)
        if writer is not None:             # a crash after the checkpoint left records past it
            writer.truncate_after(resumed_from)

    start_step = int(state.step)
    end_step = cfg.total_steps if cfg.stop_after is None else min(cfg.stop_after, cfg.total_steps)
    bar = tqdm(total=cfg.total_steps, initial=start_step, disable=not cfg.progress, desc="train",
               dynamic_ncols=True)
    with stop_on_signals() as signals:
        result = _loop(state, train_step, train_iter, put_batch, cfg, bar, start_step, end_step, signals,
                       evaluate, checkpointer, data_state, writer)
    return dataclasses.replace(result, resumed_from=resumed_from)


def _loop(state, train_step, train_iter, put_batch, cfg, bar, start_step, end_step, signals,
          evaluate, checkpointer, data_state, writer) -> LoopResult:
    last_eval: dict[str, float] = {}
    interrupted: str | None = None
    pending: tuple[int, dict] | None = None
    tokens = 0
    t0 = time.perf_counter()
    t_steady = None              # after the first (compiling) step
    side_seconds = 0.0           # evaluation and checkpointing, excluded from throughput
    steady_tokens = 0
    for step in range(start_step, end_step):
        batch = next(train_iter)
        n_batch_tokens = batch_tokens(batch)
        tokens += n_batch_tokens
        state, metrics = train_step(state, put_batch(batch))
        if t_steady is None:
            jax.block_until_ready(metrics)
            t_steady = time.perf_counter()
        else:
            steady_tokens += n_batch_tokens
        if pending is not None:
            _report(pending, writer, bar, cfg)
        pending = (step, metrics)
        bar.update(1)
        done = step + 1
        if evaluate is not None and (done % cfg.eval_every == 0 or done == end_step):
            _report(pending, writer, bar, cfg)
            pending = None
            t_side = time.perf_counter()
            last_eval = evaluate(state)
            side_seconds += time.perf_counter() - t_side
            if writer is not None:
                writer.write(done, "val", last_eval)
            bar.write(f"step {done}: " + ", ".join(f"val_{k}={v:.4f}" for k, v in last_eval.items()))
        stop = _stop_requested(signals, done, end_step, cfg)
        final = done == end_step or stop
        if checkpointer is not None and (final or checkpointer.should_save(done)):
            if pending is not None:      # never save a state whose loss was not checked
                _report(pending, writer, bar, cfg)
                pending = None
            t_side = time.perf_counter()
            checkpointer.save(done, state, data_state() if data_state else None, force=True)
            side_seconds += time.perf_counter() - t_side
        if stop:
            interrupted = signals[0] if signals else "signal on another process"
            bar.write(f"{interrupted} received: stopped after step {done}"
                      + (", checkpoint saved" if checkpointer is not None else ""))
            break
    if pending is not None:
        _report(pending, writer, bar, cfg)
    if evaluate is not None and not last_eval and interrupted is None:    # e.g. rerun of a finished job
        last_eval = evaluate(state)
    jax.block_until_ready(state)
    t_end = time.perf_counter()
    bar.close()
    if checkpointer is not None:
        checkpointer.wait()
    steady = t_end - t_steady - side_seconds if t_steady is not None else 0.0
    return LoopResult(state, tokens, t_end - t0, last_eval, None,
                      steady_tokens / steady if steady > 0 else float("nan"),
                      interrupted=interrupted)


def batch_tokens(batch: Batch) -> int:
    """The tokens a batch trains on: every input of a token batch, the real (attended) tokens of a
    sequence batch, so padding does not count (packed and padded rows compare fairly)."""
    if "inputs" in batch:
        return int(np.prod(batch["inputs"].shape))
    return int(np.sum(batch["attention"]))


def _stop_requested(signals: list[str], done: int, end_step: int, cfg: LoopConfig) -> bool:
    """Whether to stop after step `done` on a signal: at once with one process; with several, at the
    next step that is a multiple of `log_every` (or the last), if any process received one."""
    if jax.process_count() == 1:
        return bool(signals)
    if done % cfg.log_every and done != end_step:
        return False
    return distributed.any_process(bool(signals))


def _report(pending: tuple[int, dict], writer: MetricsWriter | None, bar: tqdm, cfg: LoopConfig) -> None:
    step, metrics = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if values.get("skipped", 0.0) > 0:
        bar.write(f"step {step + 1}: non-finite loss {values['loss']} or gradient norm "
                  f"{values.get('grad_norm')}; update skipped (skip_nonfinite)")
    elif not (np.isfinite(values["loss"]) and np.isfinite(values.get("grad_norm", 0.0))):
        raise NonFiniteLossError(
            f"non-finite training loss {values['loss']} or gradient norm {values.get('grad_norm')} at step "
            f"{step + 1}; the last checkpoint on disk predates it (lower the learning rate or check the data, "
            "or set skip_nonfinite to skip such updates)")
    if (step + 1) % cfg.log_every == 0 or step == 0:
        bar.set_postfix(loss=f"{values['loss']:.3f}")
        if writer is not None:
            writer.write(step + 1, "train", values)
