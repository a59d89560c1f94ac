"""Figures: XRIGHT's LLM-level findings in miniature (docs/xright.md sections 5 and 7), on the tiny world.

The conflict. SFT data: `sft_terse.jsonl`, terse answers ("The answer is \\boxed{32}.") of 1024 train problems
of levels 1-4; preference data: `dpo.jsonl`, 1024 pairs on other train problems, chosen = the worked
solution, rejected = the terse answer (both right). The reference is the base model. SFT pulls towards terse
answers, DPO away from them: the two objectives conflict, as XRIGHT's SFT and preference sets do. Held out:
f_SFT on `test_terse.jsonl`, f_DPO on `test_pref.jsonl` (256 test problems each, never trained on).

The runs (seeds 1, 2, 3; `experiments/sweeps/xright_set.yaml`, run by `ptlab sweep`): 200 optimizer steps,
16 SFT examples and / or 16 preference pairs per step, a constant rate without warm-up (the released code's
schedule), from the base. Methods (`method.joint.schedule`):
- Sequential SFT->DPO: (T_SFT, T_DPO) = ((1 - lam) 200, lam 200), the pairing of the paper's Llama table;
- Sequential DPO->SFT: (T_DPO, T_SFT) = (lam 200, (1 - lam) 200), the pairing of its Pythia figure; both
  reset the optimizer between the stages (the released code's stages are separate processes);
- Mix, ALRIGHT, MAXRIGHT with k = 1 and with the released code's k = 10;
at lam (the DPO weight) in {0.25, 0.5, 0.75}, the Llama grid (the Pythia grid's 0.01 and 0.99 are left out
for time). The refresh-interval ablation: MAXRIGHT at lam = 0.5 with k in {1, 10, 50, 200} (k = 200 refreshes
only at step 0: the miniature of the notes' k = 1000, longer than an epoch). The ideal point: `sft_only` and
`dpo_only`, the two runs `ptlab ideal-point` makes (schedule mix, lam 0 or 1), on each seed.

Tuning, seed 0 only (never a reported seed), the same rule for every method, rate grid {1e-4, 3e-4, 1e-3}:
1. `experiments/sweeps/xright_tune.yaml`: sft_only and dpo_only at each rate; an objective's rate is the one
   with the lowest final value of that objective on its full training set (ties: the smaller rate). Their
   final train-set values at those rates are the f* given to MAXRIGHT (`method.joint.f_star_sft` /
   `f_star_dpo`) on every seed: one f*, computed once, as the paper's scripts do.
2. `experiments/sweeps/xright_tune2.yaml`: each joint method (the six above) at lam = 0.5 (split 0.5) at each
   rate; its rate is the one with the lowest held-out ideal distance at step 200, measured against the seed-0
   held-out ideal point of step 1's chosen runs (ties: the smaller rate). A method keeps its rate at every
   lam; the k-ablation cells take MAXRIGHT k = 10's rate; sft_only and dpo_only keep step 1's rates.

Measured. Held-out f_SFT and f_DPO every 20 steps (the trajectories). At steps 0 and 200, task metrics on
`test_style.jsonl` (the 256 held-out prompts of levels 1-4): SFT side, the greedy completion is exactly the
terse answer (`toy.world.terse_reward`); DPO side, the greedy completion is exactly the right worked solution,
the answer the preference rule prefers (`toy.world.worked_reward`); also their sampled avg@4. Runtime: the sum
of the logged `step_time` over the 200 steps (training only; held-out evaluation excluded); memory: the
process's peak resident memory (`peak_rss_mb`) at step 200. Cells run two at a time on the two cores, one
thread each. (Stated after the runs: the Dr. Post-Training sweeps ran beside this set for most of its 53
minutes, one process at a time, so three processes shared the two cores.)

Definitions (per seed): gap_SFT = f_SFT - f*_SFT and gap_DPO = f_DPO - f*_DPO on the held-out sets at step 200,
with f* the held-out values of that seed's sft_only and dpo_only runs; ideal distance = the Euclidean norm of
(gap_SFT, gap_DPO) (the paper's metric).

Verdict rules, written and committed before the runs that decide them:
- xright_tradeoff (the Pythia figures: trajectories, optimality gaps, ideal distance): (A) ALRIGHT's ideal
  distance is below both sequential orders' at every lam, in every seed; (B) the same for MAXRIGHT (k = 10);
  (C) MAXRIGHT (k = 10) has the lowest mean (over seeds) ideal distance among Sequential SFT->DPO, Sequential
  DPO->SFT, Mix, ALRIGHT and MAXRIGHT (k = 10) at two or more of the three lam. held = yes if A, B and C hold,
  partly if one or two, no if none.
- xright_cost (the runtime and memory bars, as % over sequential): a method's runtime ratio at a lam and seed
  is its runtime over the mean of the two sequential orders' at that lam and seed. (A) Mix's ratio, mean over
  seeds, is at least 1.2 at every lam; (B) ALRIGHT's is within [0.9, 1.1] at every lam; (C) MAXRIGHT
  (k = 10)'s is within [0.9, 1.2] at every lam. held = yes if all three, partly if one or two, no if none.
  Peak memory is reported beside them and not graded: on CPU the tiny model's share of a process's memory is
  small against the fixed footprint of torch.
- xright_tasks (the Llama benchmark table): greedy terse rate (SFT side) and greedy worked rate (DPO side) at
  step 200, mean over seeds, against Sequential SFT->DPO at the same lam (the table's sequential). (A) ALRIGHT
  is above it on the DPO side at two or more lam; (B) MAXRIGHT (k = 10) likewise; (C) ALRIGHT or MAXRIGHT
  (k = 10) is above it on the SFT side at two or more lam. held = yes if all three, partly if one or two, no
  if none.
- xright_k (the refresh-interval ablation), lam = 0.5: (A) runtime falls with k, mean over seeds k=1 > k=10
  > k=50; (B) k = 1's ideal distance is at most k = 200's in every seed. held = yes if both, partly if one,
  no if neither.
- xright_pythia_grid (added 2 Dec 2026, after the main set's results had been read; this rule is written and
  committed before its own runs, `experiments/sweeps/xright_pythia.yaml`): the Pythia grid's lam 0.01 and 0.99,
  which the main set leaves out for time. Same protocol, rates and f* as the main set, seeds 1-3, the ideal
  point from that sweep's own sft_only / dpo_only cells (the same configs). xright_tradeoff's rule at these two
  lam: (A) ALRIGHT's ideal distance is below both sequential orders' at both lam, in every seed; (B) the same for
  MAXRIGHT (k = 10); (C) MAXRIGHT (k = 10) has the lowest mean ideal distance of the five at both lam. held =
  yes if A, B and C hold, partly if one or two, no if none.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.registry import FigureResult, figure, save_figure  # noqa: E402
from experiments.sweep import finished_cells  # noqa: E402
from experiments.verdicts import grade, mean_ci, step_seconds, value_at  # noqa: E402

SET = Path("experiments/sweeps/xright_set.yaml")
PYTHIA = Path("experiments/sweeps/xright_pythia.yaml")
PYTHIA_LAMS = (0.01, 0.99)
TUNE = (Path("experiments/sweeps/xright_tune.yaml"), Path("experiments/sweeps/xright_tune2.yaml"))
WORLD = Path("runs/tiny")
STEPS = 200
LAMS = (0.25, 0.5, 0.75)
KS = (1, 10, 50, 200)
F = {"sft": "eval/heldout_sft/f_sft", "dpo": "eval/heldout_pref/f_dpo"}
TRAIN_F = {"sft": "eval/train_sft/f_sft", "dpo": "eval/train_pref/f_dpo"}
TASK = {"sft": "eval/terse/greedy", "dpo": "eval/worked/greedy"}
SEQ = ("seq_sft_dpo", "seq_dpo_sft")
METHODS = (*SEQ, "mix", "alright", "maxright_k1", "maxright_k10")
LABEL = {"seq_sft_dpo": "Sequential SFT->DPO", "seq_dpo_sft": "Sequential DPO->SFT", "mix": "Mix",
         "alright": "ALRIGHT", "maxright_k1": "MAXRIGHT k=1", "maxright_k10": "MAXRIGHT k=10"}
COLOR = {"seq_sft_dpo": "tab:red", "seq_dpo_sft": "tab:orange", "mix": "tab:green", "alright": "tab:blue",
         "maxright_k1": "tab:purple", "maxright_k10": "tab:pink"}


# ------------------------------------------------------------------------------------------ cells
def lam_of(method: str, point: dict) -> float | None:
    """The lam a cell stands for: the DPO weight, or for sequential the DPO share of the steps."""
    if method == "seq_sft_dpo":
        return round(1.0 - point["method.joint.split"], 6)
    if method == "seq_dpo_sft":
        return point["method.joint.split"]
    return point.get("method.joint.lam")


def at_end(rows: list[dict], key: str) -> float:
    return value_at(rows, key, STEPS)


def trajectory(c) -> list[tuple[float, float]]:
    """The held-out (f_SFT, f_DPO) of a cell at each evaluation."""
    return [(r[F["sft"]], r[F["dpo"]]) for r in c["rows"] if F["sft"] in r and F["dpo"] in r]


def ideal_distance(rows: list[dict], ideal: dict[str, float]) -> float:
    return math.hypot(*(at_end(rows, F[o]) - ideal[o] for o in ("sft", "dpo")))


# ------------------------------------------------------------------------------------------ tuning (seed 0)
def objective_rates(tune1: list[dict]) -> dict[str, dict]:
    """Rule step 1: per objective, the rate with the lowest final train-set value (ties: smaller rate) ->
    {objective: {"lr", "f_star" (train set), "heldout" (the held-out value of the same run)}}."""
    out = {}
    for o in ("sft", "dpo"):
        runs = sorted((c for c in tune1 if c["method"] == f"{o}_only"), key=lambda c: c["point"]["run.lr"])
        best = min(runs, key=lambda c: at_end(c["rows"], TRAIN_F[o]))   # min keeps the first (smaller) on ties
        out[o] = {"lr": best["point"]["run.lr"], "f_star": at_end(best["rows"], TRAIN_F[o]),
                  "heldout": at_end(best["rows"], F[o])}
    return out


def method_rates(tune2: list[dict], ideal: dict[str, float]) -> dict[str, float]:
    """Rule step 2: per joint method, the rate with the lowest held-out ideal distance at the end against the
    seed-0 ideal point (ties: smaller rate)."""
    out = {}
    for m in METHODS:
        runs = sorted((c for c in tune2 if c["method"] == m), key=lambda c: c["point"]["run.lr"])
        if runs:
            out[m] = min(runs, key=lambda c: ideal_distance(c["rows"], ideal))["point"]["run.lr"]
    return out


def tuning() -> dict:
    """The seed-0 choices, from the tuning sweeps' finished cells (prints them with `python -m`)."""
    tune1 = finished_cells(TUNE[0])
    obj = objective_rates(tune1)
    ideal = {o: v["heldout"] for o, v in obj.items()}
    tune2 = finished_cells(TUNE[1]) if TUNE[1].exists() else []
    dist = {m: {c["point"]["run.lr"]: round(ideal_distance(c["rows"], ideal), 4) for c in tune2 if c["method"] == m}
            for m in METHODS}
    return {"objectives": obj, "ideal_seed0": ideal, "ideal_distance": dist, "rates": method_rates(tune2, ideal)}


# ------------------------------------------------------------------------------------------ the set
def collect(path: Path) -> dict:
    """Build the world if needed, run (or resume) a set; return {"cells": [...], "ideal": {seed: {sft, dpo}},
    "by": {(method, lam or k): {seed: cell}}, "seconds": wall seconds of all cells (sum)}."""
    from toy.world import build

    if not (WORLD / "base").exists() or not (WORLD / "data" / "test_style.jsonl").exists():
        build(WORLD)
    cs = finished_cells(path, run=True)
    ideal = {c["seed"]: {} for c in cs}
    by: dict[tuple, dict[int, dict]] = {}
    for c in cs:
        m = c["method"]
        if m in ("sft_only", "dpo_only"):
            o = m.split("_")[0]
            ideal[c["seed"]][o] = at_end(c["rows"], F[o])
            continue
        key = (m, c["point"]["method.joint.k"]) if m == "maxright_k" else (m, lam_of(m, c["point"]))
        by.setdefault(key, {})[c["seed"]] = c
    return {"cells": cs, "ideal": ideal, "by": by, "seconds": sum(c["done"]["seconds"] for c in cs)}


@cache
def runs() -> dict:
    """The main set (`collect(SET)`), with the k-ablation's k = 1 and k = 10 cells taken from its lam = 0.5 cells."""
    data = collect(SET)
    for k in KS:
        data["by"].setdefault(("maxright_k", k), data["by"].get((f"maxright_k{k}", 0.5), {}))
    return data


def per_seed(data: dict, key: tuple, fn) -> dict[int, float]:
    """{seed: fn(cell, ideal point of the seed)} for one (method, lam) or ("maxright_k", k)."""
    return {s: fn(c, data["ideal"][s]) for s, c in sorted(data["by"][key].items())}


def dist(c, ideal) -> float:
    return ideal_distance(c["rows"], ideal)


def gap(o: str):
    return lambda c, ideal: at_end(c["rows"], F[o]) - ideal[o]


def runtime(c, ideal=None) -> float:
    return step_seconds(c["rows"])


def peak(c, ideal=None) -> float:
    return at_end(c["rows"], "peak_rss_mb")


def task(o: str):
    return lambda c, ideal: at_end(c["rows"], TASK[o])


def mean(d: dict[int, float]) -> float:
    return float(np.mean(list(d.values())))


def _runtime_text(data: dict) -> str:
    return (f"All {len(data['cells'])} cells of the set: {data['seconds'] / 60:.0f} min of single-thread "
            "processes (sum).")


# ------------------------------------------------------------------------------------------ trade-off
def tradeoff_verdict(d: dict[tuple, dict[int, float]], lams: tuple = LAMS, need: int = 2) -> tuple[str, dict]:
    """Rule xright_tradeoff from {(method, lam): {seed: ideal distance}} (xright_pythia_grid: its two lam, need 2)."""
    def below_seq(m):
        return all(all(d[(m, lam)][s] < d[(q, lam)][s] for q in SEQ for s in d[(m, lam)]) for lam in lams)

    five = (*SEQ, "mix", "alright", "maxright_k10")
    lowest = [lam for lam in lams if min(five, key=lambda m: mean(d[(m, lam)])) == "maxright_k10"]
    claims = {"A_alright_below_sequential": below_seq("alright"), "B_maxright_below_sequential":
              below_seq("maxright_k10"), f"C_maxright_lowest_at_{need}_lams": len(lowest) >= need}
    return grade(list(claims.values())), {**claims, "maxright_lowest_at": lowest}


@figure("xright_tradeoff", "XRIGHT Pythia figures: sequential SFT/DPO ends far from the ideal point; ALRIGHT and "
        "MAXRIGHT end closer (MAXRIGHT closest)", slow=True)
def xright_tradeoff(out: Path) -> FigureResult:
    data = runs()
    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    for ax, lam in zip(axes[0], LAMS):
        for m in METHODS:
            for s, c in sorted(data["by"][(m, lam)].items()):
                pts = trajectory(c)
                ax.plot(*zip(*pts), color=COLOR[m], lw=1, alpha=0.7, label=LABEL[m] if s == 1 else None)
                ax.plot(*pts[-1], "o", color=COLOR[m], ms=4)
        ideal = np.array([[v["sft"], v["dpo"]] for v in data["ideal"].values()])
        ax.plot(*ideal.mean(0), "k*", ms=14, label="ideal point (mean over seeds)")
        ax.set(title=f"lam = {lam}", xlabel="held-out f_SFT (terse NLL)", ylabel="held-out f_DPO")
        if lam == LAMS[0]:
            ax.legend(fontsize=7)
    d = {(m, lam): per_seed(data, (m, lam), dist) for m in METHODS for lam in LAMS}
    gaps = {o: {(m, lam): per_seed(data, (m, lam), gap(o)) for m in METHODS for lam in LAMS} for o in ("sft", "dpo")}
    x = np.arange(len(LAMS))
    for ax, (title, vals) in zip(axes[1], (("SFT optimality gap", gaps["sft"]), ("DPO optimality gap", gaps["dpo"]),
                                           ("ideal distance", d))):
        for i, m in enumerate(METHODS):
            ys = [mean(vals[(m, lam)]) for lam in LAMS]
            err = [np.std(list(vals[(m, lam)].values())) for lam in LAMS]
            ax.bar(x + (i - 2.5) * 0.13, ys, 0.13, yerr=err, color=COLOR[m], label=LABEL[m])
        ax.set(title=title + " (held out, mean and sd over seeds)", xticks=x, xticklabels=[f"lam={v}" for v in LAMS])
    fig.tight_layout()
    save_figure(fig, out / "xright_tradeoff.png", dpi=110)
    plt.close(fig)
    held, claims = tradeoff_verdict(d)
    rows = ["| method | " + " | ".join(f"lam={lam}: gap SFT / gap DPO / ideal distance" for lam in LAMS) + " |",
            "|---" * 4 + "|"]
    for m in METHODS:
        rows.append(f"| {LABEL[m]} | " + " | ".join(
            f"{mean(gaps['sft'][(m, lam)]):.3f} / {mean(gaps['dpo'][(m, lam)]):.3f} / {mean_ci(d[(m, lam)].values())}"
            for lam in LAMS) + " |")
    ideal_rows = [f"| {s} | {v['sft']:.4f} | {v['dpo']:.4f} |" for s, v in sorted(data["ideal"].items())]
    (out / "xright_tradeoff.md").write_text(
        "# XRIGHT in miniature: held-out optimality gaps and ideal distance at step 200 (mean over seeds 1-3; "
        "ideal distance with its 95% t-interval)\n\n" + "\n".join(rows) + "\n\n## Ideal point per seed "
        "(held-out f of the sft_only / dpo_only runs)\n\n| seed | f*_SFT | f*_DPO |\n|---|---|---|\n"
        + "\n".join(ideal_rows) + "\n")
    finding = ("ALRIGHT below both sequential orders at every lam in every seed: "
               f"{claims['A_alright_below_sequential']}"
               f"; MAXRIGHT (k=10): {claims['B_maxright_below_sequential']}; MAXRIGHT (k=10) lowest mean ideal "
               f"distance at lam {claims['maxright_lowest_at'] or 'none'}")
    return FigureResult(
        ["xright_tradeoff.png", "xright_tradeoff.md"],
        "Top: held-out (f_SFT, f_DPO) every 20 steps for each method and seed, one panel per lam; the star is the "
        "ideal point (single-objective runs, mean over seeds). Bottom: held-out gaps to each seed's own ideal point "
        "and the ideal distance at step 200. 200 steps of 16 examples / pairs, constant rate tuned per method on "
        f"seed 0. {_runtime_text(data)}",
        held, finding, {"claims": claims, "ideal_distance": {f"{m}@{lam}": v for (m, lam), v in d.items()}})


# ------------------------------------------------------------------------------------------ cost
def cost_verdict(ratio: dict[tuple, float]) -> tuple[str, dict]:
    """Rule xright_cost from {(method, lam): mean runtime ratio to sequential}."""
    claims = {"A_mix_at_least_1.2": all(ratio[("mix", lam)] >= 1.2 for lam in LAMS),
              "B_alright_within_0.9_1.1": all(0.9 <= ratio[("alright", lam)] <= 1.1 for lam in LAMS),
              "C_maxright_within_0.9_1.2": all(0.9 <= ratio[("maxright_k10", lam)] <= 1.2 for lam in LAMS)}
    return grade(list(claims.values())), claims


@figure("xright_cost", "XRIGHT runtime / memory bars: Mix costs much more than sequential; ALRIGHT and MAXRIGHT "
        "about the same", slow=True)
def xright_cost(out: Path) -> FigureResult:
    data = runs()
    ratio, mem = {}, {}
    for lam in LAMS:
        seq_t = {s: np.mean([runtime(data["by"][(q, lam)][s]) for q in SEQ]) for s in data["by"][(SEQ[0], lam)]}
        seq_m = {s: np.mean([peak(data["by"][(q, lam)][s]) for q in SEQ]) for s in data["by"][(SEQ[0], lam)]}
        for m in METHODS:
            ratio[(m, lam)] = mean({s: runtime(c) / seq_t[s] for s, c in data["by"][(m, lam)].items()})
            mem[(m, lam)] = mean({s: peak(c) / seq_m[s] for s, c in data["by"][(m, lam)].items()})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(LAMS))
    for ax, vals, title in ((axes[0], ratio, "runtime increase over sequential (%)"),
                            (axes[1], mem, "peak memory increase over sequential (%)")):
        for i, m in enumerate(METHODS[2:]):
            ax.bar(x + (i - 1.5) * 0.2, [100 * (vals[(m, lam)] - 1) for lam in LAMS], 0.2, color=COLOR[m],
                   label=LABEL[m])
        ax.axhline(0, color="k", lw=0.7)
        ax.set(title=title + ", mean over seeds", xticks=x, xticklabels=[f"lam={v}" for v in LAMS])
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out / "xright_cost.png", dpi=110)
    plt.close(fig)
    held, claims = cost_verdict(ratio)
    finding = "; ".join(f"{LABEL[m]} runtime x" + "/".join(f"{ratio[(m, lam)]:.2f}" for lam in LAMS) +
                        ", memory x" + "/".join(f"{mem[(m, lam)]:.3f}" for lam in LAMS) for m in METHODS[2:])
    return FigureResult(
        ["xright_cost.png"],
        "Runtime = the summed training step times of a run (held-out evaluation excluded); memory = the process's "
        "peak resident memory; both over the mean of the two sequential orders at the same lam and seed, then "
        "averaged over seeds 1-3 (lam = 0.25 / 0.5 / 0.75 in the finding). Two cells ran at once, one thread "
        "each, and for most of the set a cell of another sweep ran beside them: three processes on two shared "
        f"cores, so the ratios carry timing noise. {_runtime_text(data)}",
        held, finding + ".", {"claims": claims, "runtime_ratio": {f"{m}@{lam}": v for (m, lam), v in ratio.items()},
                              "memory_ratio": {f"{m}@{lam}": v for (m, lam), v in mem.items()}})


# ------------------------------------------------------------------------------------------ tasks
def tasks_verdict(t: dict[str, dict[tuple, float]]) -> tuple[str, dict]:
    """Rule xright_tasks from {side: {(method, lam): mean greedy rate}}."""
    def above(m, side):
        return [lam for lam in LAMS if t[side][(m, lam)] > t[side][("seq_sft_dpo", lam)]]

    claims = {"A_alright_dpo_side": len(above("alright", "dpo")) >= 2,
              "B_maxright_dpo_side": len(above("maxright_k10", "dpo")) >= 2,
              "C_either_sft_side": max(len(above("alright", "sft")), len(above("maxright_k10", "sft"))) >= 2}
    return grade(list(claims.values())), claims


@figure("xright_tasks", "XRIGHT Llama table: ALRIGHT and MAXRIGHT above sequential on both benchmarks", slow=True)
def xright_tasks(out: Path) -> FigureResult:
    data = runs()
    t = {o: {(m, lam): mean(per_seed(data, (m, lam), task(o))) for m in METHODS for lam in LAMS}
         for o in ("sft", "dpo")}
    base = {o: mean({c["seed"]: float(next(r[TASK[o]] for r in c["rows"] if r.get("step") == 0 and TASK[o] in r))
                     for c in data["by"][("mix", 0.5)].values()}) for o in ("sft", "dpo")}
    rows = ["| method | " + " | ".join(f"terse (SFT side) lam={lam}" for lam in LAMS) + " | "
            + " | ".join(f"worked (DPO side) lam={lam}" for lam in LAMS) + " |", "|---" * 7 + "|",
            "| base | " + " | ".join(f"{base['sft']:.3f}" for _ in LAMS) + " | "
            + " | ".join(f"{base['dpo']:.3f}" for _ in LAMS) + " |"]
    for m in METHODS:
        rows.append(f"| {LABEL[m]} | " + " | ".join(f"{t['sft'][(m, lam)]:.3f}" for lam in LAMS) + " | "
                    + " | ".join(f"{t['dpo'][(m, lam)]:.3f}" for lam in LAMS) + " |")
    (out / "xright_tasks.md").write_text(
        "# XRIGHT in miniature: task metrics at step 200 (greedy, 256 held-out prompts of levels 1-4, mean over "
        "seeds 1-3)\n\n" + "\n".join(rows) + "\n")
    held, claims = tasks_verdict(t)
    return FigureResult(
        ["xright_tasks.md"],
        "The miniature of the paper's benchmark table: the share of held-out prompts whose greedy completion is "
        "exactly the terse answer (what SFT teaches) and exactly the right worked solution (what the preference "
        "data prefers); a completion can be at most one of them. Compared with Sequential SFT->DPO, the table's "
        "sequential run.",
        held, "; ".join(f"{k}: {v}" for k, v in claims.items()), {"claims": claims})


# ------------------------------------------------------------------------------------------ k ablation
def k_verdict(rt: dict[int, float], d: dict[int, dict[int, float]]) -> tuple[str, dict]:
    """Rule xright_k from {k: mean runtime} and {k: {seed: ideal distance}}."""
    claims = {"A_runtime_falls_with_k": rt[1] > rt[10] > rt[50],
              "B_k1_closer_than_k200": all(d[1][s] <= d[200][s] for s in d[1])}
    return grade(list(claims.values())), claims


@figure("xright_k", "XRIGHT MAXRIGHT refresh-interval ablation: small k costs time, large k drifts from the "
        "ideal point", slow=True)
def xright_k(out: Path) -> FigureResult:
    data = runs()
    rt = {k: mean(per_seed(data, ("maxright_k", k), runtime)) for k in KS}
    d = {k: per_seed(data, ("maxright_k", k), dist) for k in KS}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, color in zip(KS, ("tab:purple", "tab:pink", "tab:brown", "tab:gray")):
        for s, c in sorted(data["by"][("maxright_k", k)].items()):
            pts = trajectory(c)
            axes[0].plot(*zip(*pts), color=color, lw=1, alpha=0.8, label=f"k={k}" if s == 1 else None)
    axes[0].set(title="MAXRIGHT at lam = 0.5: held-out trajectories", xlabel="f_SFT", ylabel="f_DPO")
    axes[0].legend(fontsize=8)
    axes[1].bar([str(k) for k in KS], [mean(d[k]) for k in KS], yerr=[np.std(list(d[k].values())) for k in KS])
    ax2 = axes[1].twinx()
    ax2.plot([str(k) for k in KS], [rt[k] for k in KS], "ko-")
    axes[1].set(title="ideal distance (bars) and runtime in s (line)", xlabel="k")
    fig.tight_layout()
    save_figure(fig, out / "xright_k.png", dpi=110)
    plt.close(fig)
    held, claims = k_verdict(rt, d)
    return FigureResult(
        ["xright_k.png"], "MAXRIGHT at lam = 0.5 with refresh interval k (k = 200: step 0 only), seeds 1-3; runtime "
        "= summed training step times.", held,
        "runtime " + ", ".join(f"k={k} {rt[k]:.1f} s" for k in KS) + "; ideal distance "
        + ", ".join(f"k={k} {mean(d[k]):.3f}" for k in KS), {"claims": claims})



# ------------------------------------------------------------------------------------------ the Pythia grid
@figure("xright_pythia_grid", "XRIGHT Pythia figures at the grid's ends (lam 0.01, 0.99): ALRIGHT and MAXRIGHT end "
        "closer to the ideal point than sequential training (MAXRIGHT closest)", slow=True)
def xright_pythia_grid(out: Path) -> FigureResult:
    data = collect(PYTHIA)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for ax, lam in zip(axes, PYTHIA_LAMS):
        for m in METHODS:
            for s, c in sorted(data["by"][(m, lam)].items()):
                ax.plot(*zip(*trajectory(c)), color=COLOR[m], lw=1, alpha=0.7, label=LABEL[m] if s == 1 else None)
        ideal = np.array([[v["sft"], v["dpo"]] for v in data["ideal"].values()])
        ax.plot(*ideal.mean(0), "k*", ms=14, label="ideal point (mean over seeds)")
        ax.set(title=f"lam = {lam}", xlabel="held-out f_SFT (terse NLL)", ylabel="held-out f_DPO")
    axes[0].legend(fontsize=7)
    d = {(m, lam): per_seed(data, (m, lam), dist) for m in METHODS for lam in PYTHIA_LAMS}
    x = np.arange(len(PYTHIA_LAMS))
    for i, m in enumerate(METHODS):
        axes[2].bar(x + (i - 2.5) * 0.13, [mean(d[(m, lam)]) for lam in PYTHIA_LAMS], 0.13, color=COLOR[m],
                    yerr=[np.std(list(d[(m, lam)].values())) for lam in PYTHIA_LAMS], label=LABEL[m])
    axes[2].set(title="ideal distance at step 200 (held out, mean and sd)", xticks=x,
                xticklabels=[f"lam={v}" for v in PYTHIA_LAMS])
    fig.tight_layout()
    save_figure(fig, out / "xright_pythia_grid.png", dpi=110)
    plt.close(fig)
    held, claims = tradeoff_verdict(d, PYTHIA_LAMS, need=2)
    finding = "mean ideal distance " + "; ".join(
        f"lam={lam}: " + ", ".join(f"{LABEL[m]} {mean(d[(m, lam)]):.3f}" for m in METHODS) for lam in PYTHIA_LAMS)
    return FigureResult(
        ["xright_pythia_grid.png"],
        "The Pythia grid's ends, lam 0.01 and 0.99 (experiments/sweeps/xright_pythia.yaml, added after the main set; "
        "rule committed before its runs): held-out trajectories every 20 steps and the ideal distance at step 200; "
        f"same protocol, rates and f* as the main set, seeds 1-3. {_runtime_text(data)}",
        held, finding, {"claims": claims, "ideal_distance": {f"{m}@{lam}": v for (m, lam), v in d.items()}})

if __name__ == "__main__":
    print(json.dumps(tuning(), indent=1))
