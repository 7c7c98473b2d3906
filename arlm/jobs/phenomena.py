"""Each claim of the paper's analysis half as one study: run on a loaded model, return `summary.json`'s
dict, and draw its plot (`arlm.analysis.plots`). `experiments/phenomena.py --config.study=S` runs one.

Every summary carries "claim" (what the paper says, with its equation) and "verdict" (what this
measurement says about it), so a refuted claim is reported as plainly as a confirmed one.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from arlm.alignment.verifiers import ContainsAnswer
from arlm.analysis import alignment_drift as drift_lab
from arlm.analysis import continual as continual_lab
from arlm.analysis import icl_emergence as icl_lab
from arlm.analysis import sycophancy_frontier as frontier_lab
from arlm.analysis import contractive as contractive_lab
from arlm.analysis import cot, drift, hallucination, icl, items as item_sets, plots, retrieval, sycophancy
from arlm.analysis.rates import Rate
from arlm.analysis.textgen import progress_bar
from arlm.analysis.trace import trace_step
from arlm.checkpoints import LoadedModel, load
from arlm.model import embed_tokens

Study = Callable[[LoadedModel, Any, jax.Array], dict[str, Any]]


def _items(cfg: Any, study: str, default: str, limit: int = 0) -> list[dict[str, Any]]:
    """The study's items (the user's file or the bundled default), the first n_items (or `limit`) of them."""
    rows = item_sets.load_items(cfg.item_file or default, study)
    n = cfg.n_items or limit
    return rows[:n] if n else rows


def trace(model: LoadedModel, cfg: Any, key: jax.Array) -> dict[str, Any]:
    """First experiment 1: one generation step, ids → embeddings → layers → logits → softmax(z/τ) →
    sample."""
    ids = model.tokenizer.encode(cfg.prompt)
    tr = trace_step(model.config, model.params, ids, tau=cfg.tau, key=key, top=10)
    dec = model.tokenizer.decode
    return {"claim": "one step maps ids through eqs. 1–6 to softmax(z/τ), a distribution that sums to 1 (eq. 16)",
            "verdict": f"probabilities sum to {tr['prob_sum']:.9f}",
            "prompt": cfg.prompt, "tokens": [dec([t]) for t in ids], "tau": cfg.tau,
            "prob_sum": tr["prob_sum"], "sampled": dec([tr["sampled"]]),
            "top": [{"token": dec([i]), "prob": p} for i, p in zip(tr["top_ids"], tr["top_probs"])],
            "residual_norms": tr["residual_norms"], "attention_out_norms": tr["attention_out_norms"],
            "mlp_out_norms": tr["mlp_out_norms"], "logit_lens_top": [dec([t]) for t in tr["lens_top"]],
            "embedding_norms": tr["embedding_norms"]}


def temperature(model: LoadedModel, cfg: Any, key: jax.Array) -> dict[str, Any]:
    """First experiment 3 and eq. 19: accuracy, Hall(θ) and distinct-n against τ; error injection."""
    rows = _items(cfg, "temperature", "capital_questions", limit=cfg.temperature_items)
    verifier = ContainsAnswer()
    k1, k2 = jax.random.split(key)
    sweep = hallucination.temperature_sweep(model, rows, verifier, key=k1, taus=tuple(cfg.taus),
                                            samples_per_item=cfg.samples_per_item, max_new_tokens=cfg.max_new_tokens,
                                            batch_size=cfg.batch_size, progress=True)
    inj = hallucination.error_injection(model, rows, verifier, key=k2, max_new_tokens=cfg.max_new_tokens,
                                        batch_size=cfg.batch_size, progress=True)
    acc = sweep["accuracy"]
    falls = all(a >= b - 1e-12 for a, b in zip(acc, acc[1:]))
    sweep.update(
        claim="higher τ raises diversity and hallucination (first experiment 3, eq. 19); an early error "
              "propagates rather than being corrected (eq. 19)",
        verdict=(f"accuracy {acc[0]:.2f} at τ={sweep['tau'][0]} → {acc[-1]:.2f} at τ={sweep['tau'][-1]} "
                 f"({'monotone' if falls else 'not monotone'}); distinct-2 {sweep['distinct_2'][0]:.2f} → "
                 f"{sweep['distinct_2'][-1]:.2f}; after a forced wrong token the continuation follows the error "
                 f"in {inj['follow_rate']:.2f} of {inj['n_injected']} cases"),
        error_injection=inj, n_items=len(rows))
    return sweep


def drift_study(model: LoadedModel, cfg: Any, key: jax.Array) -> dict[str, Any]:
    """Eq. 19: top singular values of J_ℓ(t, s) under each normalisation, and finite perturbations."""
    mc = model.config
    ids = model.tokenizer.encode(cfg.prompt)
    t_last = len(ids) - 1
    emb = embed_tokens(mc, model.params, jnp.asarray([ids], jnp.int32))[0]
    layers = [layer for layer in cfg.layers if layer <= mc.n_layers]
    pairs = [(t_last, t_last)] + [(t_last, t_last - d) for d in cfg.offsets if 0 < d <= t_last]
    L, T, S = drift.block_grid(layers, pairs)
    out: dict[str, Any] = {"prompt": cfg.prompt, "layers": layers, "pairs": [list(p) for p in pairs], "k": cfg.k,
                           "band": list(cfg.band), "top_singular_values": {}, "fraction_near_unit": {}}
    bar = progress_bar(len(cfg.normalisations), "Jacobian spectra")
    right = None
    raw = None
    for norm in cfg.normalisations:
        if norm == "relative" and raw is not None:      # the raw spectrum rescaled: no second Lanczos run
            sig = raw * np.asarray(drift.relative_scale(mc, model.params, emb, L, T, S))[:, None]
        else:
            sig, r = drift.block_singular_values(mc, model.params, emb, L, T, S, key, k=cfg.k, steps=cfg.steps,
                                                 normalisation=norm)
            sig = np.asarray(sig)
            if norm == "raw":
                raw, right = sig, np.asarray(r)
        out["top_singular_values"][norm] = sig.reshape(len(layers), len(pairs), cfg.k).tolist()
        out["fraction_near_unit"][norm] = drift.fraction_in_band(sig, tuple(cfg.band))
        bar.update(1)
    bar.close()
    s_pert = pairs[-1][1]
    direction = right[-1] if right is not None else np.random.default_rng(0).standard_normal(mc.d_model)
    scale = float(jnp.linalg.norm(emb[s_pert]))
    h_norm_LxT = np.linalg.norm(np.asarray(drift.hidden_states(mc, model.params, emb)), axis=-1)
    resp = {}
    for e in cfg.eps:          # ε relative to ‖h_s^(0)‖, the response relative to ‖h_t^(ℓ)‖
        gain_LxT = np.asarray(drift.perturbation_response(mc, model.params, emb, s_pert, jnp.asarray(direction),
                                                          e * scale))
        resp[str(e)] = (gain_LxT * scale / h_norm_LxT).tolist()
    out["perturbation"] = {"s": s_pert, "relative_eps": list(cfg.eps), "relative_gain_LxT": resp,
                           "note": "‖Δh_t^ℓ‖/‖h_t^ℓ‖ divided by ε = ‖Δh_s^0‖/‖h_s^0‖, along the top raw singular "
                                   "direction of the last block"}
    fr = out["fraction_near_unit"]
    out["claim"] = "singular values of J_ℓ(t, s) are near 1 in semantic directions: deviations propagate neutrally"
    out["verdict"] = ("fraction of the top-%d singular values within [%g, %g]: " % (cfg.k, *cfg.band)
                      + ", ".join(f"{n} {v:.2f}" for n, v in fr.items()))
    return out


def sycophancy_study(model: LoadedModel, cfg: Any, key: jax.Array) -> dict[str, Any]:
    """Eq. 20: flip rates and log-odds shifts under a user's, an expert's opinion and 'Are you sure?'."""
    del key
    rows = _items(cfg, "sycophancy", "mcq")
    n_choices = sum(len(it["choices"]) for it in rows)
    bar = progress_bar(n_choices * (1 + len(sycophancy.CONDITIONS)), "scoring choices (at most)")
    out = sycophancy.sycophancy_study(sycophancy.model_scorer(model, batch_size=cfg.batch_size, progress=bar), rows)
    bar.close()
    conds = out["conditions"]
    out["claim"] = "a user's stated opinion shifts π_θ toward agreement (eq. 20)"
    out["verdict"] = "; ".join(f"{c}: flip rate {v['flip_rate']:.2f} [{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}] "
                               f"(n={v['n']}), log-odds shift {v['log_odds_shift']:+.2f}" for c, v in conds.items())
    return out


def icl_study(model: LoadedModel, cfg: Any, key: jax.Array) -> dict[str, Any]:
    """Eq. 21: accuracy against k with the random-label control, per task, and the per-position ICL score."""
    tasks = {cfg.item_file: item_sets.load_items(cfg.item_file, "icl")} if cfg.item_file else {
        name: item_sets.load_items(name, "icl") for name in cfg.tasks}
    n_calls = len(tasks) * 2 * len(cfg.ks) * cfg.n_queries
    bar = progress_bar(n_calls, "ICL prompts")
    pred = icl.model_predictor(model, key=key, batch_size=cfg.batch_size, progress=bar)
    per_task = {}
    for name, rows in tasks.items():
        gold = icl.icl_curve(pred, rows, ks=tuple(cfg.ks), n_queries=cfg.n_queries, seed=cfg.seed)
        rand = icl.icl_curve(pred, rows, ks=tuple(cfg.ks), n_queries=cfg.n_queries, seed=cfg.seed,
                             random_labels=True)
        per_task[name] = {"k": gold["k"], "accuracy": gold["accuracy"], "ci95": gold["ci95"], "n": gold["n"],
                          "random_label_accuracy": rand["accuracy"], "random_label_ci95": rand["ci95"],
                          "examples": [t for t in gold["trials"][-1][:3]]}
    bar.close()
    first = next(iter(per_task.values()))
    out = {"k": first["k"], "accuracy": first["accuracy"], "ci95": first["ci95"],
           "random_label_accuracy": first["random_label_accuracy"], "task": next(iter(per_task)), "tasks": per_task}
    out["icl_score"] = _icl_score(model, cfg)
    ks = first["k"]
    i0, i8 = ks.index(0) if 0 in ks else 0, ks.index(8) if 8 in ks else len(ks) - 1
    out["claim"] = "p_θ(y | P, x) improves with the number k of demonstrations (eq. 21)"
    out["verdict"] = "; ".join(
        f"{n}: accuracy {v['accuracy'][i0]:.2f} at k={ks[i0]} → {v['accuracy'][i8]:.2f} at k={ks[i8]} "
        f"(random labels: {v['random_label_accuracy'][i8]:.2f})" for n, v in per_task.items()
    ) + f"; ICL score {out['icl_score']['score']:+.3f} nats"
    return out


def _icl_score(model: LoadedModel, cfg: Any) -> dict[str, Any]:
    """Olsson et al.'s score on contexts of the bundled corpus: loss late in the context − loss early."""
    from arlm.data.corpus import load_corpus

    text = load_corpus()
    n, t = cfg.icl_contexts, cfg.icl_length
    ids = model.tokenizer.encode(text[:n * t * 8])
    if len(ids) < n * t:
        raise ValueError(f"the corpus gave {len(ids)} tokens, need {n * t}")
    tokens = jnp.asarray(np.asarray(ids[:n * t], np.int32).reshape(n, t))
    loss = np.asarray(jax.jit(icl.per_position_loss, static_argnums=0)(model.config, model.params, tokens))
    early, late = (t // 10, t // 10 + t // 20), (t - t // 10, t - 1)
    return {"score": icl.icl_score(loss, early, late), "early": list(early), "late": list(late),
            "loss_per_position": loss.tolist(), "contexts": n}


def cot_rag(model: LoadedModel, cfg: Any, key: jax.Array) -> dict[str, Any]:
    """Eq. 22: retrieval-augmented answers on invented facts (none / retrieved / distractor) with a lexical
    and a hidden-state retriever, and chain of thought by Monte Carlo (majority vote) against direct answers."""
    rows = _items(cfg, "cot_rag", "invented_facts")
    verifier = ContainsAnswer()
    k1, k2 = jax.random.split(key)
    bar = progress_bar(3 * len(rows) + cfg.cot_items * (1 + cfg.n_chains), "RAG and CoT")
    out = retrieval.rag_study(model, rows, retrieval.LexicalRetriever, verifier, key=k1,
                              batch_size=cfg.batch_size, progress=bar)
    passages = [" ".join(it["facts"]) for it in rows]
    hidden = retrieval.HiddenStateRetriever(model, passages)
    out["hidden_state_retrieval_accuracy"] = Rate.of(
        [int(hidden.ranking(it["question"])[0]) == i for i, it in enumerate(rows)]).value
    arith = item_sets.load_items("arithmetic", "temperature")[:cfg.cot_items]
    c = cot.cot_vs_direct(model, arith, key=k2, n_chains=cfg.n_chains, temperature=cfg.cot_tau,
                          batch_size=cfg.batch_size, progress=bar)
    bar.close()
    direct, voted, chains = Rate.of(c["direct_correct"]), Rate.of(c["cot_correct"]), Rate.of(c["chain_correct"])
    out["cot"] = {"direct": direct.to_dict(), "majority_vote": voted.to_dict(), "single_chain": chains.to_dict(),
                  "n_chains": cfg.n_chains, "tau": cfg.cot_tau, "examples": c["examples"]}
    out["claim"] = ("retrieval conditions the answer on knowledge the weights lack, p(y | x, retrieve(x)); chains of "
                    "thought marginalise p(y|x) = Σ_c p(c|x) p(y|x,c) (eq. 22)")
    out["verdict"] = (f"invented facts: {out['none']:.2f} without context, {out['retrieved']:.2f} with the retrieved "
                      f"passage, {out['distractor']:.2f} with a distractor; arithmetic: direct {direct.value:.2f}, "
                      f"CoT majority of {cfg.n_chains} {voted.value:.2f}")
    return out


STUDIES: dict[str, Study] = {"trace": trace, "temperature": temperature, "drift": drift_study,
                             "sycophancy": sycophancy_study, "icl": icl_study, "cot_rag": cot_rag}


def _with_bar(run: Callable[..., dict[str, Any]], c: Any, total: int, desc: str) -> dict[str, Any]:
    """`run(c, progress=...)` of a training study under a progress bar of `total` steps."""
    bar = progress_bar(total, desc)
    try:
        return run(c, progress=lambda: bar.update(1))
    finally:
        bar.close()


def continual_study(cfg: Any, key: jax.Array, workdir: str) -> dict[str, Any]:
    """Eq. 23 (open question 2): forgetting against learning for Ω ∈ {none, L2, EWC, representation}
    over λ, and LoRA-only training (eq. 24), on seeds `cfg.continual.seeds`."""
    del key, workdir             # each seed draws its own init and batches
    c = cfg.continual
    arms = continual_lab.arms_of(c)
    bar = progress_bar(len(c.seeds) * (1 + len(arms)), "continual: pretrain on A, then each arm on B")
    runs = [continual_lab.run_seed(c, int(seed), arms, progress=lambda: bar.update(1)) for seed in c.seeds]
    bar.close()
    out = continual_lab.summarize(runs, c.tolerance)
    ewc = out["at_equal_learning"]["ewc"]
    n_less = sum(w["forgets_less"] for w in ewc)
    best = {fam: np.mean([w["forgetting"] for w in wins if w.get("arm")]) if any(w.get("arm") for w in wins)
            else float("nan") for fam, wins in out["at_equal_learning"].items()}
    base = np.mean([w["baseline_forgetting"] for w in ewc if w.get("arm")] or [float("nan")])
    out.update(
        claim="a penalty Ω(θ, θ^(k)) on the new corpus's loss limits forgetting of the earlier one (eq. 23); "
              "open question 2: which Ω forgets least?",
        verdict=(f"at equal learning (within {c.tolerance} nats of λ = 0's), EWC forgets less than λ = 0 on "
                 f"{n_less} of {len(ewc)} seeds; mean forgetting λ = 0 {base:.3f}, "
                 + ", ".join(f"{fam} {v:.3f}" if np.isfinite(v) else f"{fam}: never within the tolerance"
                             for fam, v in best.items()) + " nats/token (best λ per seed)"),
        seeds=len(c.seeds), runs=runs)
    return out


def contractive_study(cfg: Any, key: jax.Array, workdir: str) -> dict[str, Any]:
    """Open question 1: a contractive residual map (γ < 1) against eq. 5's (γ = 1): loss, the top
    singular value of J_L(t, s) against the lag, and the excess loss after an injected error."""
    del key, workdir
    c = cfg.contractive
    out = _with_bar(contractive_lab.run, c, len(c.seeds) * len(c.gains), "contractive: train each γ and measure it")
    std = next(g for g in out["gains"] if g["gain"] == 1.0)
    parts = []
    for g in out["gains"]:
        if g["gain"] == 1.0:
            continue
        ratio = g["top_sigma"][-1]["mean"] / std["top_sigma"][-1]["mean"]
        parts.append(f"γ = {g['gain']:g}: loss {g['loss']['mean']:.3f} vs {std['loss']['mean']:.3f} nats/byte, "
                     f"top σ at lag {out['lags'][-1]} ×{ratio:.2f}, excess loss {out['inject_lags'][-1]} bytes "
                     f"after an injected error {g['excess'][-1]['mean']:.3f} vs {std['excess'][-1]['mean']:.3f}")
    out.update(claim="open question 1: a residual map with contractive dynamics could damp the propagation of "
                     "deviations (drift, eq. 19) that the identity path carries unchanged",
               verdict="; ".join(parts), seeds=len(c.seeds))
    return out


def alignment_drift_study(cfg: Any, key: jax.Array, workdir: str) -> dict[str, Any]:
    """Next check 2: Hall(θ), error-injection recovery and J_L(t, s) spectra of π_ref and of each policy
    the align job trains from it (`arlm.analysis.alignment_drift`), one align run per seed."""
    from arlm.jobs.align import METHODS, load_policies, run_alignment, task_io
    c = cfg.alignment_drift
    seeds = [int(s) for s in c.seeds]
    bar = progress_bar(len(seeds) * (1 + 1 + len(c.align.methods)), "alignment_drift: align, then measure each policy")
    loaded = None if c.align.start.kind == "sft" else load(c.align.start.name)    # its tokenizer, loaded once
    runs = []
    for seed in seeds:
        acfg = c.align.copy_and_resolve_references()
        acfg.seed, acfg.save_policies = seed, True
        acfg.workdir = c.align_dir.format(seed=seed) if c.align_dir else os.path.join(workdir, f"align_seed{seed}")
        if not c.align_dir:
            run_alignment(acfg)
        bar.update(1)
        io = task_io(acfg, loaded)
        problems = list({p.prompt: p for p in io.task.problems(c.eval_problems, "test")}.values())
        measured = {}
        for name, (model_cfg, params) in load_policies(acfg.workdir).items():
            measured[name] = drift_lab.measure(io, model_cfg, params, problems, c, jax.random.fold_in(key, seed), seed)
            bar.update(1)
        others = [m for m in METHODS if m not in drift_lab.RLVR]
        runs.append({"seed": seed, "align_workdir": acfg.workdir, "policies": measured,
                     "rlvr_recovery": drift_lab.pooled(measured[n]["recovery"] for n in drift_lab.RLVR
                                                       if n in measured),
                     "other_recovery": drift_lab.pooled(measured[n]["recovery"] for n in others if n in measured)})
    bar.close()
    names = list(runs[0]["policies"])
    table = {n: {"hall_sampled": continual_lab.mean_ci([r["policies"][n]["hall_sampled"]["rate"] for r in runs]),
                 "hall_greedy": continual_lab.mean_ci([r["policies"][n]["hall_greedy"]["rate"] for r in runs]),
                 "recovery": continual_lab.mean_ci([r["policies"][n]["recovery"]["rate"] for r in runs]),
                 "recovery_pooled": drift_lab.pooled(r["policies"][n]["recovery"] for r in runs),
                 "top_sigma": [continual_lab.mean_ci([r["policies"][n]["top_sigma"][i] for r in runs])
                               for i in range(len(c.lags))]} for n in names}
    rlvr = [r["rlvr_recovery"]["rate"] for r in runs]
    rest = [r["other_recovery"]["rate"] for r in runs]
    wins = sum(a > b for a, b in zip(rlvr, rest))
    ref = table["ref"]["recovery"]["mean"]
    out = {"lags": list(c.lags), "eval_problems": len(problems), "policies": table, "runs": runs, "seeds": seeds,
           "claim": "next check 2: alignment grounded in verifiable facts (RLVR) should reduce the neutral "
                    "propagation of errors (eq. 19): recover from an injected error more often",
           "verdict": (f"after a forced wrong first digit, RLVR policies (GRPO, RLOO) keep the later digits right in "
                       f"{np.mean(rlvr):.2f} of cases vs {np.mean(rest):.2f} for PPO-on-a-reward-model, DPO and "
                       f"RSFT (π_ref {ref:.2f}); RLVR higher on {wins} of {len(runs)} seeds; Hall(θ) at τ = 1: "
                       + ", ".join(f"{n} {v['hall_sampled']['mean']:.2f}" for n, v in table.items()))}
    return out


def icl_emergence_study(cfg: Any, key: jax.Array, workdir: str) -> dict[str, Any]:
    """Open question 4: when in-context learning (eq. 21) appears, over a grid of depth, width and
    training steps on associative recall (`arlm.analysis.icl_emergence`)."""
    del key, workdir             # each seed draws its own init, batches and held-out sequences
    c = cfg.icl_emergence
    return _with_bar(icl_lab.run, c, len(c.depths) * len(c.widths) * len(c.seeds),
                     "icl_emergence: train each (depth, width, seed)")


def sycophancy_frontier_study(cfg: Any, key: jax.Array, workdir: str) -> dict[str, Any]:
    """Open question 3: accuracy against flip rate (eq. 20) for DPO and an on-policy method aligned on a
    simulated rater that prefers agreement with probability p (`arlm.analysis.sycophancy_frontier`)."""
    del key, workdir             # each seed draws its own π_ref, pairs and rollouts
    c = cfg.sycophancy_frontier
    return _with_bar(frontier_lab.run, c, len(c.seeds) * (1 + len(c.methods) * len(c.ps)),
                     "sycophancy_frontier: π_ref, then each (method, p)")


# Studies that train their own small models instead of reading a loaded one: (cfg, key, workdir) → summary.
TRAINING_STUDIES: dict[str, Callable[[Any, jax.Array, str], dict[str, Any]]] = {
    "continual": continual_study, "contractive": contractive_study, "alignment_drift": alignment_drift_study,
    "icl_emergence": icl_emergence_study, "sycophancy_frontier": sycophancy_frontier_study}


def run_study(cfg: Any, model: LoadedModel | None = None) -> dict[str, Any]:
    """Run `cfg.study` (loading `cfg.model` unless a model is given), write summary.json and <study>.png
    into cfg.workdir (default runs/phenomena/<study>/), and return the summary.

    cfg: the ConfigDict of `experiments/configs/phenomena.py`; with cfg.size == "large" its LARGE
    overrides (cfg.large) replace the CPU defaults.
    """
    if cfg.study not in STUDIES and cfg.study not in TRAINING_STUDIES:
        raise ValueError(f"unknown study {cfg.study!r}; choose one of {sorted(STUDIES) + sorted(TRAINING_STUDIES)}")
    if cfg.size not in ("small", "large"):
        raise ValueError(f"size must be 'small' or 'large', got {cfg.size!r}")
    if cfg.size == "large":
        cfg = cfg.copy_and_resolve_references()
        for k, v in cfg.large.items():
            cfg[k] = v
    workdir = cfg.workdir or os.path.join("runs", "phenomena", cfg.study)
    os.makedirs(workdir, exist_ok=True)
    t0 = time.perf_counter()
    if cfg.study in TRAINING_STUDIES:
        summary = TRAINING_STUDIES[cfg.study](cfg, jax.random.PRNGKey(cfg.seed), workdir)
        summary.update(study=cfg.study, model="trained from scratch", size=cfg.size,
                       seconds=round(time.perf_counter() - t0, 1))
    else:
        model = model if model is not None else load(cfg.model)
        summary = STUDIES[cfg.study](model, cfg, jax.random.PRNGKey(cfg.seed))
        summary.update(study=cfg.study, model=cfg.model, size=cfg.size, seconds=round(time.perf_counter() - t0, 1))
    with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, default=float)
    plots.save(cfg.study, summary, os.path.join(workdir, f"{cfg.study}.png"))
    print(f"[{cfg.study}] {summary['claim']}\n  → {summary['verdict']}\n  outputs in {os.path.abspath(workdir)} "
          f"({summary['seconds']} s)")
    return summary
