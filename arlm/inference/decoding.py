"""`arlm.generate`: prefill, then a jit-compiled `lax.while_loop` of decode steps over the KV cache.

The loop carries a `DecodeState` (the cache, the next logits, the tokens so far, …). Streaming
(`on_token=`) drives the same compiled step from Python, one step per iteration, so each call
reaches only its own callback and nothing is shared between calls.

Eqs. 16–18: each step samples x_{t+1} ~ softmax(z_t/τ) (with optional top-k,
top-p, min-p truncation), appends its key/value to the cache (eq. 17), and
stops per row at EOS/stop tokens. Prompts longer than the window (eq. 18) lose
their head under the explicit "truncate" policy, with a warning.
"""

from __future__ import annotations

import dataclasses
import warnings
from functools import partial
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arlm.config import ModelConfig
from arlm.inference.cache import KVCache, forward_with_cache, grow_cache, init_cache
from arlm.inference.sampling import GREEDY, Sampler, check_int
from arlm.model.transformer import check_token_ids
from arlm.sharding import cache_spec

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    """tokens_BxN: generated ids (pad_id after a row stopped); lengths_B: tokens generated per row,
    the stop token included; log_probs_BxN: log π_θ(y_t | x, y_<t) of the chosen tokens under the
    model (τ = 1, no truncation; 0 after stop), the quantity alignment objectives recompute;
    sample_log_probs_BxN: the same under the distribution actually sampled from (τ, truncation);
    prompt_lengths_B: prompt tokens used after any truncation (eq. 18);
    prompt_BxP: the left-padded prompts the model actually read (pad_id before each row's start);
    completion_mask_BxN: True on generated tokens (the stop token included), False after a stop.
    With prompt_BxP and completion_mask_BxN a caller can score its own output exactly."""

    tokens_BxN: Array
    lengths_B: Array
    log_probs_BxN: Array
    sample_log_probs_BxN: Array
    prompt_lengths_B: Array
    prompt_BxP: Array | None = None
    completion_mask_BxN: Array | None = None


jax.tree_util.register_dataclass(
    GenerateOutput, data_fields=["tokens_BxN", "lengths_B", "log_probs_BxN", "sample_log_probs_BxN",
                                 "prompt_lengths_B", "prompt_BxP", "completion_mask_BxN"], meta_fields=[])


@flax.struct.dataclass
class DecodeState:
    """What one decode step reads and writes (the `lax.while_loop` carry).

    step: int32 index of the next token; cache: the KV cache (eq. 17); logits_BxV: float32 logits
    of the next token; key: PRNG key; tokens_BxN: ids so far (pad_id elsewhere); done_B: rows that
    emitted a stop token; log_probs_BxN / sample_log_probs_BxN: see `GenerateOutput`; lengths_B:
    tokens generated per row.
    """

    step: Array
    cache: KVCache
    logits_BxV: Array
    key: Array
    tokens_BxN: Array
    done_B: Array
    log_probs_BxN: Array
    sample_log_probs_BxN: Array
    lengths_B: Array


FIRST_SEGMENT = 64      # decode steps before the KV cache first grows (`cache_segments`)


def cache_segments(max_new_tokens: int, first: int = FIRST_SEGMENT) -> tuple[int, ...]:
    """The step counts n_0 < n_1 < … = max_new_tokens at which decoding grows its KV cache.

    Steps n_{j-1} … n_j − 1 run over a cache of P + n_j slots (P the padded prompt), so each step reads
    and attends over at most twice the slots that are filled (n_j = first · 2^j), instead of the
    P + max_new_tokens slots of one cache sized for the end. Each segment is its own compiled loop,
    so there are O(log(max_new_tokens / first)) of them.
    """
    ends, n = [], first
    while n < max_new_tokens:
        ends.append(n)
        n *= 2
    return (*ends, max_new_tokens)


def bucket_length(n: int, bucket: int | str) -> int:
    """The padded length for a longest prompt of n tokens: the next multiple of an int `bucket`,
    or, for bucket="pow2", the next power of two (at least 32), so a growing prompt touches only
    O(log n) lengths, i.e. O(log n) compilations of the decode loop."""
    if bucket == "pow2":
        return max(32, 1 << (n - 1).bit_length())
    if isinstance(bucket, str):
        raise ValueError(f"prompt_bucket must be a positive int or 'pow2', got {bucket!r}")
    bucket = check_int("prompt_bucket", bucket, minimum=1)
    return -(-n // bucket) * bucket


def pad_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]] | np.ndarray, max_new_tokens: int,
                *, pad_id: int = 0, overflow: str = "truncate", bucket: int | str = 8) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad ragged prompts to one length P, applying the overflow policy.

    P is the longest prompt rounded up by `bucket_length` (to a multiple of an int `bucket`, or to a
    power of two for bucket="pow2"), capped at the room the window Δ leaves after max_new_tokens.
    Returns (prompt_BxP int32, start_B int32: index of each row's first real token).
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    bucket_length(1, bucket)                               # reject a bad bucket before any work
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt must hold at least one token")
    check_token_ids(config, np.asarray([t for r in rows for t in r], np.int64))
    room = config.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the context "
                         f"window Δ = {config.max_seq_len}")
    longest = max(len(r) for r in rows)
    if longest > room:
        if overflow != "truncate":
            raise ValueError(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context "
                             f"window Δ = {config.max_seq_len} (overflow='error')")
        warnings.warn(f"prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the context window "
                      f"Δ = {config.max_seq_len}: keeping the last {room} prompt tokens; earlier ones lose all "
                      "influence (eq. 18)", stacklevel=3)
        rows = [r[-room:] for r in rows]
        longest = room
    width = min(bucket_length(longest, bucket), room)
    out = np.full((len(rows), width), pad_id, np.int32)
    start = np.zeros(len(rows), np.int32)
    for i, r in enumerate(rows):
        out[i, width - len(r):] = r
        start[i] = width - len(r)
    return out, start


def _on_mesh(cache_sharding: NamedSharding | None, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), under the cache's mesh when there is one, so activations follow `arlm.sharding`."""
    if cache_sharding is None:
        return fn(*args)
    with jax.sharding.use_abstract_mesh(cache_sharding.mesh.abstract_mesh):
        return fn(*args)


def _prefill(config: ModelConfig, params: Any, prompt_BxP: Array, start_B: Array, key: Array,
             max_new_tokens: int, pad_id: int, cache_sharding: NamedSharding | None) -> DecodeState:
    """Run the prompts through the model into a fresh cache of P + n_0 slots (`cache_segments`): the
    state before the first decode step."""
    b, p = prompt_BxP.shape
    n = max_new_tokens
    cache = _constrain(init_cache(config, b, p + cache_segments(n)[0], start_B), cache_sharding)
    # pad_id only marks padding in inputs/outputs; the model is fed token 0 there (never attended to),
    # so a pad_id outside [0, V) cannot put NaN embeddings into the cache.
    is_pad_BxP = jnp.arange(p, dtype=jnp.int32)[None, :] < start_B[:, None]
    logits, cache = forward_with_cache(config, params, cache, jnp.where(is_pad_BxP, 0, prompt_BxP),
                                       last_logits_only=True)
    return DecodeState(
        step=jnp.zeros((), jnp.int32), cache=cache, logits_BxV=logits[:, 0], key=key,
        tokens_BxN=jnp.full((b, n), pad_id, jnp.int32), done_B=jnp.zeros((b,), bool),
        log_probs_BxN=jnp.zeros((b, n), jnp.float32), sample_log_probs_BxN=jnp.zeros((b, n), jnp.float32),
        lengths_B=jnp.zeros((b,), jnp.int32))


def _decode_step(config: ModelConfig, params: Any, s: DecodeState, stop_ids: Array, sampler: Sampler,
                 pad_id: int, cache_sharding: NamedSharding | None) -> DecodeState:
    """One step of eqs. 16–17: sample x_{t+1} for the live rows, append its key/value, stop at stop ids."""
    key, sub = jax.random.split(s.key)
    live_B = ~s.done_B
    tok_B = jnp.where(s.done_B, pad_id, sampler(s.logits_BxV, sub))

    def chosen(log_probs_BxV: Array) -> Array:
        return jnp.where(live_B, jnp.take_along_axis(log_probs_BxV, tok_B[:, None], -1)[:, 0], 0.0)

    logits, cache = forward_with_cache(config, params, s.cache, jnp.where(live_B, tok_B, 0)[:, None])
    return DecodeState(
        step=s.step + 1, cache=_constrain(cache, cache_sharding), logits_BxV=logits[:, 0], key=key,
        tokens_BxN=s.tokens_BxN.at[:, s.step].set(tok_B),
        done_B=s.done_B | jnp.any(tok_B[:, None] == stop_ids[None, :], axis=-1),
        log_probs_BxN=s.log_probs_BxN.at[:, s.step].set(chosen(jax.nn.log_softmax(s.logits_BxV, -1))),
        sample_log_probs_BxN=s.sample_log_probs_BxN.at[:, s.step].set(chosen(sampler.log_probs(s.logits_BxV))),
        lengths_B=s.lengths_B + live_B.astype(jnp.int32))


def _decode(config: ModelConfig, params: Any, prompt_BxP: Array, start_B: Array, key: Array, stop_ids: Array,
            sampler: Sampler, max_new_tokens: int, pad_id: int, cache_sharding: NamedSharding | None) -> DecodeState:
    """Prefill, then decode up to `max_new_tokens` in `lax.while_loop`s that end when every row stopped:
    one loop per `cache_segments` segment, each over a cache grown to P + n_j slots."""
    s = _prefill(config, params, prompt_BxP, start_B, key, max_new_tokens, pad_id, cache_sharding)
    for end in cache_segments(max_new_tokens):
        s = _grown(s, prompt_BxP.shape[1] + end, cache_sharding)
        s = jax.lax.while_loop(
            lambda s, end=end: (s.step < end) & ~jnp.all(s.done_B),
            lambda s: _decode_step(config, params, s, stop_ids, sampler, pad_id, cache_sharding), s)
    return s


def _grown(s: DecodeState, size: int, cache_sharding: NamedSharding | None) -> DecodeState:
    """`s` with its cache grown to `size` slots (unchanged when it already has them)."""
    if s.cache.size == size:
        return s
    return s.replace(cache=_constrain(grow_cache(s.cache, size), cache_sharding))


@partial(jax.jit, static_argnames=("config", "sampler", "max_new_tokens", "pad_id", "cache_sharding"))
def _generate(config: ModelConfig, params: Any, prompt_BxP: Array, start_B: Array, key: Array,
              stop_ids: Array, *, sampler: Sampler, max_new_tokens: int, pad_id: int,
              cache_sharding: NamedSharding | None = None) -> DecodeState:
    """The final state without its KV cache, which the caller does not need and need not keep."""
    final = _on_mesh(cache_sharding, _decode, config, params, prompt_BxP, start_B, key, stop_ids, sampler,
                     max_new_tokens, pad_id, cache_sharding)
    return final.replace(cache=None)


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "pad_id", "cache_sharding"))
def _prefill_jit(config: ModelConfig, params: Any, prompt_BxP: Array, start_B: Array, key: Array, *,
                 max_new_tokens: int, pad_id: int, cache_sharding: NamedSharding | None = None) -> DecodeState:
    return _on_mesh(cache_sharding, _prefill, config, params, prompt_BxP, start_B, key, max_new_tokens, pad_id,
                    cache_sharding)


@partial(jax.jit, static_argnames=("config", "sampler", "pad_id", "cache_sharding"), donate_argnames=("s",))
def _step_jit(config: ModelConfig, params: Any, s: DecodeState, stop_ids: Array, *, sampler: Sampler, pad_id: int,
              cache_sharding: NamedSharding | None = None) -> DecodeState:
    return _on_mesh(cache_sharding, _decode_step, config, params, s, stop_ids, sampler, pad_id, cache_sharding)


@partial(jax.jit, static_argnames=("size", "cache_sharding"), donate_argnames=("s",))
def _grow_jit(s: DecodeState, *, size: int, cache_sharding: NamedSharding | None = None) -> DecodeState:
    return _on_mesh(cache_sharding, _grown, s, size, cache_sharding)


def _stream(config: ModelConfig, params: Any, prompt_BxP: Array, start_B: Array, key: Array, stop_ids: Array,
            sampler: Sampler, max_new_tokens: int, pad_id: int, cache_sharding: NamedSharding | None,
            on_token: Callable[[int, np.ndarray, np.ndarray], None]) -> DecodeState:
    """The same prefill and decode steps as `_decode`, driven from Python so that `on_token` sees each
    step as it is made: no callback from compiled code, no state shared between calls."""
    s = _prefill_jit(config, params, prompt_BxP, start_B, key, max_new_tokens=max_new_tokens, pad_id=pad_id,
                     cache_sharding=cache_sharding)
    ends = cache_segments(max_new_tokens)
    for i in range(max_new_tokens):
        live_B = ~np.asarray(s.done_B)
        if not live_B.any():
            break
        size = prompt_BxP.shape[1] + next(end for end in ends if end > i)
        if s.cache.size != size:
            s = _grow_jit(s, size=size, cache_sharding=cache_sharding)
        s = _step_jit(config, params, s, stop_ids, sampler=sampler, pad_id=pad_id, cache_sharding=cache_sharding)
        on_token(i, np.asarray(s.tokens_BxN[:, i]), live_B)
    return s


def _constrain(cache, sharding: NamedSharding | None):
    """Keep the cache's k and v laid out by the mesh rules (`arlm.sharding.cache_spec`)."""
    if sharding is None:
        return cache
    return cache.replace(k=jax.lax.with_sharding_constraint(cache.k, sharding),
                         v=jax.lax.with_sharding_constraint(cache.v, sharding))


def generate(
    config: ModelConfig,
    params: Any,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    key: Array,
    max_new_tokens: int = 64,
    sampler: Sampler = GREEDY,
    eos_id: int | None = None,
    stop_ids: Sequence[int] = (),
    pad_id: int = 0,
    overflow: str = "truncate",
    on_token: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    mesh: Mesh | None = None,
    prompt_bucket: int | str = 8,
) -> GenerateOutput:
    """Generate continuations for a batch of (ragged) prompts with a KV cache.

    Args:
      prompts: token-id lists of any lengths (or an int array [B, P]).
      key: PRNG key; the same key gives the same samples.
      max_new_tokens: an int ≥ 1 (numpy integers too; not a float, string or bool).
      sampler: `Sampler(temperature, top_k, top_p, min_p)`; the default is greedy.
      eos_id, stop_ids: a row stops after emitting any of these (the stop token is kept).
      overflow: "truncate" (drop the prompt's head to fit Δ, with a warning) or "error".
      on_token: streaming callback `on_token(step, tokens_B, live_B)` called after every decode
        step (`live_B` marks rows still generating). Streaming runs the same jit-compiled prefill
        and decode step as the `lax.while_loop`, one step per Python iteration.
      mesh: generate SPMD over this device mesh: pass params placed by its rules (e.g. a
        `Trainer`'s); prompts are split over data × fsdp and the KV cache follows
        `arlm.sharding.cache_spec` (rows like the batch, heads like wk/wv).
      prompt_bucket: the padded prompt length is a multiple of this int, or a power of two (≥ 32) for
        "pow2"; each distinct length compiles the decode loop once, so a conversation whose prompt
        keeps growing (experiments/chat.py) should use "pow2".
    """
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, minimum=1)
    if not isinstance(sampler, Sampler):
        raise TypeError(f"sampler must be an arlm.Sampler, got {type(sampler).__name__}")
    if overflow not in ("truncate", "error"):
        raise ValueError(f"overflow must be 'truncate' or 'error', got {overflow!r}")
    prompt_BxP, start_B = pad_prompts(config, prompts, max_new_tokens, pad_id=pad_id, overflow=overflow,
                                      bucket=prompt_bucket)
    stops = sorted({*map(int, stop_ids), *([] if eos_id is None else [int(eos_id)])}) or [-1]
    prompt, start = jnp.asarray(prompt_BxP), jnp.asarray(start_B)
    cache_sharding = None
    if mesh is not None:
        spec = cache_spec(mesh, prompt.shape[0], config.n_kv_heads)
        cache_sharding = NamedSharding(mesh, spec)
        rows = NamedSharding(mesh, P(spec[1]))
        prompt, start = jax.device_put(prompt, rows), jax.device_put(start, rows)
    stops_S = jnp.asarray(stops, jnp.int32)
    if on_token is None:
        final = _generate(config, params, prompt, start, key, stops_S, sampler=sampler,
                          max_new_tokens=max_new_tokens, pad_id=pad_id, cache_sharding=cache_sharding)
    else:
        final = _stream(config, params, prompt, start, key, stops_S, sampler, max_new_tokens, pad_id,
                        cache_sharding, on_token)
    tokens, lengths, logp, slogp = final.tokens_BxN, final.lengths_B, final.log_probs_BxN, final.sample_log_probs_BxN
    completion_mask_BxN = jnp.arange(max_new_tokens)[None, :] < lengths[:, None]
    return GenerateOutput(tokens, lengths, logp, slogp, jnp.asarray(prompt_BxP.shape[1] - start_B),
                          jnp.asarray(prompt_BxP), completion_mask_BxN)
