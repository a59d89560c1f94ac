"""Figure: XRIGHT's convex theory beside the miniature's measured gaps (issue 13's last XRIGHT item).

`theory/forgetting.py` analyses SFT and DPO on a log-linear policy; `experiments/fig_xright.py` measures them
on the tiny transformer. This module builds a log-linear instance from the same data and the same base model,
runs the same schedules on it with the same protocol, and asks whether the theory's instance predicts the
miniature's ranking of the methods. The instance and the rule below are ours; nothing here is the paper's.

The instance (built, not fitted to any outcome: no quantity below is chosen by looking at a result).
- Contexts: every prompt of the miniature's training sets, `sft_terse.jsonl` (1024) and `dpo.jsonl` (1024),
  and of its held-out sets, `test_terse.jsonl` and `test_pref.jsonl` (256 each). Responses: two per prompt,
  the terse answer and the worked solution (`toy.world.terse`, `toy.world.worked_of`): the two styles the
  objectives fight over.
- Policy: the first-order model of the base around its weights w0, restricted to a random subspace and to the
  two responses: log pi(y|x) = c log p0(y|x) + sum_k theta_k g_k(x, y) - log Z(x), with p0 the base's likelihood
  of the whole completion (the trainer's token layout: prompt + completion + eos, max_length 96) and
  g_k(x, y) = d/de log p0_{w0 + e r_k}(y|x) at e = 0, the derivative along the k-th of d = 16 random directions
  r_k (i.i.d. Gaussian over every parameter, seed 0, scaled to unit norm). So features
  phi(x, y) = (g_1, ..., g_16, log p0) and theta_ref = (0, ..., 0, 1): the reference is the base,
  renormalised over the two responses, and training starts there (theta_0 = theta_ref).
- Objectives (`theory.forgetting.LogLinearProblem`): S uniform over (SFT prompt, terse answer), P uniform over
  (DPO prompt, worked, terse), beta = the miniature's DPO beta (0.1). Held out: the same construction on the
  test prompts, evaluated at the trained theta.

The runs on the instance mirror `fig_xright`'s protocol. 200 steps with minibatches of 16 examples and/or 16
pairs (`theory.forgetting.run_schedule`), seeds 1, 2, 3 (the minibatch stream and ALRIGHT's draws). The
schedules are the objects the trainer runs (`theory.schedules`): Sequential SFT->DPO with stages
((1 - lam) 200, lam 200), Sequential DPO->SFT (lam 200, (1 - lam) 200), Mix, ALRIGHT, MAXRIGHT k = 1 and
k = 10, at lam in {0.25, 0.5, 0.75}. One constant step for every method, fixed in advance by the theory rather
than tuned: eta = 1 / (2 max(L_sft, L_dpo)) (`LogLinearProblem.constants`), the largest step that both
Theorem 1 (eta <= 2 / L) and Theorem 2 (eta <= 1 / (2 L_lam), every lam) allow. MAXRIGHT's f* are the
instance's own single-objective runs of the same budget on seed 0, evaluated on the training sets, as the
miniature took its f* from seed-0 runs. The ideal point of seed s: the held-out values of the single-objective
runs (Mix at lam 0 and lam 1) of seed s; ideal distance = the Euclidean norm of the two held-out gaps at step
200, as in `fig_xright`.

Beside the runs, what the theorems certify on the instance (reported, not graded):
- whether each f_lam attains its minimum (`finite_minimiser`, lam in {0, 0.25, 0.5, 0.75, 1});
- Theorem 1 (sequential's certified gap to f*_lam, every split and budget) where both single-objective
  minima exist: it needs them, and says so otherwise;
- Theorem 2 (ALRIGHT's rate): its bound on E f_lam(averaged iterate) - f*_lam at eta and T = 200, beside the
  realised value of the three seeds, where the minimum of f_lam exists.

The measured side: the per-seed held-out ideal distances that `xright_tradeoff` records in
`<out>/meta/xright_tradeoff.json` (so build that figure first; `ptlab figures` does, as this module sorts
after `fig_xright`).

Verdict rule xright_convex, written and committed before the instance was built or run: with the mean ideal
distance over seeds 1-3 of each (method, lam) cell, for the six methods and three lam,
(A) at two or more of the three lam, the method with the lowest mean ideal distance on the instance is among
    the two lowest measured at that lam;
(B) the Spearman rank correlation between instance and measured mean ideal distances over the 18 cells is at
    least 0.5.
held = yes if A and B hold, partly if one, no if neither ("held" here: the convex instance predicts the
miniature's ranking).

Stated after the first build (2 Dec 2026): the first record (commit 7eea452) was built on a base trained on this
machine with torch's AVX-512 kernels, which is not the base the measured runs used (its ladder differs: README
"The miniature world"). It gave held = yes (Spearman 0.59, agreement at lam 0.25 and 0.75). The base is now
trained with pinned kernels (`toy/pretrain.py`) and reproduces the measured runs' base; the record was rebuilt on
it with the rule and code unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from experiments.fig_xright import COLOR, LABEL, LAMS, METHODS, SEQ, WORLD, mean  # noqa: E402
from experiments.registry import FigureResult, figure, save_figure  # noqa: E402
from experiments.verdicts import grade  # noqa: E402
from theory.forgetting import LogLinearProblem, alright_rate_bound, run_schedule, sequential_lower_bound  # noqa: E402
from theory.schedules import Alright, Maxright, Mix, Sequential  # noqa: E402

D = 16              # random directions of the tangent model
DIRECTION_SEED = 0
BETA = 0.1          # the miniature's DPO beta (the trainer's default; the XRIGHT configs keep it)
MAX_LENGTH = 96     # the XRIGHT configs' data.max_length
STEPS, BATCH, SEEDS = 200, 16, (1, 2, 3)
SETS = {"train_sft": "sft_terse.jsonl", "train_pref": "dpo.jsonl", "test_sft": "test_terse.jsonl",
        "test_pref": "test_pref.jsonl"}
MEASURED = "meta/xright_tradeoff.json"


# ------------------------------------------------------------------------------------------ the tangent model
def directions(model, d: int = D, seed: int = DIRECTION_SEED):
    """[P, d] float64: d Gaussian directions over every (distinct) parameter, each scaled to unit norm."""
    import torch

    g = torch.Generator().manual_seed(seed)
    n = sum(p.numel() for p in model.parameters())
    r = torch.randn(n, d, generator=g, dtype=torch.float64)
    return r / r.norm(dim=0, keepdim=True)


def tangent_features(model, tok, prompts: list[str], completions: list[str], dirs) -> np.ndarray:
    """[N, d + 1]: (g_1 .. g_d, log p0) per (prompt, completion), with log p0 the model's summed log-likelihood
    of the completion (the trainer's token layout) and g_k its derivative along column k of `dirs`."""
    import torch

    from scale.data import IGNORE, tokenize_pairs
    from scale.logprobs import reference_logprobs

    params = list(model.parameters())
    out = np.empty((len(prompts), dirs.shape[1] + 1))
    for i, row in enumerate(tokenize_pairs(prompts, completions, tok, MAX_LENGTH)):
        ids = torch.tensor([row["input_ids"]])
        scored = torch.tensor([row["labels"]]) != IGNORE
        lp = reference_logprobs(model, ids, torch.ones_like(ids), scored).sum()
        grad = torch.cat([g.reshape(-1).double() for g in torch.autograd.grad(lp, params)])
        out[i, :-1] = (grad @ dirs).numpy()
        out[i, -1] = lp.item()
    return out


def world_features(world: Path = WORLD) -> dict[str, dict]:
    """Features of the terse and the worked response for every prompt of the four sets:
    {set: {"terse": [N, d+1], "worked": [N, d+1]}}, from the world's base model in float64."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toy.world import worked_of

    model = AutoModelForCausalLM.from_pretrained(world / "base", dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(world / "base")
    dirs = directions(model)
    feats = {}
    for name, file in SETS.items():
        rows = [json.loads(line) for line in (world / "data" / file).read_text().splitlines() if line.strip()]
        prompts = [r["prompt"] for r in rows]
        styles = {"terse": [r.get("completion", r.get("rejected")) for r in rows],      # the SFT target
                  "worked": [r.get("chosen") or worked_of(r["prompt"]) for r in rows]}  # the preferred answer
        feats[name] = {s: tangent_features(model, tok, prompts, c, dirs) for s, c in styles.items()}
    return feats


def problem(sft: dict, pref: dict) -> LogLinearProblem:
    """The instance on one SFT set and one preference set: contexts = SFT prompts then preference prompts,
    response 0 = terse, 1 = worked; S uniform over (SFT prompt, terse), P uniform over (pref prompt, worked,
    terse); theta_ref = theta_0 = (0, ..., 0, 1), the base renormalised over the two responses."""
    phi = np.concatenate([np.stack([f["terse"], f["worked"]], axis=1) for f in (sft, pref)])
    n_s, n_p = len(sft["terse"]), len(pref["terse"])
    S = np.zeros(phi.shape[:2])
    S[:n_s, 0] = 1.0 / n_s
    P = np.zeros((len(phi), 2, 2))
    P[n_s:, 1, 0] = 1.0 / n_p
    return LogLinearProblem(phi, S, P, beta=BETA, theta_ref=start(phi.shape[-1]))


def start(dim: int) -> np.ndarray:
    theta = np.zeros(dim)
    theta[-1] = 1.0
    return theta


# ------------------------------------------------------------------------------------------ runs on the instance
def schedule(method: str, lam: float, seed: int, f_star: dict[str, float]):
    """The `theory.schedules` object of a (method, lam) cell, as `fig_xright`'s configs build it."""
    n_dpo = round(lam * STEPS)
    if method == "seq_sft_dpo":
        return Sequential(stages=[("sft", STEPS - n_dpo), ("dpo", n_dpo)])
    if method == "seq_dpo_sft":
        return Sequential(stages=[("dpo", n_dpo), ("sft", STEPS - n_dpo)])
    if method == "mix":
        return Mix(lam)
    if method == "alright":
        return Alright(lam, seed=seed)
    if method.startswith("maxright_k"):
        return Maxright(lam, f_star, k=int(method.removeprefix("maxright_k")))
    raise ValueError(f"method: unknown {method!r}")


def instance_runs(train: LogLinearProblem, test: LogLinearProblem) -> dict:
    """Every cell on the instance: {"eta", "f_star", "ideal": {seed: {sft, dpo}}, "runs": {(m, lam): {seed: Run}},
    "distance": {(m, lam): {seed: held-out ideal distance at STEPS}}}."""
    c = train.constants()
    eta = 1.0 / (2 * max(c["L_sft"], c["L_dpo"]))
    theta0 = start(train.dim)

    def single(lam, seed):
        return run_schedule(train, Mix(lam), STEPS, theta0, eta, batch_size=BATCH, seed=seed)

    f_star = {"sft": float(single(0.0, 0).f_sft[-1]), "dpo": float(single(1.0, 0).f_dpo[-1])}   # seed 0, train
    ideal = {s: {"sft": float(test.f_sft(single(0.0, s).theta)), "dpo": float(test.f_dpo(single(1.0, s).theta))}
             for s in SEEDS}
    runs, distance = {}, {}
    for m in METHODS:
        for lam in LAMS:
            runs[(m, lam)] = {s: run_schedule(train, schedule(m, lam, s, f_star), STEPS, theta0, eta,
                                              batch_size=BATCH, seed=s) for s in SEEDS}
            distance[(m, lam)] = {s: float(np.hypot(test.f_sft(r.theta) - ideal[s]["sft"],
                                                    test.f_dpo(r.theta) - ideal[s]["dpo"]))
                                  for s, r in runs[(m, lam)].items()}
    return {"eta": eta, "f_star": f_star, "ideal": ideal, "runs": runs, "distance": distance}


def certificates(train: LogLinearProblem, inst: dict) -> dict:
    """What Theorems 1 and 2 say on the instance, where their hypotheses hold (module docstring)."""
    theta0, eta = start(train.dim), inst["eta"]
    exists = {lam: train.finite_minimiser(lam)[0] for lam in (0.0, *LAMS, 1.0)}
    out = {"minimum_attained": {str(k): v for k, v in exists.items()}, "sequential": {}, "alright": {}}
    for lam in LAMS:
        if exists[0.0] and exists[1.0]:
            for m, order in zip(SEQ, (("sft", "dpo"), ("dpo", "sft"))):
                out["sequential"][f"{m}@{lam}"] = sequential_lower_bound(train, lam, order, eta, theta0).bound
        if exists[lam]:
            b = alright_rate_bound(train, lam, theta0, STEPS, eta)
            realised = [float(train.gap_mix(r.averaged_theta(), lam)) for r in inst["runs"][("alright", lam)].values()]
            out["alright"][str(lam)] = {"bound": b["bound"], "realised": realised}
    return out


# ------------------------------------------------------------------------------------------ verdict and figure
def measured(out: Path) -> dict[tuple, dict[int, float]]:
    """{(method, lam): {seed: held-out ideal distance}} as `xright_tradeoff` recorded it in `out`."""
    path = out / MEASURED
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: build the figure xright_tradeoff into {out} first "
                                "(`ptlab figures --only xright_tradeoff`)")
    rec = json.loads(path.read_text())["extra"]["ideal_distance"]
    return {(m, lam): {int(s): v for s, v in rec[f"{m}@{lam}"].items()} for m in METHODS for lam in LAMS}


def convex_verdict(inst: dict[tuple, float], meas: dict[tuple, float]) -> tuple[str, dict]:
    """Rule xright_convex from the mean ideal distances {(method, lam): value} of the instance and the miniature."""
    agree = []
    for lam in LAMS:
        best = min(METHODS, key=lambda m: inst[(m, lam)])
        if best in sorted(METHODS, key=lambda m: meas[(m, lam)])[:2]:
            agree.append(lam)
    cells = [(m, lam) for m in METHODS for lam in LAMS]
    rho = float(spearmanr([inst[c] for c in cells], [meas[c] for c in cells]).statistic)
    claims = {"A_best_agrees_at_2_lams": len(agree) >= 2, "agrees_at": agree, "B_spearman_at_least_0.5": rho >= 0.5,
              "spearman": rho}
    return grade([claims["A_best_agrees_at_2_lams"], claims["B_spearman_at_least_0.5"]]), claims


def build(out: Path, feats: dict) -> FigureResult:
    """The figure from the four sets' features (`world_features`) and the measured record in `out`."""
    meas = {k: mean(v) for k, v in measured(out).items()}
    train = problem(feats["train_sft"], feats["train_pref"])
    test = problem(feats["test_sft"], feats["test_pref"])
    inst = instance_runs(train, test)
    pred = {k: mean(v) for k, v in inst["distance"].items()}
    cert = certificates(train, inst)
    held, claims = convex_verdict(pred, meas)

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.8))
    for m in METHODS:
        for lam, mk in zip(LAMS, "o^s"):
            axes[0].plot(pred[(m, lam)], meas[(m, lam)], mk, color=COLOR[m], label=LABEL[m] if lam == LAMS[0] else None)
    axes[0].set(xscale="log", yscale="log", xlabel="instance: ideal distance", ylabel="miniature: ideal distance",
                title=f"mean over seeds (o, ^, s: lam 0.25, 0.5, 0.75); Spearman {claims['spearman']:.2f}")
    axes[0].legend(fontsize=7)
    for ax, lam in zip(axes[1:], LAMS):
        for m in METHODS:
            for s, r in inst["runs"][(m, lam)].items():
                th = r.thetas[:: STEPS // 10]
                ax.plot(test.f_sft(th), test.f_dpo(th), color=COLOR[m], lw=1, alpha=0.7,
                        label=LABEL[m] if s == SEEDS[0] else None)
        ideal = np.array([[v["sft"], v["dpo"]] for v in inst["ideal"].values()]).mean(0)
        ax.plot(*ideal, "k*", ms=14)
        ax.set(title=f"instance, lam = {lam}", xlabel="held-out f_SFT (instance)", ylabel="held-out f_DPO (instance)")
    fig.tight_layout()
    save_figure(fig, out / "xright_convex.png", dpi=110)
    plt.close(fig)
    _write_table(out / "xright_convex.md", pred, meas, inst, cert)
    finding = (f"best instance method among the two best measured at lam {claims['agrees_at'] or 'none'}; "
               f"Spearman over the 18 cells {claims['spearman']:.2f}; f_lam attains its minimum at lam "
               f"{[k for k, v in cert['minimum_attained'].items() if v] or 'none'}")
    return FigureResult(
        ["xright_convex.png", "xright_convex.md"],
        "Left: mean held-out ideal distance per (method, lam) on the log-linear instance built from the miniature's "
        "data and base (first-order model in 16 random directions plus the base log-likelihood, two responses per "
        "prompt) against the miniature's (xright_tradeoff). Right: the instance's held-out trajectories; the star "
        f"is its ideal point. Same schedules, 200 steps of 16, seeds 1-3, step 1/(2 L) = {inst['eta']:.3g}.",
        held, finding, {"claims": claims, "instance_distance": {f"{m}@{lam}": v for (m, lam), v in pred.items()},
                        "certificates": cert, "eta": inst["eta"], "f_star": inst["f_star"]})


def _write_table(path: Path, pred: dict, meas: dict, inst: dict, cert: dict) -> None:
    rows = ["| method | " + " | ".join(f"lam={lam}: instance / miniature" for lam in LAMS) + " |", "|---" * 4 + "|"]
    rows += [f"| {LABEL[m]} | " + " | ".join(f"{pred[(m, lam)]:.4g} / {meas[(m, lam)]:.3f}" for lam in LAMS) + " |"
             for m in METHODS]
    attained = ", ".join(f"lam={k}: {'yes' if v else 'no'}" for k, v in cert["minimum_attained"].items())
    seq = ", ".join(f"{k} {v:.3g}" for k, v in cert["sequential"].items()) or (
        "not applicable: a single-objective minimum is not attained on the instance, and the theorem needs both")
    alr = ", ".join(f"lam={k}: bound {v['bound']:.3g}, realised {', '.join(f'{x:.3g}' for x in v['realised'])}"
                    for k, v in cert["alright"].items()) or "not applicable: no f_lam attains its minimum"
    path.write_text(
        "# XRIGHT's convex instance beside the miniature: mean held-out ideal distance at step 200 (seeds 1-3)\n\n"
        + "\n".join(rows) + "\n\n## What the theorems certify on the instance\n\n"
        f"- f_lam attains its minimum: {attained}\n- Theorem 1, sequential's certified gap to f*_lam: {seq}\n"
        f"- Theorem 2, ALRIGHT's bound on f_lam(averaged iterate) - f*_lam at T = {STEPS}: {alr}\n"
        f"- step eta = {inst['eta']:.4g}; MAXRIGHT's f* (instance, seed 0, train): "
        f"SFT {inst['f_star']['sft']:.4g}, DPO {inst['f_star']['dpo']:.4g}\n")


@figure("xright_convex", "XRIGHT (issue 13): the convex theory (theory/forgetting.py) on a log-linear instance "
        "built from the miniature's data, beside the measured gaps", slow=True)
def xright_convex(out: Path) -> FigureResult:
    from toy.world import build as build_world

    if not (WORLD / "base").exists():
        build_world(WORLD)
    return build(out, world_features())
