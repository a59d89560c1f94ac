"""Dr. Post-Training figures in the toy world (toy/datareg.py): the bias-variance spectrum of the update
rules, and target loss against steps (the shape of the paper's SFT perplexity curves, drpt.md 1.6)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.registry import FigureResult, figure  # noqa: E402
from theory.projection import update_moments  # noqa: E402
from toy.datareg import World, rule, spectrum_draws, train  # noqa: E402

N_GENERAL = 8


def spectrum(draws: int = 400, seed: int = 0) -> dict:
    """Moments (bias^2, variance, MSE with standard errors) of every rule at one checkpoint."""
    world = World(seed=seed)
    rules = {"Target-only": lambda m: rule("target_only"), "Span": lambda m: rule("span"),
             "GEM": lambda m: rule("gem"), "A-GEM": lambda m: rule("agem"), "Cone": lambda m: rule("cone"),
             "Hull": lambda m: rule("hull"), "Filter": lambda m: rule("filter"),
             "Full-Training": lambda m: rule("full")}
    for k in range(1, N_GENERAL + 1):
        rules[f"global k={k}"] = lambda m, k=k: rule("subset", k, "global", m)
    for gran in ("block", "layer"):
        for k in (2, 4, 6):
            rules[f"{gran} k={k}"] = lambda m, k=k, gran=gran: rule("subset", k, gran, m)
    samples, truth = spectrum_draws(world, rules, draws=draws, n=N_GENERAL, m=1, seed=seed)
    return {name: update_moments(U, truth) for name, U in samples.items()}


def _panel(ax, names, mom, title, xlabel, strip=""):
    x = np.arange(len(names))
    for key, lab, c in (("bias2", "bias$^2$", "C0"), ("variance", "variance", "C1"), ("mse", "MSE", "k")):
        y = np.array([getattr(mom[n], key) for n in names])
        se = np.array([getattr(mom[n], "se_" + key) for n in names])
        ax.errorbar(x, y, yerr=2 * se, marker="o", ms=4, capsize=2, color=c, label=lab)
    ax.set_xticks(x, [n.replace(strip, "") for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel, fontsize=9)


@figure("projection_spectrum",
        reproduces="Dr. Post-Training abstract: standard training and data selection are special cases at "
                   "different points of a bias-variance spectrum (regularisation strength)")
def build_spectrum(out: Path) -> FigureResult:
    mom = spectrum()
    # panel (a): set types, ordered by measured variance (high variance = weak regularisation)
    types = sorted(["Target-only", "Span", "GEM", "A-GEM", "Cone", "Hull", "Filter", "Full-Training"],
                   key=lambda n: -mom[n].variance)
    ks = [f"global k={k}" for k in range(1, N_GENERAL + 1)]
    grans = [f"{g} k={k}" for k in (2, 4, 6) for g in ("layer", "block", "global")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    _panel(axes[0], types, mom, "(a) set type (sorted by variance)", "rule")
    _panel(axes[1], ks, mom, "(b) global subset, k of n = 8", "k", strip="global ")
    _panel(axes[2], grans, mom, "(c) granularity at k = 2, 4, 6", "rule")
    axes[0].set_ylabel("squared error vs true target gradient")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "projection_spectrum.png", dpi=130)
    plt.close(fig)

    t, f = mom["Target-only"], mom["Full-Training"]
    ends = t.variance > f.variance and f.bias2 > t.bias2
    sub = [mom[f"global k={k}"] for k in (2, 4, 6)]
    between = all(f.variance < s.variance < t.variance and t.bias2 < s.bias2 < f.bias2 for s in sub)
    var_k = [mom[n].variance for n in ks]
    bias_k = [mom[n].bias2 for n in ks]
    k_mono = var_k[0] > var_k[-1] and bias_k[0] < bias_k[-1]
    nest = [mom[f"layer k={k}"].bias2 <= mom[f"global k={k}"].bias2 for k in (2, 4, 6)]
    held = "yes" if ends and between and k_mono else ("partly" if ends else "no")
    finding = (f"Target-only bias^2 {t.bias2:.3g} (se {t.se_bias2:.2g}), variance {t.variance:.3g}; "
               f"Full-Training bias^2 {f.bias2:.3g}, variance {f.variance:.3g}; global subset k=2,4,6 "
               f"{'strictly between in both' if between else 'not strictly between'}; over k=1..8 the "
               f"variance goes {var_k[0]:.3g} -> {var_k[-1]:.3g} and bias^2 {bias_k[0]:.3g} -> "
               f"{bias_k[-1]:.3g}; layer-wise bias^2 <= global at {sum(nest)}/3 of k=2,4,6; lowest MSE: "
               f"{min(mom, key=lambda n: mom[n].mse)}.")
    caption = ("Bias squared, variance and MSE (log scale, bars = 2 standard errors, 400 draws) of each update "
               "rule against the true target gradient, in the toy world at a checkpoint after 200 "
               "Full-Training steps. Each draw: one target example (m = 1, as in the released SFT code) "
               "and a fresh general minibatch of n = 8. (a) set types: Whole (Target-only), Span, GEM "
               "half-spaces, A-GEM half-space, Cone, Hull, negative filtering, Point (Full-Training), ordered "
               "by variance; (b) global subset (GREATS-style top-k, lmo over SubsetAverages) for k = 1..8, "
               "k = 8 being Full-Training; (c) layer-wise, block-wise and global subset rules at k = 2, 4, 6.")
    return FigureResult(files=["projection_spectrum.png"], caption=caption, held=held, finding=finding,
                        extra={n: [m.bias2, m.variance, m.mse] for n, m in mom.items()})


CURVE_RULES = ["Target-only", "Full-Training", "Global Subset", "Layer-Wise Subset", "Cone projection"]


def curves(steps: int = 2000, seeds: tuple = (0, 1, 2), k: int = 4) -> dict:
    """Target loss against steps for the five rules, one run per seed, same world per seed."""
    out = {}
    for name in CURVE_RULES:
        runs = []
        for s in seeds:
            world = World(seed=s)
            args = {"Target-only": ("target_only",), "Full-Training": ("full",),
                    "Global Subset": ("subset", k, "global", world.student(s)),
                    "Layer-Wise Subset": ("subset", k, "layer", world.student(s)),
                    "Cone projection": ("cone",)}[name]
            f = rule(*args)
            runs.append(train(world, f, steps=steps, n=N_GENERAL, m=1, seed=s))
        out[name] = {"steps": runs[0]["steps"], "loss": np.stack([r["loss"] for r in runs])}
    return out


def k_sweep(steps: int = 2000, ks: tuple = (1, 2, 4, 6), seed: int = 0) -> dict:
    """Final and minimum target loss of the subset rules over k and granularity."""
    res = {}
    for gran in ("global", "block", "layer"):
        for k in ks:
            world = World(seed=seed)
            r = train(world, rule("subset", k, gran, world.student(seed)), steps=steps, n=N_GENERAL, m=1,
                      seed=seed)
            res[(gran, k)] = (r["loss"][-1], r["loss"].min())
    return res


@figure("projection_target_loss",
        reproduces="Dr. Post-Training SFT perplexity curves (drpt.md 1.6): Target-only overfits, Full-Training "
                   "is biased, Global and Layer-Wise Subset sit between, Layer-Wise best",
        slow=True)
def build_curves(out: Path, steps: int = 2000, seeds: tuple = (0, 1, 2)) -> FigureResult:
    cur = curves(steps=steps, seeds=seeds)
    sweep = k_sweep(steps=steps)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colors = {"Target-only": "C7", "Full-Training": "k", "Global Subset": "C2", "Layer-Wise Subset": "C3",
              "Cone projection": "C0"}
    for name, c in cur.items():
        mean = c["loss"].mean(0)
        se = c["loss"].std(0) / np.sqrt(c["loss"].shape[0])
        axes[0].plot(c["steps"], mean, color=colors[name], label=name)
        axes[0].fill_between(c["steps"], mean - se, mean + se, color=colors[name], alpha=0.2)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("held-out target MSE")
    axes[0].set_title(f"(a) target loss, mean of {len(seeds)} seeds (band = 1 SE), k = 4 of 8", fontsize=10)
    axes[0].legend(fontsize=8)
    ks = sorted({k for _, k in sweep})
    for gran, c in (("global", "C2"), ("block", "C1"), ("layer", "C3")):
        axes[1].plot(ks, [sweep[(gran, k)][0] for k in ks], "o-", color=c, label=f"{gran} (final)")
        axes[1].plot(ks, [sweep[(gran, k)][1] for k in ks], "o:", color=c, alpha=0.6, label=f"{gran} (min)")
    axes[1].set_xlabel("k (of n = 8)")
    axes[1].set_ylabel("held-out target MSE")
    axes[1].set_title("(b) subset rules: k and granularity (seed 0)", fontsize=10)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "projection_target_loss.png", dpi=130)
    plt.close(fig)

    fin = {n: float(c["loss"][:, -1].mean()) for n, c in cur.items()}
    mn = {n: float(c["loss"].mean(0).min()) for n, c in cur.items()}
    ratio = fin["Target-only"] / mn["Target-only"]
    between = all(fin[s] < min(fin["Target-only"], fin["Full-Training"])
                  for s in ("Global Subset", "Layer-Wise Subset"))
    lw_best = fin["Layer-Wise Subset"] <= fin["Global Subset"]
    held = "yes" if ratio > 1.3 and between and lw_best else ("partly" if ratio > 1.3 or between else "no")
    finding = (f"Final/min target loss: Target-only {fin['Target-only']:.3f}/{mn['Target-only']:.3f} "
               f"(x{ratio:.2f}); Full-Training {fin['Full-Training']:.3f}/{mn['Full-Training']:.3f}; Global "
               f"{fin['Global Subset']:.3f}; Layer-Wise {fin['Layer-Wise Subset']:.3f}; Cone projection "
               f"{fin['Cone projection']:.3f} (mean of {len(seeds)} seeds, {steps} steps). Best final in the "
               f"k/granularity sweep: {min(sweep, key=lambda q: sweep[q][0])}.")
    caption = ("Toy world (toy/datareg.py): held-out target MSE against steps, Adam lr 3e-3 decaying "
               "linearly to 0, one target example per step from 16 scarce noisy target examples, a fresh "
               "general minibatch of 8 per step (half from the target teacher, half from a function "
               "correlated 0.7 with it). (a) "
               "Target-only (Whole), Full-Training (Point at the general mean), Global Subset and Layer-Wise "
               "Subset (lmo over SubsetAverages, one group or one per layer, k = 4) and the Cone projection. "
               "(b) final (solid) and minimum (dotted) target loss of the subset rules for k = 1, 2, 4, 6 at "
               "global, block (2 layers) and layer granularity.")
    return FigureResult(files=["projection_target_loss.png"], caption=caption, held=held, finding=finding,
                        extra={"final": fin, "min": mn,
                               "sweep": {f"{g} k={k}": list(v) for (g, k), v in sweep.items()}})
