"""Inference, eqs. 16–18: KV-cache generation, samplers, and differentiable sampling."""
from arlm.inference.cache import KVCache, forward_with_cache, init_cache
from arlm.inference.differentiable import (generated_log_prob, reinforce_surrogate, relaxed_rollout,
                                           rollout_hidden_states, score_function_gradient, sequence_log_prob)
from arlm.inference.decoding import GenerateOutput, generate
from arlm.inference.sampling import GREEDY, Sampler

__all__ = ["GREEDY", "GenerateOutput", "KVCache", "Sampler", "forward_with_cache", "generate", "generated_log_prob",
           "init_cache", "reinforce_surrogate", "relaxed_rollout", "rollout_hidden_states", "score_function_gradient",
           "sequence_log_prob"]
