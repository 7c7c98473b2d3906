"""Text in, text out, for the studies: batched generation (eq. 16) and batched log π(y | x) scoring
over a loaded model (`arlm.LoadedModel`: config, params, tokenizer, chat template).

A study builds prompts as chat messages; `prompt_ids` renders them with the checkpoint's chat
template when it has one (an instruct model), or as plain text otherwise (a tiny test model).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from arlm.checkpoints import LoadedModel
from arlm.inference import Sampler, generate
from arlm.inference.sampling import GREEDY
from arlm.model.log_probs import policy_outputs, sequence_batch

Messages = Sequence[dict[str, str]]


def prompt_ids(model: LoadedModel, messages: Messages | str, assistant_prefix: str = "", *,
               chat: bool = True) -> list[int]:
    """Token ids of a prompt: chat messages rendered by the model's template (and the start of the
    assistant's reply), or plain text when `chat` is False or the model has no template."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if chat and model.chat_template:
        ids = model.chat_prompt(list(messages), add_generation_prompt=True)
        return ids + (model.tokenizer.encode(assistant_prefix) if assistant_prefix else [])
    text = "\n".join(m["content"] for m in messages)
    return model.tokenizer.encode(text + assistant_prefix)


def sampler_at(tau: float, top_k: int | None = None) -> Sampler:
    """softmax(z/τ) sampling (eq. 16); τ = 0 is greedy."""
    return GREEDY if tau == 0 else Sampler(temperature=float(tau), top_k=top_k)


def generate_texts(model: LoadedModel, prompts: Sequence[Sequence[int]], *, tau: float, max_new_tokens: int,
                   key: jax.Array, batch_size: int = 32, stop_ids: Sequence[int] = (), progress: Any = None
                   ) -> list[str]:
    """One decoded completion per prompt (the stop token dropped), generated in batches of similar length."""
    eos = model.tokenizer.eos_id
    order = np.argsort([len(p) for p in prompts], kind="stable")
    out: list[str] = [""] * len(prompts)
    stop_ids = (*stop_ids, *getattr(model, "stop_ids", ()))     # the checkpoint's own stop ids too
    stops = {eos, *stop_ids}
    for b0 in range(0, len(order), batch_size):
        rows = order[b0:b0 + batch_size]
        batch = [prompts[i] for i in rows]
        batch += [batch[-1]] * (batch_size - len(batch))      # one batch shape: no recompilation
        key, sub = jax.random.split(key)
        g = generate(model.config, model.params, batch, key=sub, max_new_tokens=max_new_tokens,
                     sampler=sampler_at(tau), eos_id=eos, stop_ids=stop_ids)
        tokens, lengths = np.asarray(g.tokens_BxN), np.asarray(g.lengths_B)
        for r, i in enumerate(rows):
            ids = [int(x) for x in tokens[r, :lengths[r]]]
            if ids and ids[-1] in stops:
                ids = ids[:-1]
            out[i] = model.tokenizer.decode(ids)
        if progress is not None:
            progress.update(len(rows))
    return out


def continuation_log_probs(model: LoadedModel, prompts: Sequence[Sequence[int]],
                           continuations: Sequence[Sequence[int]], *, batch_size: int = 32,
                           progress: Any = None) -> np.ndarray:
    """log π_θ(y | x) = Σ_t log p_θ(y_t | x, y_<t) for each (prompt, continuation) pair; float64 [N]."""
    if len(prompts) != len(continuations):
        raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    if any(len(c) == 0 for c in continuations) or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt and continuation must hold at least one token")
    out = np.zeros(len(prompts), np.float64)
    for b0 in range(0, len(prompts), batch_size):
        idx = range(b0, min(b0 + batch_size, len(prompts)))
        p_len = max(len(prompts[i]) for i in idx)
        n_len = max(len(continuations[i]) for i in idx)
        p_len, n_len = -(-p_len // 32) * 32, -(-n_len // 8) * 8      # few distinct shapes to compile
        width = batch_size
        prompt = np.zeros((width, p_len), np.int32)
        start = np.full(width, p_len - 1, np.int32)
        resp = np.zeros((width, n_len), np.int32)
        lengths = np.zeros(width, np.int32)
        for r, i in enumerate(idx):
            prompt[r, p_len - len(prompts[i]):] = prompts[i]
            start[r] = p_len - len(prompts[i])
            resp[r, :len(continuations[i])] = continuations[i]
            lengths[r] = len(continuations[i])
        batch = sequence_batch(prompt, start, resp, lengths)
        logp = _sequence_logp(model.config, model.params, {k: jnp.asarray(v) for k, v in batch.items()})
        out[b0:b0 + len(idx)] = np.asarray(logp, np.float64)[:len(idx)]
        if progress is not None:
            progress.update(len(idx))
    return out


_sequence_logp = jax.jit(lambda config, params, batch: policy_outputs(config, params, batch).sequence_logp(),
                         static_argnums=0)


def progress_bar(total: int, desc: str):
    """A tqdm bar for a study's long loops."""
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
