"""XRIGHT's convex picture, computed exactly on log-linear instances (theory/forgetting.py).

Three figures: the toy contour plot with the trajectories of every schedule (the paper's lost Fig. 2,
rebuilt on the instance of docs/xright.md section 4), the trade-off plane and gap bars in the layout of
the paper's Pythia-1b figure, and the sequential lower bound (theory/README.md s3, Thm 1) against the
realised gap as the split varies. Everything is full-batch and exact, so each figure takes seconds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.registry import FigureResult, figure, save_figure  # noqa: E402
from theory.forgetting import (  # noqa: E402
    run_schedule,
    sequential_final,
    sequential_lower_bound,
    toy_problem,
)
from theory.schedules import Alright, Maxright, Mix, Sequential  # noqa: E402

THETA0 = np.array([-2.0, -2.0])
COLORS = {"Sequential": "tab:red", "Sequential SFT->DPO": "tab:red", "Sequential DPO->SFT": "tab:orange",
          "Mix": "tab:green", "ALRIGHT": "tab:blue", "MAXRIGHT": "tab:purple"}


def _decay(base: float):
    return lambda t: base / np.sqrt(1.0 + t / 100.0)


@figure("forgetting_toy", reproduces="XRIGHT Fig. 2 (toy): sequential SFT/DPO misses the trade-off optimum, "
        "ALRIGHT reaches it, MAXRIGHT reaches its Chebyshev point")
def forgetting_toy(out: Path) -> FigureResult:
    p, lam, N = toy_problem(), 0.5, 4000
    th_sft, th_dpo, (th_mix, _) = p.optimum(0.0)[0], p.optimum(1.0)[0], p.optimum(lam)
    th_c, _ = p.chebyshev_point(lam)
    runs = {
        "Sequential SFT->DPO": run_schedule(p, Sequential(order=("sft", "dpo"), split=0.5, total_steps=N), N,
                                            THETA0, 0.5),
        "Sequential DPO->SFT": run_schedule(p, Sequential(order=("dpo", "sft"), split=0.5, total_steps=N), N,
                                            THETA0, 0.5),
        "Mix": run_schedule(p, Mix(lam), N, THETA0, 0.5),
        "ALRIGHT": run_schedule(p, Alright(lam, seed=0), N, THETA0, _decay(0.5)),
        "MAXRIGHT": run_schedule(p, Maxright(lam, p.ideal_point(), k=1), N, THETA0, _decay(0.5)),
    }
    gaps = {k: float(p.gap_mix(r.theta, lam)) for k, r in runs.items()}
    gaps["ALRIGHT"] = float(p.gap_mix(runs["ALRIGHT"].thetas[N // 2:].mean(axis=0), lam))  # tail average

    fig, ax = plt.subplots(figsize=(7.5, 6))
    g1 = np.linspace(-2.5, 1.8, 220)
    g2 = np.linspace(-2.5, 2.6, 220)
    T1, T2 = np.meshgrid(g1, g2)
    Z = p.f_mix(np.stack([T1, T2], axis=-1), lam)
    cs = ax.contour(T1, T2, Z, levels=np.quantile(Z, np.linspace(0.005, 0.6, 18)), cmap="Greys", linewidths=0.7)
    ax.clabel(cs, fontsize=6, fmt="%.2f")
    for name, r in runs.items():
        ax.plot(r.thetas[:, 0], r.thetas[:, 1], color=COLORS[name], lw=1.4, label=f"{name} (gap {gaps[name]:.3f})",
                alpha=0.9)
        ax.plot(*r.theta, "o", color=COLORS[name], ms=5)
    ax.plot(*th_sft, "s", color="k", ms=8, label="SFT optimum")
    ax.plot(*th_dpo, "^", color="k", ms=8, label="DPO optimum")
    ax.plot(*th_mix, "*", color="gold", mec="k", ms=15, label="Average Opt. Point (argmin f_mix)")
    ax.plot(*th_c, "P", color="tab:purple", mec="k", ms=10, label="Chebyshev point (MAXRIGHT target)")
    ax.plot(*THETA0, "kx", ms=8)
    ax.set_xlabel(r"$\theta_1$")
    ax.set_ylabel(r"$\theta_2$")
    ax.set_title(r"contours of $f_{mix}$, $\lambda=0.5$: one prompt, 3 responses, $\theta\in\mathbb{R}^2$", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.85)
    fig.tight_layout()
    save_figure(fig, out / "forgetting_toy.png", dpi=130)
    plt.close(fig)

    seq = min(gaps["Sequential SFT->DPO"], gaps["Sequential DPO->SFT"])
    held = "yes" if seq > 10 * gaps["ALRIGHT"] and seq > 10 * gaps["Mix"] else "no"
    c_gap = float(p.gap_mix(th_c, lam))
    finding = (f"f_mix gaps after {N} steps: Seq SFT->DPO {gaps['Sequential SFT->DPO']:.3f}, Seq DPO->SFT "
               f"{gaps['Sequential DPO->SFT']:.3f}, Mix {gaps['Mix']:.1e}, ALRIGHT (tail average) "
               f"{gaps['ALRIGHT']:.1e}, MAXRIGHT {gaps['MAXRIGHT']:.1e} (its Chebyshev point's gap {c_gap:.1e}, "
               f"distance to it {np.linalg.norm(runs['MAXRIGHT'].theta - th_c):.1e}).")
    caption = ("Contours of f_mix = 0.5 f_DPO + 0.5 f_SFT on the 2-D log-linear toy (docs/xright.md section 4, ours: "
               "SFT target (0.2, 0.7, 0.1), DPO pairs from a Bradley-Terry reward (2, 0, 1), beta = 1) with the "
               "trajectories from (-2, -2): Sequential in both orders (half the 4000 steps each, step 0.5), "
               "Mix (step 0.5), ALRIGHT and exact MAXRIGHT (step 0.5/sqrt(1+t/100)). Sequential ends at the "
               "second objective's optimum; Mix and ALRIGHT at argmin f_mix; MAXRIGHT at the Chebyshev point.")
    return FigureResult(["forgetting_toy.png"], caption, held, finding, {"gaps": gaps})


def _pythia_runs(p, lam: float, n_dpo: int, n_sft: int, lr: float):
    """One column of the Pythia-1b layout: DPO->SFT split (n_dpo, n_sft) against joint runs of the same length."""
    N = n_dpo + n_sft
    ideal = p.ideal_point()
    return {
        "Sequential": run_schedule(p, Sequential(stages=[("dpo", n_dpo), ("sft", n_sft)]), N, THETA0, lr),
        "Mix": run_schedule(p, Mix(lam), N, THETA0, lr),
        "ALRIGHT": run_schedule(p, Alright(lam, seed=42), N, THETA0, lr),
        "MAXRIGHT": run_schedule(p, Maxright(lam, ideal, k=10), N, THETA0, lr),
    }


@figure("forgetting_tradeoff", reproduces="XRIGHT Pythia-1b DPO->SFT figure (layout): trajectories in the "
        "(f_SFT, f_DPO) plane, optimality gaps and ideal distance per method and lambda")
def forgetting_tradeoff(out: Path) -> FigureResult:
    p, epoch, lr = toy_problem(), 300, 0.3
    lams = [0.01, 0.25, 0.5, 0.75, 0.99]
    splits = [(1, 5), (2, 4), (3, 3), (4, 2), (5, 1)]          # (T_DPO, T_SFT) epochs, as in the paper
    ideal = p.ideal_point()
    front = p.pareto_front(np.linspace(0, 1, 101))
    methods = ["Sequential", "Mix", "ALRIGHT", "MAXRIGHT"]
    res = {m: {"dpo": [], "sft": [], "ideal": [], "evals": []} for m in methods}
    fig = plt.figure(figsize=(16, 7.5))
    gs = fig.add_gridspec(2, 20, height_ratios=[1.15, 1])    # 5 trajectory panels over 4 bar panels
    for c, (lam, (a, b)) in enumerate(zip(lams, splits)):
        runs = _pythia_runs(p, lam, a * epoch, b * epoch, lr)
        ax = fig.add_subplot(gs[0, 4 * c:4 * c + 4])
        ax.plot(front.f_sft, front.f_dpo, "k-", lw=0.8, alpha=0.5, label="Pareto front")
        ax.axvline(ideal[0], color="k", ls="--", lw=0.6)
        ax.axhline(ideal[1], color="k", ls="--", lw=0.6)
        ax.plot(*ideal, "k*", ms=11, label="ideal point")
        for m, r in runs.items():
            ax.plot(r.f_sft, r.f_dpo, color=COLORS[m], lw=1.2, alpha=0.85, label=m)
            ax.plot(r.f_sft[-1], r.f_dpo[-1], "o", color=COLORS[m], ms=5)
            gd, gsft = r.f_dpo[-1] - ideal[1], r.f_sft[-1] - ideal[0]
            res[m]["dpo"].append(gd)
            res[m]["sft"].append(gsft)
            res[m]["ideal"].append(float(np.hypot(gd, gsft)))
            res[m]["evals"].append(int(r.grad_evals[-1]))
        ax.set_xlim(ideal[0] - 0.05, ideal[0] + 1.2)
        ax.set_ylim(ideal[1] - 0.05, ideal[1] + 1.0)
        ax.set_title(rf"$(T_{{DPO}},T_{{SFT}})=({a},{b})$ / $\lambda$={lam}", fontsize=9)
        ax.set_xlabel(r"$f_{SFT}$")
        if c == 0:
            ax.set_ylabel(r"$f_{DPO}$")
            ax.legend(fontsize=7)
    panels = [("dpo", "RLHF (DPO) optimality gap"), ("sft", "SFT optimality gap"), ("ideal", "ideal distance"),
              ("evals", "gradient evaluations vs Sequential (%)")]
    x = np.arange(len(lams))
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(gs[1, 5 * k:5 * k + 5])
        for j, m in enumerate(methods):
            vals = np.array(res[m][key], dtype=float)
            if key == "evals":
                vals = 100 * (vals / np.array(res["Sequential"]["evals"]) - 1)
            ax.bar(x + (j - 1.5) * 0.2, vals, width=0.2, color=COLORS[m], label=m)
        ax.set_xticks(x, [f"({a},{b})/{lam}" for lam, (a, b) in zip(lams, splits)], fontsize=7)
        ax.set_title(title, fontsize=9)
    fig.suptitle("DPO->SFT trade-off on the log-linear toy (layout of XRIGHT's Pythia-1b figure; shape, not values)",
                 fontsize=11)
    fig.tight_layout()
    save_figure(fig, out / "forgetting_tradeoff.png", dpi=110)
    plt.close(fig)

    ideal_d = {m: np.array(res[m]["ideal"]) for m in methods}
    seq_worst = [int(ideal_d["Sequential"][c] >= max(ideal_d[m][c] for m in methods)) for c in range(len(lams))]
    n_worst = sum(seq_worst)
    held = "yes" if n_worst == len(lams) else ("partly" if n_worst >= 3 else "no")
    fmt = lambda v: "/".join(f"{u:.2f}" for u in v)  # noqa: E731
    finding = (f"Ideal distance per column (lambda {lams}): Seq {fmt(ideal_d['Sequential'])}, Mix "
               f"{fmt(ideal_d['Mix'])}, ALRIGHT {fmt(ideal_d['ALRIGHT'])}, MAXRIGHT (k=10) {fmt(ideal_d['MAXRIGHT'])}; "
               f"Sequential is the farthest from the ideal point in {n_worst} of {len(lams)} columns "
               f"(Pythia-1b: 5 of 5). Seq DPO gaps {fmt(res['Sequential']['dpo'])} (Pythia 0.99..0.66). "
               f"Mix pays {res['Mix']['evals'][0]} gradient evaluations to the others' {res['ALRIGHT']['evals'][0]}.")
    caption = ("Top: trajectories in the (f_SFT, f_DPO) plane on the toy instance for lambda = 0.01..0.99 against "
               "the Sequential DPO->SFT split (T_DPO, T_SFT) in 'epochs' of 300 full-batch steps, constant step "
               "0.3 for all methods, MAXRIGHT with values refreshed every k = 10 steps (released code); exact "
               "Pareto front and ideal point (star). Bottom: final DPO gap, SFT gap, Euclidean distance to the "
               "ideal point, and the cost in gradient evaluations relative to Sequential (our analogue of the "
               "runtime bars; Mix pays two per step). Compare the shape, not the values, with "
               "docs/xright.md section 5.4.")
    return FigureResult(["forgetting_tradeoff.png"], caption, held, finding,
                        {m: {k: [float(v) for v in vals] for k, vals in d.items()} for m, d in res.items()})


@figure("forgetting_seq_bound", reproduces="XRIGHT Thm 3.1/3.3 (sequential SFT/DPO stays Omega(1) from the "
        "trade-off optimum): ptlab's certified lower bound vs the realised gap over splits")
def forgetting_seq_bound(out: Path) -> FigureResult:
    p, lam, lr = toy_problem(), 0.5, 0.5
    budgets = [100, 1000, 10000]
    fracs = np.linspace(0, 1, 101)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    ok, lines = True, []
    for ax, order in zip(axes[:2], [("sft", "dpo"), ("dpo", "sft")]):
        b0 = sequential_lower_bound(p, lam, order, lr, THETA0)
        for N, shade in zip(budgets, [0.35, 0.65, 1.0]):
            n1 = np.round(fracs * N).astype(int)
            gaps = p.gap_mix(sequential_final(p, order, lr, THETA0, N, n1), lam)
            ok &= bool(gaps.min() >= b0.bound - 1e-12)
            ax.plot(fracs, gaps, color=plt.cm.Blues(shade), label=f"realised gap, N = {N}")
        ax.axhline(b0.bound, color="tab:red", lw=1.5, label=f"certificate, every split ({b0.bound:.1e})")
        ax.axhline(b0.asymptotic_gap, color="k", ls="--", lw=1,
                   label=f"gap at theta*_{order[1]} ({b0.asymptotic_gap:.3f})")
        ax.axhline(b0.gradient_bound, color="gray", ls=":", lw=1, label=f"closed form ({b0.gradient_bound:.3f})")
        ax.set_yscale("log")
        ax.set_xlabel(f"fraction of the budget in the first stage ({order[0].upper()})")
        ax.set_ylabel(r"$f_{mix}(\theta_{seq}) - f^*_{mix}$")
        ax.set_title(f"Sequential {order[0].upper()} -> {order[1].upper()}, lambda = {lam}", fontsize=10)
        ax.legend(fontsize=7)
        lines.append((order, b0))
    ax = axes[2]
    ms = [0, 5, 10, 20, 40, 80, 160, 320]
    for order in [("sft", "dpo"), ("dpo", "sft")]:
        cert = [sequential_lower_bound(p, lam, order, lr, THETA0, min_stage_steps=m).bound for m in ms]
        N = 2 * ms[-1] + 1000
        real = []
        for m in ms:
            gaps = p.gap_mix(sequential_final(p, order, lr, THETA0, N, np.arange(m, N - m + 1, 4)), lam)
            real.append(gaps.min())
            ok &= bool(gaps.min() >= cert[ms.index(m)] - 1e-12)
        c = "tab:red" if order[0] == "sft" else "tab:orange"
        ax.plot(np.array(ms) + 1, cert, "-o", color=c, ms=4, label=f"certificate {order[0]}->{order[1]}")
        ax.plot(np.array(ms) + 1, real, "--", color=c, label=f"min realised gap, N = {N}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("1 + minimum steps per stage m")
    ax.set_title("certificate for splits with both stages >= m", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "forgetting_seq_bound.png", dpi=120)
    plt.close(fig)
    positive = all(b.bound > 0 for _, b in lines)
    held = "yes" if ok and positive else "no"
    finding = "; ".join(f"{o[0]}->{o[1]}: certificate {b.bound:.2e} for every split and budget, {b.asymptotic_gap:.3f} "
                        f"in the limit (closed form >= {b.gradient_bound:.3f})" for o, b in lines)
    finding += f"; realised gaps never below the certificate: {ok}."
    caption = ("Sequential training on the toy (lambda = 0.5, step 0.5, start (-2, -2)). Left and middle: the "
               "realised f_mix gap over the split for budgets N = 100, 1000, 10000, the certified lower bound of "
               "theory/README.md s3 Thm 1 (valid for every split and every budget at once), the limit gap at the "
               "second objective's optimum and its closed-form lower bound. A well-timed short second stage can "
               "pass near argmin f_mix, so the every-split certificate is small in SFT->DPO; right: the "
               "certificate for splits giving each stage at least m steps rises to the limit gap.")
    return FigureResult(["forgetting_seq_bound.png"], caption, held, finding)
