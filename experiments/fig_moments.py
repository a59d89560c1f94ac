"""Figures: exact bias and variance of the post-training estimators (theory.moments; README section 2).

- `moments_vs_group_size`: squared bias and variance against G per preset on the reference problem.
- `moments_vs_policy_quality`: SFT, RL and the HPT gate against the probability of a correct answer.
- `moments_table1`: the HPT paper's Table 1 with each method's exact bias and variance.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.registry import FigureResult, figure, save_figure  # noqa: E402
from theory.estimator import PRESETS, preset  # noqa: E402
from theory.finite import FiniteProblem, Objective, softmax_policy  # noqa: E402
from theory.moments import GateRule, exact_moments  # noqa: E402
from toy.bandit import logits_for_accuracy, make_problem  # noqa: E402

REF_G = 8


def reference_problem():
    """4 contexts of accuracy 0.8, 0.55, 0.3, 0.05; 6 actions, 2 correct; demonstrator 80% correct."""
    return make_problem(4, 6, difficulty=[0.2, 0.45, 0.7, 0.95], n_correct=2, demo_quality=0.8, seed=0)


# (label, preset, scheme, gate) for the G sweep
SWEEP = [("REINFORCE", "reinforce", "on_policy", None), ("RLOO", "rloo", "on_policy", None),
         ("GRPO", "grpo", "on_policy", None), ("Dr. GRPO", "dr_grpo", "on_policy", None),
         ("SFT", "sft", "demonstration", None), ("LUFFY", "luffy", "mixed", None), ("SRFT", "srft", "mixed", None),
         ("HPT (paper, gamma=0)", "hpt_paper", "hpt_gate", GateRule("paper", 0.0))]


@figure("moments_vs_group_size",
        reproduces="HPT paper section 2.3 (qualitative): REINFORCE/RLOO unbiased, GRPO's std division biased; "
                   "exact squared bias and variance against G")
def fig_group_size(out: Path) -> FigureResult:
    prob, theta = reference_problem()
    Gs = [2, 4, 8, 16, 32, 64]
    res = {lab: [exact_moments(preset(p), prob, theta, G, sc, gate=gate) for G in Gs] for lab, p, sc, gate in SWEEP}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    floor = 1e-20
    for lab, ms in res.items():
        axes[0].loglog(Gs, [max(m.bias_sq, floor) for m in ms], "o-", label=lab)
        axes[1].loglog(Gs, [m.variance for m in ms], "o-", label=lab)
    axes[0].set(xlabel="group size G", ylabel="||bias||^2 (floored at 1e-20)", title="squared bias vs own target")
    axes[1].set(xlabel="group size G", ylabel="trace Cov", title="variance")
    for ax in axes:
        ax.set_xticks(Gs, [str(g) for g in Gs])
        ax.minorticks_off()
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "moments_vs_group_size.png", dpi=120)
    plt.close(fig)

    unbiased = max(m.bias_sq for lab in ("REINFORCE", "RLOO", "SFT") for m in res[lab])
    grpo = res["GRPO"]
    dr = res["Dr. GRPO"]
    grpo_stays = grpo[-1].bias_sq > 0.1 * grpo[0].bias_sq
    dr_scale = max(abs(m.cosine - 1) for m in dr)
    held = "yes" if unbiased < 1e-24 and grpo_stays and grpo[-1].cosine < 1 - 1e-6 else "no"
    finding = (f"REINFORCE, RLOO and SFT: max ||bias||^2 = {unbiased:.1e} over G in {Gs}; GRPO: ||bias||^2 "
               f"{grpo[0].bias_sq:.2e} at G=2 and {grpo[-1].bias_sq:.2e} at G=64 (cosine to grad E r "
               f"{grpo[-1].cosine:.5f}); Dr. GRPO bias is a pure scale ((G-1)/G, max |cos-1| = {dr_scale:.1e}) "
               f"that vanishes as 1/G^2: {dr[0].bias_sq:.2e} -> {dr[-1].bias_sq:.2e}; REINFORCE variance "
               f"{res['REINFORCE'][-1].variance:.2e} vs RLOO {res['RLOO'][-1].variance:.2e} at G=64.")
    caption = ("Reference problem (4 contexts of accuracy 0.8/0.55/0.3/0.05, 6 actions with 2 correct, a "
               "demonstrator 80% correct). Left: squared norm of the exact bias of each estimator against its "
               "scheme's default target (grad E r on-policy; beta - pi for SFT; (G-1)/G grad E r + (beta - pi)/G for "
               "LUFFY/SRFT; grad E r for HPT). Right: trace of the exact covariance. Exact values, no sampling.")
    return FigureResult(["moments_vs_group_size.png"], caption, held, finding)


def _quality_problem():
    """One context, 8 actions (2 correct), demonstrator 70% correct; logits as a function of accuracy p."""
    K = 8
    correct = np.zeros(K, dtype=bool)
    correct[:2] = True
    beta = np.where(correct, 0.35, 0.3 / 6)
    base = np.random.default_rng(1).normal(scale=0.5, size=K)
    prob = FiniteProblem(correct[None].astype(float), np.ones(1), beta[None])
    return prob, lambda p: logits_for_accuracy(base, correct, p)[None]


BATCH = 16  # prompts averaged per step in the policy-quality figure


@figure("moments_vs_policy_quality",
        reproduces="HPT paper section 2.3 / 4.1: the bias-variance balance depends on the policy, so SFT should win "
                   "on weak policies and RL on strong ones; the HPT gate switches between them")
def fig_policy_quality(out: Path) -> FigureResult:
    prob, logits_at = _quality_problem()
    ps = np.linspace(0.02, 0.98, 49)
    G = REF_G
    target = Objective(reward=1.0)
    methods = {"SFT (1 demo)": ("sft", "demonstration", 1, None),
               "RL (hpt_paper, G=8)": ("hpt_paper", "on_policy", G, None)}
    for gam in (0.0, 0.25, 0.5):
        methods[f"HPT gate gamma={gam:g}"] = ("hpt_paper", "hpt_gate", G, GateRule("paper", gam))
    curves = {k: [] for k in methods}
    for p in ps:
        theta = logits_at(p)
        for lab, (name, sc, g, gate) in methods.items():
            curves[lab].append(exact_moments(preset(name), prob, theta, g, sc, gate=gate, objective=target))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for lab, ms in curves.items():
        axes[0].plot(ps, [1 - m.cosine for m in ms], label=lab)
        axes[1].plot(ps, [m.scale_free_mse for m in ms], label=lab)
        axes[2].plot(ps, [m.batch_scale_free_mse(BATCH) for m in ms], label=lab)
    axes[0].set(xlabel="P(correct) under pi", ylabel="1 - cos(E g, grad E r)", title="direction bias")
    axes[0].set_yscale("symlog", linthresh=1e-4)
    axes[1].set(xlabel="P(correct) under pi", ylabel="min_{s>=0} E||s g - t||^2 / ||t||^2",
                title="scale-free MSE, one prompt")
    axes[2].set(xlabel="P(correct) under pi", title=f"scale-free MSE, mean of {BATCH} prompts")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "moments_vs_policy_quality.png", dpi=120)
    plt.close(fig)

    mse = {lab: np.array([m.batch_scale_free_mse(BATCH) for m in ms]) for lab, ms in curves.items()}
    sft, rl, gate0 = mse["SFT (1 demo)"], mse["RL (hpt_paper, G=8)"], mse["HPT gate gamma=0"]
    sft_wins = ps[sft < rl]
    cross = f"SFT < RL for p <= {sft_wins.max():.2f}" if sft_wins.size else "SFT never beats RL"
    gate_gap = np.max(gate0 - np.minimum(sft, rl))
    neg = ps[np.array([m.cosine for m in curves["SFT (1 demo)"]]) < 0]
    held = "yes" if sft[0] < rl[0] and rl[-1] < sft[-1] else "no"
    finding = (f"scale-free MSE (batch {BATCH}) against grad E r: at p={ps[0]:.2f} SFT {sft[0]:.3f}, RL {rl[0]:.3f}, "
               f"gate(0) {gate0[0]:.3f}; at p={ps[-1]:.2f} SFT {sft[-1]:.3f}, RL {rl[-1]:.3f}, gate(0) "
               f"{gate0[-1]:.3f}; {cross}; gate(0) exceeds the better of SFT and RL by at most {gate_gap:.3f}; "
               f"SFT's mean points away from grad E r for p >= {neg.min() if neg.size else float('nan'):.2f} "
               f"(the demonstrator is 70% correct); gamma=0.5 at p=0.5: {mse['HPT gate gamma=0.5'][24]:.3f} vs "
               f"gate(0) {gate0[24]:.3f}.")
    caption = ("One context, 8 actions (2 correct), demonstrator 70% correct, policy logits shifted so that "
               "P(correct) = p. Target: grad E r. Left: 1 - cosine between the exact mean and the target (SFT's "
               "direction is biased by the demonstrator's errors and turns against the target once the policy beats "
               "the demonstrator; RL's is exact). Middle and right: scale-free MSE 1 - max(<E g, t>, 0)^2 / "
               f"(||t||^2 E||g||^2) for one prompt and for the mean of {BATCH} prompts, which charges bias and "
               "variance after the best non-negative step size. SFT uses one demonstration per prompt (as in HPT's "
               "SFT branch); RL and the gates use 8 rollouts; gate gamma is the paper's c/G <= gamma rule.")
    return FigureResult(["moments_vs_policy_quality.png"], caption, held, finding)


# Table 1 rows: preset -> scheme (the rest on_policy); extra rows for the HPT gate
_SCHEME = {"sft": "demonstration", "luffy": "mixed", "srft": "mixed"}


def _table_rows(prob, theta, old):
    rows = []
    names = list(PRESETS) + ["hpt_paper+gate", "hpt_code+gate"]
    for key in names:
        name = key.split("+")[0]
        est = preset(name)
        sc = "hpt_gate" if key.endswith("+gate") else _SCHEME.get(name, "on_policy")
        gate = (GateRule("paper", 0.0) if name == "hpt_paper" else GateRule("code", 0)) if sc == "hpt_gate" else None
        cells = {}
        for tag, old_logits in (("on", None), ("off", old if sc != "demonstration" else None)):
            kw = {}
            if est.advantage == "given":  # PPO with the exact critic of the rollout policy
                pi_old = softmax_policy(theta if old_logits is None else old_logits)
                kw["advantage_table"] = prob.rewards - (pi_old * prob.rewards).sum(1, keepdims=True)
            cells[tag] = exact_moments(est, prob, theta, REF_G, sc, old_logits=old_logits, gate=gate, **kw)
        rows.append((key, est, sc, cells))
    return rows


@figure("moments_table1",
        reproduces="HPT paper Table 1 and section 2.3: the methods x UPGE components table, with each method's exact "
                   "bias and variance on the reference problem")
def fig_table1(out: Path) -> FigureResult:
    prob, theta = reference_problem()
    old = theta - 0.5 * np.random.default_rng(2).normal(size=theta.shape)  # pi_theta drifted from pi_old
    rows = _table_rows(prob, theta, old)
    head = ("| method | pi_ref | advantage | mask | shaping | aggregation | scheme | rel. bias on | cos on | "
            "variance on | rel. bias off | cos off | variance off |")
    lines = ["# Table 1 with numbers (reference problem, G = 8)", "",
             "rel. bias = ||E g - t|| / ||t||, t the scheme's default target; cos = cos(E g, t); variance = trace Cov. "
             "'on': pi_old = pi_theta; 'off': pi_theta drifted from the rollout policy pi_old (logit noise 0.5).", "",
             head, "|" + "---|" * 13]
    for key, est, sc, c in rows:
        ref = est.reference + (f" / demo {est.demo_reference}" if est.demo_reference else "")
        shaping = est.shaping + (f" / demo {est.demo_shaping}" if est.demo_reference else "")
        vals = []
        for tag in ("on", "off"):
            m = c[tag]
            vals += [f"{np.linalg.norm(m.bias) / np.linalg.norm(m.target):.3g}", f"{m.cosine:.4f}", f"{m.variance:.3g}"]
        lines.append(f"| {key} | {ref} | {est.advantage} | {est.mask} | {shaping} | {est.aggregation} | {sc} | "
                     + " | ".join(vals) + " |")
    (out / "moments_table1.md").write_text("\n".join(lines) + "\n")

    labels = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 6), sharey=True)
    y = np.arange(len(rows))
    for tag, off in (("on", -0.2), ("off", 0.2)):
        ms = [r[3][tag] for r in rows]
        axes[0].barh(y + off, [np.linalg.norm(m.bias) / np.linalg.norm(m.target) for m in ms], 0.4, label=tag)
        axes[1].barh(y + off, [max(1 - m.cosine, 1e-6) for m in ms], 0.4, label=tag)
        axes[2].barh(y + off, [m.batch_scale_free_mse(16) for m in ms], 0.4, label=tag)
    axes[0].set(yticks=y, yticklabels=labels, xlabel="||bias|| / ||target||")
    axes[1].set(xlabel="1 - cos(E g, target) (floored at 1e-6)", xscale="log")
    axes[2].set(xlabel="scale-free MSE, mean of 16 prompts")
    axes[2].legend(title="pi_old")
    axes[0].invert_yaxis()
    fig.tight_layout()
    save_figure(fig, out / "moments_table1.png", dpi=120)
    plt.close(fig)

    by = {r[0]: r[3] for r in rows}
    rel = {k: np.linalg.norm(v["on"].bias) / np.linalg.norm(v["on"].target) for k, v in by.items()}
    claims = {
        "REINFORCE unbiased on-policy": rel["reinforce"] < 1e-12,
        "pi_ref = 1 (LUFFY, SRFT) biased in direction":
            max(by["luffy"]["on"].cosine, by["srft"]["on"].cosine) < 1 - 1e-6,
        "std division (GRPO) biased in direction": by["grpo"]["on"].cosine < 1 - 1e-6,
        "clipping off-policy lowers variance (GRPO vs unclipped)": by["grpo"]["off"].variance < exact_moments(
            preset("grpo", mask="none"), prob, theta, REF_G, old_logits=old).variance,
    }
    held = "yes" if all(claims.values()) else ("partly" if any(claims.values()) else "no")
    finding = "; ".join(f"{k}: {'yes' if v else 'no'}" for k, v in claims.items()) + (
        f". Relative bias on-policy: REINFORCE {rel['reinforce']:.1e}, RLOO {rel['rloo']:.1e}, GRPO {rel['grpo']:.3f}, "
        f"LUFFY {rel['luffy']:.3f}, SRFT {rel['srft']:.3f}, SFT {rel['sft']:.1e}.")
    caption = ("Every preset of theory.estimator (Table 1 first, then its kin, then HPT with its gate) with its four "
               "UPGE parts and its exact relative bias, cosine to the target, and variance on the reference problem "
               "(G = 8), on-policy and with pi_theta drifted from the rollout policy (where clipping acts). "
               "hpt_code's RL loss is a token sum / 8192: on a one-token bandit its RL part is 8192 times weaker "
               "than its SFT part (on responses of L tokens, L/8192), hence its gate's low cosine. "
               "The numeric table is moments_table1.md.")
    return FigureResult(["moments_table1.png", "moments_table1.md"], caption, held, finding)
