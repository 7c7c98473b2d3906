"""The analysis half of the paper (eqs. 19–22): each phenomenon measured on a model, one module each.

  intermediates  every layer's residual, attention, sublayer outputs and the logit lens (eqs. 1–6)
  trace          the first experiment: one generation step from ids to a sample (eqs. 1–6, 16)
  drift          Jacobian blocks J_ℓ(t, s), their spectra matrix-free, finite perturbations (eq. 19)
  hallucination  Hall(θ), the temperature sweep, error injection (eq. 19)
  sycophancy     flip rates and log-odds shifts under a user's opinion (eq. 20)
  icl            accuracy against k demonstrations, random labels, the ICL score (eq. 21)
  cot            p(y|x) = Σ_c p(c|x) p(y|x,c) exactly and by Monte Carlo (eq. 22)
  retrieval      lexical and hidden-state retrievers, RAG accuracy (eq. 22)
  studies        each study as one command (`experiments/phenomena.py`): summary.json and a plot
"""

from arlm.analysis.intermediates import Intermediates, logit_lens, run_with_cache
from arlm.analysis.rates import Rate, wilson_interval

__all__ = ["Intermediates", "Rate", "logit_lens", "run_with_cache", "wilson_interval"]
