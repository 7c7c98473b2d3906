"""How an alignment run talks to a model about the arithmetic task: prompt ids, decoding, stop token.

Two bindings: `char_task` (arlm's tiny character tokenizer, for a model SFT-ed here on CPU) and
`chat_task` (a loaded chat model such as SmolLM2-135M-Instruct, prompted through its chat template).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from arlm.alignment.tasks import ArithmeticTask, ArithmeticTokenizer, Problem
from arlm.alignment.verifiers import ExactMatch, NumericAnswer, Verifier
from arlm.inference import GREEDY, Sampler, generate
from arlm.model.log_probs import sequence_batch


@dataclasses.dataclass(frozen=True)
class TaskIO:
    task: ArithmeticTask
    encode_prompt: Callable[[Problem], list[int]]
    encode_answer: Callable[[Problem], list[int]]        # the reference response, stop token included
    decode: Callable[[Sequence[int]], str]
    verifier: Verifier
    eos_id: int
    pad_id: int
    max_new_tokens: int
    encode_text: Callable[[str], list[int]] | None = None     # raw text → ids (no specials), e.g. to force a token

    def prompts(self, problems: Sequence[Problem]) -> list[list[int]]:
        return [self.encode_prompt(p) for p in problems]

    def sft_batch(self, problems: Sequence[Problem]) -> dict[str, np.ndarray]:
        """The SFT (eq. 8) sequence batch of (prompt, reference answer) pairs: prompts left-padded to
        the longest, answers (stop token included) right-padded; response_mask marks the answers."""
        prompts = self.prompts(problems)
        answers = [self.encode_answer(p) for p in problems]
        width, n = max(map(len, prompts), default=0), max(map(len, answers), default=0)
        prompt_BxP = np.full((len(problems), width), self.pad_id, np.int32)
        answer_BxN = np.full((len(problems), n), self.pad_id, np.int32)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            prompt_BxP[i, width - len(p):] = p
            answer_BxN[i, :len(a)] = a
        start_B = np.asarray([width - len(p) for p in prompts], np.int32).reshape(-1)
        lengths_B = np.asarray([len(a) for a in answers], np.int32).reshape(-1)
        return sequence_batch(prompt_BxP, start_B, answer_BxN, lengths_B)

    def rewards(self, responses: Sequence[Sequence[int]], problems: Sequence[Problem]) -> np.ndarray:
        texts = [self.decode(r) for r in responses]
        return np.asarray([self.verifier(t, p.answer) for t, p in zip(texts, problems)], np.float32)


def responses(io: TaskIO, config: Any, params: Any, prompts: Sequence[Sequence[int]], key: Any, *,
              tau: float = 0.0, batch_size: int = 256) -> list[list[int]]:
    """Each prompt's generated ids (stop token included), greedy (τ = 0) or sampled at τ, `batch_size`
    prompts per `generate` call."""
    sampler = GREEDY if tau == 0 else Sampler(temperature=tau)
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        g = generate(config, params, list(prompts[i:i + batch_size]), key=jax.random.fold_in(key, i),
                     max_new_tokens=io.max_new_tokens, sampler=sampler, eos_id=io.eos_id, pad_id=io.pad_id)
        out += [list(r[:n]) for r, n in zip(np.asarray(g.tokens_BxN), np.asarray(g.lengths_B))]
    return out


def greedy_success(io: TaskIO, config: Any, params: Any, problems: Sequence[Problem],
                   key: Any) -> tuple[np.ndarray, list[list[int]]]:
    """The verifier's reward of each problem's greedy answer, [B], and those answers' token ids."""
    answers = responses(io, config, params, io.prompts(problems), key, batch_size=max(len(problems), 1))
    return io.rewards(answers, problems), answers


def char_task(task: ArithmeticTask, max_new_tokens: int = 6) -> TaskIO:
    tok = ArithmeticTokenizer()
    return TaskIO(task, lambda p: tok.encode(p.prompt, bos=True), lambda p: tok.encode(p.answer, eos=True),
                  tok.decode, ExactMatch(), tok.eos_id, tok.pad_id, max_new_tokens, tok.encode)


def chat_task(task: ArithmeticTask, loaded: Any, max_new_tokens: int = 16) -> TaskIO:
    tok = loaded.tokenizer

    def prompt(p: Problem) -> list[int]:
        return loaded.chat_prompt([{"role": "user", "content": f"What is {p.a} {p.op} {p.b}? "
                                                               "Reply with only the number."}])

    def decode(ids: Sequence[int]) -> str:
        return tok.decode([i for i in ids if i != tok.eos_id])

    return TaskIO(task, prompt, lambda p: tok.encode(p.answer) + [tok.eos_id], decode, NumericAnswer(),
                  tok.eos_id, tok.eos_id, max_new_tokens, tok.encode)
