"""Table 1 of the HPT paper, rendered from the estimator presets (Markdown and LaTeX).

Every row is read off a `theory.estimator.PRESETS` entry, so a preset added later appears with no
other edit. The extra column `checked` is measured here: the largest difference between the preset's
gradient and the plain-loop reference of its paper or library (toy/reference_losses.py) over a few
random batches, where such a reference exists.
"""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.registry import FigureResult, figure
from theory.estimator import PRESETS, UPGE
from toy import reference_losses

# Each part's value -> (Markdown, LaTeX).
REFERENCE = {
    "policy": ("π_θ", r"$\pi_\theta$"),
    "old": ("π_θold", r"$\pi_{\theta_{old}}$"),
    "one": ("1", r"$1$"),
    "behaviour": ("π_β", r"$\pi_\beta$"),
    "sequence_geometric": ("π_θ (π_θold / π_θ)^(1/|τ|)", r"$\pi_\theta (\pi_{\theta_{old}}/\pi_\theta)^{1/|\tau|}$"),
}
ADVANTAGE = {
    "one": ("1", r"$1$"),
    "raw": ("r (±1)", r"$r\ (\pm 1)$"),
    "group_mean": ("r − mean_G r", r"$r - \mathrm{mean}_G r$"),
    "group_norm": ("(r − mean_G r) / std_G r", r"$(r - \mathrm{mean}_G r)/\mathrm{std}_G r$"),
    "group_center_batch_std_trl": ("(r − mean_G r) / std_batch r", r"$(r - \mathrm{mean}_G r)/\mathrm{std}_{batch} r$"),
    "group_center_token_whiten_verl": ("r − mean_G r, whitened over tokens",
                                       r"$r - \mathrm{mean}_G r$, whitened over tokens"),
    "rloo": ("r − mean of the other G−1", r"$r_i - \mathrm{mean}_{j \ne i} r_j$"),
    "given": ("given (GAE)", r"given (GAE)"),
}
AGGREGATION = {
    "token_mean": ("Σ l / Σ tokens (local)", r"$\sum \ell / \sum_{tok}$ (local)"),
    "global_token_mean": ("Σ l / N_global tokens", r"$\sum \ell / N_{tok}$ (global)"),
    "seq_mean_token_mean": ("mean_i (1/|τ_i|) Σ_t l", r"$\frac{1}{S}\sum_i \frac{1}{|\tau_i|}\sum_t \ell$"),
    "seq_mean_token_sum": ("mean_i Σ_t l", r"$\frac{1}{S}\sum_i \sum_t \ell$"),
    "seq_mean_token_sum_norm": ("Σ l / (S L)", r"$\sum \ell / (S L)$"),
    "batch_token_sum_norm": ("Σ l / (S L)", r"$\sum \ell / (S L)$"),
    "token_sum_norm": ("Σ l / L", r"$\sum \ell / L$"),
}


def _mask(est: UPGE) -> tuple[str, str]:
    lo, hi = f"{1 - est.eps_low:g}", f"{1 + est.eps_high:g}"
    if est.mask == "none":
        return "none", "none"
    if est.mask == "cispo":
        return f"none; weight sg(clip(ρ, {lo}, {hi}))", rf"none; weight $sg(\mathrm{{clip}}(\rho, {lo}, {hi}))$"
    if est.mask == "vespo":
        return ("none; weight sg(φ(w)), w = Π_t ρ_t, φ(w) = e^λ w^k e^(−λw)",
                r"none; weight $sg(\phi(w))$, $w=\prod_t \rho_t$, $\phi(w)=e^\lambda w^k e^{-\lambda w}$")
    if est.mask == "sapo":
        t = f"τ+ {est.sapo_tau_pos:g}, τ− {est.sapo_tau_neg:g}"
        return f"soft gate 4/τ σ(τ(ρ−1)) ({t})", rf"soft gate $\frac{{4}}{{\tau}}\sigma(\tau(\rho-1))$ ({t})"
    kind = {"ppo_clip": "PPO clip", "dual_clip": f"dual clip (c={est.clip_c:g})",
            "sequence_clip": "sequence clip"}[est.mask]
    return f"{kind} [{lo}, {hi}]", f"{kind} $[{lo}, {hi}]$"


def _reference(est: UPGE) -> tuple[str, str]:
    md, tex = REFERENCE[est.reference]
    if est.demo_reference is None:
        return md, tex
    dmd, dtex = REFERENCE[est.demo_reference]
    return f"rollouts {md}; demos {dmd}", f"rollouts {tex}; demos {dtex}"


def _shaping(est: UPGE) -> tuple[str, str]:
    parts = [(s, who) for s, who in ((est.shaping, ""), (est.demo_shaping, " (demos)")) if s != "none"]
    if not parts:
        return "none", "none"
    g = f"{est.shaping_gamma:g}"
    return (f"f(p) = p/(p+{g}){parts[0][1]}", rf"$f(p)=p/(p+{g})${parts[0][1]}")


def reference_check(name: str, est: UPGE, seeds=(0, 1, 2)) -> float | None:
    """Largest |grad(preset) - grad(reference)| over random batches; None without a reference."""
    fn = reference_losses.REFERENCES.get(name)
    if fn is None:
        return None
    worst = 0.0
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        B, T = 8, 5
        logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
        old = (logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).clamp(max=0)
        M = torch.rand(B, T, generator=g) > 0.2
        M[:, 0] = True
        A = torch.ones(B, dtype=torch.float64) if est.advantage == "one" else torch.randn(B, generator=g,
                                                                                           dtype=torch.float64)
        demo = (torch.arange(B) % 4 == 3) if est.demo_reference else None
        x1, x2 = logp.clone().requires_grad_(), logp.clone().requires_grad_()
        (g1,) = torch.autograd.grad(est.loss(x1, old_logp=old, advantages=A, mask=M, is_demo=demo), x1)
        ref_loss = fn(x2, old, A, M, eps_low=est.eps_low, eps_high=est.eps_high, is_demo=demo)
        (g2,) = torch.autograd.grad(ref_loss, x2)
        worst = max(worst, float((g1 - g2).abs().max()))
    return worst


def render(presets: dict[str, UPGE]) -> tuple[str, str, dict[str, float | None]]:
    checks = {name: reference_check(name, est) for name, est in presets.items()}
    head = ["method", "in HPT Table 1", "reference π_ref", "advantage Â", "stabilisation mask",
            "likelihood shaping", "aggregation (ours)", "max abs(∇ − ∇ref)"]

    def row(cells):  # a Markdown table row; '|' inside a cell (|τ|) must be escaped
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    md = [row(head), "|" + "---|" * len(head)]
    tex = [r"\begin{tabular}{lllllll}", r"\toprule",
           r"Method & $\pi_{ref}$ & $\hat A$ & $\mathbb{1}_{stable}$ & shaping & aggregation & checked \\",
           r"\midrule"]
    for name, est in presets.items():
        cells = [_reference(est), ADVANTAGE[est.advantage], _mask(est), _shaping(est), AGGREGATION[est.aggregation]]
        chk = checks[name]
        chk_s = "no reference" if chk is None else f"{chk:.1e}"
        md.append(row([f"`{name}`", "yes" if est.in_table1 else "kin"] + [c[0] for c in cells] + [chk_s]))
        tex.append(" & ".join([name.replace("_", r"\_") + ("" if est.in_table1 else r"$^\dagger$")]
                              + [c[1] for c in cells] + [chk_s]) + r" \\")
    tex += [r"\bottomrule", r"\end{tabular}", r"% $^\dagger$ not in the paper's Table 1 (its kin)."]
    return "\n".join(md) + "\n", "\n".join(tex) + "\n", checks


@figure("table1", reproduces="HPT paper Table 1: every post-training method is an instance of UPGE "
        "(mask, reference policy, advantage, likelihood gradient)")
def build(out: Path) -> FigureResult:
    md, tex, checks = render(PRESETS)
    (out / "table1.md").write_text(md)
    (out / "table1.tex").write_text(tex)
    table1 = [n for n, e in PRESETS.items() if e.in_table1]
    worst = max(checks[n] for n in table1 if checks[n] is not None)
    missing = [n for n in table1 if checks[n] is None]
    held = "yes" if worst < 1e-10 and not missing else "no"
    return FigureResult(
        files=["table1.md", "table1.tex"],
        caption=("The HPT paper's Table 1 generated from ptlab's estimator presets: for each method its "
                 "reference policy (denominator), advantage, stabilisation mask, likelihood-gradient shaping, "
                 "and our extra column, the aggregation over tokens and sequences. Rows marked 'kin' are "
                 "methods the paper discusses in its text but not in Table 1. The last column is measured: "
                 "the largest gradient difference between the preset and a plain-loop implementation of the "
                 "method's own formula (toy/reference_losses.py) on random batches."),
        held=held,
        finding=(f"all {len(table1)} Table-1 methods are UPGE instances in code: the preset gradient matches "
                 f"the method's own loss to {worst:.1e} (float64)"
                 + (f"; no reference for {missing}" if missing else "")),
    )
