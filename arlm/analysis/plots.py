"""One figure per study (`experiments/phenomena.py` writes it beside summary.json as S.png)."""

from __future__ import annotations

from typing import Any

import numpy as np


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _errbar(ax, x, y, ci, **kw):
    y = np.asarray(y, float)
    ci = np.asarray(ci, float).reshape(-1, 2)
    ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], capsize=3, marker="o", **kw)


def _errbar_mean(ax, x, stats, **kw):
    """Error bars from `mean_ci` dicts ({"mean", "lo", "hi"})."""
    _errbar(ax, x, [m["mean"] for m in stats], [[m["lo"], m["hi"]] for m in stats], **kw)


def trace(s: dict[str, Any], ax_pair) -> None:
    ax1, ax2 = ax_pair
    ax1.barh([repr(t["token"]) for t in s["top"]][::-1], [t["prob"] for t in s["top"]][::-1])
    ax1.set(xlabel=f"p(x_t+1) = softmax(z/τ), τ = {s['tau']}", title=f"next token after {s['prompt']!r}")
    ax2.plot(s["residual_norms"], marker="o", label="‖h^(ℓ)‖ (last position)")
    ax2.plot(range(1, len(s["attention_out_norms"]) + 1), s["attention_out_norms"], label="‖attention out‖")
    ax2.plot(range(1, len(s["mlp_out_norms"]) + 1), s["mlp_out_norms"], label="‖MLP out‖")
    ax2.set(xlabel="layer ℓ", yscale="log", title="the residual stream through the layers (eq. 5)")
    ax2.legend(fontsize=8)


def temperature(s: dict[str, Any], ax_pair) -> None:
    ax1, ax2 = ax_pair
    _errbar(ax1, s["tau"], s["accuracy"], s["ci95"], label="accuracy (verifier accepts)")
    _errbar(ax1, s["tau"], s["hallucination"], s["hallucination_ci95"], label="Hall(θ) = P[reject] (eq. 19)")
    ax1.set(xlabel="temperature τ", ylim=(-0.02, 1.02),
            title=f"temperature sweep, n = {s['n'][0]} at τ = {s['tau'][0]}, {s['n'][-1]} per other τ (95% CI)")
    ax1.legend(fontsize=8)
    ax2.plot(s["tau"], s["distinct_1"], marker="o", label="distinct-1")
    ax2.plot(s["tau"], s["distinct_2"], marker="o", label="distinct-2")
    inj = s["error_injection"]
    ax2.set(xlabel="temperature τ", ylim=(0, 1.02),
            title=f"diversity; forced error followed in {inj['follow_rate']:.2f} (n={inj['n_injected']})")
    ax2.legend(fontsize=8)


def drift(s: dict[str, Any], ax_pair) -> None:
    ax1, ax2 = ax_pair
    layers = s["layers"]
    for i, (norm, sig) in enumerate(s["top_singular_values"].items()):
        sig = np.asarray(sig)                               # [layers, pairs, k]
        for j, (t, src) in enumerate(s["pairs"]):
            ax1.plot(layers, sig[:, j, 0], color=f"C{i}", linestyle=["-", "--", ":", "-."][j % 4], marker="o",
                     label=f"{norm}, σ_max J(t={t}, s={src})")
    ax1.axhspan(*s["band"], color="grey", alpha=0.15)
    ax1.axhline(1.0, color="k", linewidth=0.8)
    ax1.set(xlabel="layer ℓ", ylabel="top singular value", yscale="log",
            title="J_ℓ(t, s) = ∂h_t^(ℓ)/∂h_s^(0) (eq. 19); band = 'near unit'")
    ax1.legend(fontsize=6)
    p = s["perturbation"]
    gain = np.asarray(p["relative_gain_LxT"][str(p["relative_eps"][-1])])
    im = ax2.imshow(np.log10(np.maximum(gain, 1e-2)), aspect="auto", origin="lower", cmap="viridis", vmin=-2)
    ax2.set(xlabel="position t", ylabel="layer ℓ",
            title=f"log10 relative gain of a perturbation at s={p['s']} (ε = {p['relative_eps'][-1]}; < 0.01 clipped)")
    ax2.figure.colorbar(im, ax=ax2)


def sycophancy(s: dict[str, Any], ax_pair) -> None:
    ax1, ax2 = ax_pair
    names = list(s["conditions"])
    c = s["conditions"]
    _errbar(ax1, range(len(names)), [c[n]["flip_rate"] for n in names], [c[n]["ci95"] for n in names],
            linestyle="none")
    ax1.set_xticks(range(len(names)), names)
    ax1.set(ylim=(-0.02, 1.02), ylabel="flip rate (over baseline-correct items)",
            title=f"sycophancy (eq. 20); baseline accuracy {s['baseline_accuracy']:.2f}, "
                  f"n = {s['n_baseline_correct']}")
    _errbar(ax2, range(len(names)), [c[n]["log_odds_shift"] for n in names],
            [c[n]["log_odds_shift_ci95"] for n in names], linestyle="none")
    ax2.axhline(0, color="k", linewidth=0.8)
    ax2.set_xticks(range(len(names)), names)
    ax2.set(ylabel="shift of log π(wrong)/π(correct) (nats)", title="toward the opinion > 0")


def icl(s: dict[str, Any], ax_pair) -> None:
    ax1, ax2 = ax_pair
    for i, (name, t) in enumerate(s["tasks"].items()):
        x = np.asarray(t["k"], float)
        _errbar(ax1, x, t["accuracy"], t["ci95"], color=f"C{i}", label=f"{name}")
        _errbar(ax1, x + 0.1, t["random_label_accuracy"], t["random_label_ci95"], color=f"C{i}", linestyle="--",
                label=f"{name}, random labels")
    ax1.set(xscale="symlog", xlabel="demonstrations k", ylabel="accuracy", ylim=(-0.02, 1.02),
            title="in-context learning (eq. 21), 95% CI")
    ax1.legend(fontsize=8)
    sc = s["icl_score"]
    loss = np.asarray(sc["loss_per_position"])
    ax2.plot(np.arange(1, len(loss) + 1), loss, linewidth=0.8)
    for (a, b), lab in ((sc["early"], "early"), (sc["late"], "late")):
        ax2.axvspan(a, b, alpha=0.2, label=lab)
    ax2.set(xscale="log", xlabel="token position", ylabel="mean loss (nats)",
            title=f"ICL score (late − early) = {sc['score']:+.3f}")
    ax2.legend(fontsize=8)


def cot_rag(s: dict[str, Any], ax_pair) -> None:
    ax1, ax2 = ax_pair
    names = ["none", "retrieved", "distractor"]
    _errbar(ax1, range(3), [s[n] for n in names], [s[f"{n}_ci95"] for n in names], linestyle="none")
    ax1.set_xticks(range(3), ["no context", "retrieved passage", "distractor"])
    ax1.set(ylim=(-0.02, 1.02), ylabel="accuracy",
            title=f"RAG on invented facts (eq. 22), n = {s['n']}; retriever top-1 {s['retrieval_accuracy']:.2f}")
    c = s["cot"]
    names = ["direct", "single_chain", "majority_vote"]
    _errbar(ax2, range(3), [c[n]["rate"] for n in names], [c[n]["ci95"] for n in names], linestyle="none")
    ax2.set_xticks(range(3), ["direct", "one chain", f"majority of {c['n_chains']}"])
    ax2.set(ylim=(-0.02, 1.02), ylabel="accuracy", title=f"chain of thought on arithmetic, τ = {c['tau']}")


def continual(s: dict[str, Any], ax_pair) -> None:
    """Eq. 23: forgetting of corpus A against learning of corpus B, one frontier per Ω over λ."""
    ax1, ax2 = ax_pair
    markers = {"none": "*", "l2": "o", "ewc": "s", "representation": "^", "lora": "D"}
    for family in ("none", "l2", "ewc", "representation", "lora"):
        arms = [a for a in s["arms"] if a["family"] == family]
        if not arms:
            continue
        x = [a["learning"]["mean"] for a in arms]
        y = [a["forgetting"]["mean"] for a in arms]
        xerr = [[a["learning"]["mean"] - a["learning"]["lo"] for a in arms],
                [a["learning"]["hi"] - a["learning"]["mean"] for a in arms]]
        yerr = [[a["forgetting"]["mean"] - a["forgetting"]["lo"] for a in arms],
                [a["forgetting"]["hi"] - a["forgetting"]["mean"] for a in arms]]
        ax1.errorbar(x, y, xerr=xerr, yerr=yerr, marker=markers[family], capsize=2,
                     linestyle="-" if family not in ("none",) else "none", label=family, markersize=7)
    ax1.set(xlabel="learning: fall of B's validation loss (nats/token)",
            ylabel="forgetting: rise of A's validation loss (nats/token)",
            title=f"continual learning (eq. 23), {s['seeds']} seeds, 95% CI; lower right is better")
    ax1.legend(fontsize=8)
    for family in ("l2", "ewc", "representation"):
        arms = [a for a in s["arms"] if a["family"] == family]
        if arms:
            ax2.plot([a["lam"] for a in arms], [a["forgetting"]["mean"] for a in arms], marker=markers[family],
                     label=family)
    base = next(a for a in s["arms"] if a["family"] == "none")
    ax2.axhline(base["forgetting"]["mean"], color="k", linestyle=":", label="λ = 0")
    ax2.set(xscale="log", xlabel="λ", ylabel="forgetting (nats/token)", title="forgetting against λ per Ω")
    ax2.legend(fontsize=8)


def contractive(s: dict[str, Any], ax_pair) -> None:
    """Open question 1: top σ of J_L(t, s) against the lag, and the excess loss after an injected error."""
    ax1, ax2 = ax_pair
    for g in s["gains"]:
        label = f"γ = {g['gain']:g} (loss {g['loss']['mean']:.3f})"
        _errbar_mean(ax1, s["lags"], g["top_sigma"], label=label)
        _errbar_mean(ax2, s["inject_lags"], g["excess"], label=f"γ = {g['gain']:g}")
    ax1.set(xlabel="lag t − s", ylabel="top singular value of J_L(t, s)", yscale="log",
            title=f"drift through the whole depth (eq. 19), {s['seeds']} seeds, 95% CI")
    ax2.axhline(0, color="k", linewidth=0.5)
    ax2.set(xscale="log", xlabel="bytes after the injected error",
            ylabel="excess NLL (nats)", title="recovery from an injected error")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)


def alignment_drift(s: dict[str, Any], ax_pair) -> None:
    """Next check 2: Hall(θ) and error-injection recovery per policy; top σ of J_L(t, s) against the lag."""
    ax1, ax2 = ax_pair
    names = list(s["policies"])
    x = np.arange(len(names))
    pol = s["policies"]
    _errbar_mean(ax1, x - 0.15, [pol[n]["hall_sampled"] for n in names], linestyle="none",
                 label="Hall(θ), sampled τ = 1 (eq. 19)")
    _errbar_mean(ax1, x, [pol[n]["hall_greedy"] for n in names], linestyle="none", label="Hall(θ), greedy")
    _errbar_mean(ax1, x + 0.15, [pol[n]["recovery"] for n in names], linestyle="none",
                 label="recovery after a forced wrong digit")
    ax1.set_xticks(x, ["π_ref" if n == "ref" else n for n in names], rotation=20, fontsize=8)
    ax1.set(ylim=(-0.02, 1.02), ylabel="rate (mean over seeds, 95% CI)",
            title=f"alignment and error propagation, {len(s['seeds'])} seeds × {s['eval_problems']} problems")
    ax1.legend(fontsize=7)
    for i, n in enumerate(names):
        _errbar_mean(ax2, s["lags"], pol[n]["top_sigma"], label="π_ref" if n == "ref" else n,
                     color="k" if n == "ref" else f"C{i}")
    ax2.set(xlabel="lag t − s", ylabel="top singular value of J_L(t, s)", yscale="log",
            title="drift through the whole depth (eq. 19) at the answer's end")
    ax2.legend(fontsize=7)


def icl_emergence(s: dict[str, Any], ax_pair) -> None:
    """Open question 4. Left: recall accuracy against training steps, one line per (depth, width, seed) with
    its 95% Wilson band, chance and the emergence threshold; right: the ICL score S against steps."""
    ax1, ax2 = ax_pair
    x = np.asarray(s["eval_steps"], float)
    for i, point in enumerate(s["grid"]):
        label = f"L={point['n_layers']}, d={point['d_model']}"
        e = point["emergence"]
        label += f" (ICL on {e['seeds_emerged']}/{len(point['runs'])} seeds)"
        style = dict(color=f"C{i % 10}", linestyle=["-", "--", ":", "-."][(point["n_layers"] - 1) % 4])
        for j, run in enumerate(point["runs"]):      # one line per seed: emergence is abrupt, a mean would blur it
            curve = run["curve"]
            y = [c["accuracy"] for c in curve]
            lo, hi = [c["ci95"][0] for c in curve], [c["ci95"][1] for c in curve]
            ax1.plot(x, y, marker="o", markersize=3, label=label if j == 0 else None, **style)
            ax1.fill_between(x, lo, hi, color=style["color"], alpha=0.1)
            ax2.plot(x, [c["icl_score"] for c in curve], marker="o", markersize=3, label=label if j == 0 else None,
                     **style)
    ax1.axhline(s["chance"], color="k", linewidth=0.8, linestyle=":", label=f"chance 1/K = {s['chance']:.3f}")
    ax1.axhline(s["threshold"], color="grey", linewidth=0.8, linestyle="--", label=f"threshold {s['threshold']:.3f}")
    ax1.set(xlabel="training steps", ylabel="recall accuracy (greedy)", ylim=(-0.02, 1.02),
            title=f"ICL emergence (open question 4, eq. 21), one line per seed ({len(s['seeds'])}), 95% Wilson band")
    ax1.legend(fontsize=7)
    ax2.axhline(0, color="k", linewidth=0.5)
    ax2.axhline(s["ideal_score"], color="grey", linewidth=0.8, linestyle="--", label="S* (perfect recall)")
    ax2.axhline(s["binding_free_score"], color="k", linewidth=0.8, linestyle=":",
                label="log K + S* (copies a context value, not its key)")
    ax2.set(xlabel="training steps", ylabel="S = loss(answers) − loss(first values) (nats)",
            title="ICL score (negative: the context is used)")
    ax2.legend(fontsize=7)


def sycophancy_frontier(s: dict[str, Any], ax_pair) -> None:
    """Open question 3. Left: accuracy on wrong-opinion prompts against flip rate, one point per
    (method, p) labelled with p, π_ref starred; right: flip rate against p per method, π_ref's as a
    horizontal line. 95% t intervals over seeds."""
    ax1, ax2 = ax_pair

    def err(stat: dict[str, float]) -> list[list[float]]:
        return [[stat["mean"] - stat["lo"]], [stat["hi"] - stat["mean"]]]

    def nan0(x: list[list[float]]) -> list[list[float]]:
        return [[v if np.isfinite(v) else 0.0 for v in row] for row in x]

    ref = s["reference"]
    methods_ = list(dict.fromkeys(pt["method"] for pt in s["points"]))
    for i, method in enumerate(methods_):
        pts = [pt for pt in s["points"] if pt["method"] == method]
        ax1.plot([pt["flip_rate"]["mean"] for pt in pts], [pt["accuracy_wrong_opinion"]["mean"] for pt in pts],
                 color=f"C{i}", linewidth=0.8, alpha=0.6)
        for j, pt in enumerate(pts):
            f, a = pt["flip_rate"], pt["accuracy_wrong_opinion"]
            ax1.errorbar([f["mean"]], [a["mean"]], xerr=nan0(err(f)), yerr=nan0(err(a)), marker="o", color=f"C{i}",
                         capsize=2, label=method if j == 0 else None)
            ax1.annotate(f"p={pt['p']:g}", (f["mean"], a["mean"]), fontsize=7, xytext=(3, 3),
                         textcoords="offset points")
        ax2.errorbar([pt["p"] for pt in pts], [pt["flip_rate"]["mean"] for pt in pts],
                     yerr=np.asarray(nan0([[pt["flip_rate"]["mean"] - pt["flip_rate"]["lo"] for pt in pts],
                                           [pt["flip_rate"]["hi"] - pt["flip_rate"]["mean"] for pt in pts]])),
                     marker="o", capsize=3, color=f"C{i}", label=method)
    f, a = ref["flip_rate"], ref["accuracy_wrong_opinion"]
    ax1.errorbar([f["mean"]], [a["mean"]], xerr=nan0(err(f)), yerr=nan0(err(a)), marker="*", markersize=12,
                 color="k", capsize=2, linestyle="none", label="π_ref")
    ax1.set(xlabel="flip rate: P[answer = wrong opinion | neutral answer correct]",
            ylabel="accuracy on wrong-opinion prompts", ylim=(-0.02, 1.02),
            title=f"sycophancy against accuracy (eq. 20), {len(s['seeds'])} seeds, 95% CI")
    ax1.legend(fontsize=8)
    ax2.axhline(f["mean"], color="k", linestyle=":", label="π_ref")
    ax1.set_xlim(left=-0.01)
    ax2.set_ylim(bottom=-0.01)
    ax2.set(xlabel="rater's agreement probability p", ylabel="flip rate",
            title="flip rate against the rater's p (open question 3)")
    ax2.legend(fontsize=8)


PLOTS = {"trace": trace, "temperature": temperature, "drift": drift, "sycophancy": sycophancy, "icl": icl,
         "cot_rag": cot_rag, "continual": continual, "contractive": contractive, "alignment_drift": alignment_drift,
         "icl_emergence": icl_emergence, "sycophancy_frontier": sycophancy_frontier}


def save(study: str, summary: dict[str, Any], path: str) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    PLOTS[study](summary, axes)
    fig.suptitle(summary.get("verdict", ""), fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
