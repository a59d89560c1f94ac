"""Figures: the HPT paper's LLM-level findings in miniature (docs/hpt.md sections 5 and 7), on the tiny world.

The runs. `experiments/sweeps/hpt_set.yaml`, seeds 1, 2, 3, run by `ptlab sweep` (the figures start it; done
cells are kept, so a re-run only rebuilds what changed): SFT, GRPO, SFT->GRPO (one two-stage command), LUFFY,
SRFT and both HPT variants (`hpt_code`, what the released code computes, and `hpt_paper`, the paper's
Algorithm 1; docs/hpt.md 6.6), plus the gate ablation of `hpt_code` (gamma 1/8 and 2/8; gamma 0 is the
`hpt_code` cell). `hpt_code` is the main variant: the figures that show one HPT use it; the table and
the curves show both.

The budget, the same for every method: 60 optimizer steps of 16 prompts (SFT: 16 demonstrations), 8 rollouts
per prompt, from the same pretrained base; SFT->GRPO gets 60 SFT steps then 60 GRPO steps, as the paper's
two-stage baseline gets both budgets. Learning rates: the RL configs' rates were chosen on seed 0 by
experiments/tiny_tuning.py (best final held-out middle avg@8; ties to the smaller rate); SFT's rate for this
budget by the same rule on seed 0 (experiments/sweeps/hpt_tune.yaml: middle avg@8 0.080 at 5e-4, 0.075 at
1e-3, 0.047 at 2e-3, so 5e-4; all three below the base's 0.248: 60 SFT steps teach the worked format, f_sft
1.99 -> 0.40, before they teach the sums). Seed 0 is never a reported seed. A reference row, the shipped SFT
config at its own budget (3000 steps, rate 1e-3), was planned outside the verdicts and dropped before any of
its cells ran, to fit the time (cells took 11 minutes each with four processes on the two cores); issue 11's
judgement of the same config on the same seeds is in the README (held-out middle avg@8 0.81).
Held-out evaluation: the 384-problem test set (64 per level) every 20 steps, avg@8 and greedy; the 96-problem
probe set (16 per level) every 10 steps, per-problem counts for the heatmaps. Pass@k: `ptlab eval` with
256 samples per problem (temperature 1, at most 40 new tokens, the world's cap) on the probe's 32 hard
problems (levels 5 and 6), for each final model and the base. (The first version of this call left
`ptlab eval`'s default cap of 256 new tokens, beyond the tiny model's 128 positions; it was fixed after two
of these evaluations had run, before any was compared, and they were redone.)

What was seen before these rules were written: the shipped tiny configs on seeds 1-3 (issue 11's
judgement, README table) with RL at 60 steps and SFT at 3000 steps: held-out middle avg@8 SFT 0.81, SRFT
0.41, GRPO 0.40, LUFFY 0.32, HPT paper 0.31, HPT code 0.24 (round-1 rate). The reported seeds here are the
same seeds, but every method is re-run on this budget with its curves and records.

Verdict rules, written and committed before the runs that decide them. MACRO = the mean of the final
held-out avg@8 of the middle (levels 3, 4) and hard (levels 5, 6) roles on the test set.
- hpt_main_table (Tables 2/3): an HPT variant beats a baseline when its MACRO is higher in every paired
  seed. held = yes if one variant beats all five baselines (SFT, GRPO, SFT->GRPO, LUFFY, SRFT), partly if
  the better variant beats at least one, no if neither beats any.
- hpt_exclusive (Table 4): a test problem is solved when its greedy answer at the final step is right.
  HPT (code) is ahead of a baseline in a seed when it solves more problems the baseline misses than the
  reverse. held = yes if ahead of both GRPO and LUFFY in every seed, partly if of one, no if of neither.
- hpt_passk (Fig. 2): on the probe's hard problems, mean over seeds of the unbiased pass@256. Claims: (a)
  every method that trains on demonstrations (SFT, SFT->GRPO, LUFFY, SRFT, both HPT) ends strictly above
  GRPO; (b) HPT (code) is the highest (ties count as highest). yes if both, partly if one, no if neither.
- hpt_heatmaps (Figs. 3/4): D(t) = HPT (code) minus SFT->GRPO per-problem probe accuracy at RL step t
  (SFT->GRPO's GRPO stage), mean over the probe's middle and hard problems and the seeds. Claims: (a)
  D(0) < 0 (SFT->GRPO leads at the start); (b) D(60) > 0 (HPT leads at the end); (c) at step 60 the lead
  on the hard problems exceeds the lead on the middle ones. yes if all three, partly if one or two.
- hpt_validation (Fig. 5): MACRO mean over seeds at steps 20, 40 and 60. yes if HPT (code) is above both
  GRPO and LUFFY at all three, partly if above both at step 60 only, no otherwise.
- hpt_dynamics (Figs. 6/7), HPT (code), every seed: (a) the offline-data ratio falls, the mean over steps
  1-10 above the mean over steps 51-60, which stays above 0; (b) the mean token entropy over the 60 steps
  is above GRPO's (paired seed); (c) the mean response length over steps 51-60 is above that over steps
  1-10. yes if all three, partly if one or two, no if none.
- hpt_gate (Fig. 8 / Table 6): (a) the mean offline-data ratio over the run rises strictly with gamma
  (0 < 1/8 < 2/8) in every seed; (b) gamma = 0 has the highest MACRO (mean over seeds). yes if both,
  partly if one, no if neither.

- hpt_table5 (Table 5): what the gated demonstrations train, HPT (code) in three forms: SFT/ON (HPT,
  `method.hpt.offline=sft`), OFF/ON (`off_policy`: LUFFY's shaped off-policy term, advantage = the
  demonstration's reward) and Mix/ON (`sft_off_policy`, sft_coef 0.1, off_coef 1, the paper's weights), all
  at HPT (code)'s rate. held = yes if SFT/ON beats both others (MACRO, every paired seed), partly if one, no
  if neither.
- hpt_theory_practice (ours; the issue's question "does the exact analysis predict the ranking?"): the
  finite problem matched to the tiny world has one context per level with the base model's measured step-0
  test avg@8 as its initial accuracy (clipped to [0.01, 0.99]; `toy.bandit.make_problem`, 6 actions, one
  right, demonstrations always right, as the world's are), contexts equally likely as in the training set.
  For SFT, GRPO, LUFFY, SRFT and both HPT variants (group size 8, gate gamma = 0), theory.moments gives the
  exact mean and covariance of each estimator at the base policy; the predicted quality is the scale-free
  MSE of a 16-prompt batch against the gradient of the expected reward on the middle and hard contexts
  (the measured MACRO's levels; lower is better; `batch_sfmse`). Rule: Spearman rank correlation between
  the predicted order (ascending scale-free MSE) and the measured order (descending MACRO, mean over seeds)
  over the six methods; yes if rho >= 0.8, partly if 0.2 <= rho < 0.8, no if rho < 0.2. SFT->GRPO has no
  single estimator and is left out.

When the last two rules were written (2026-12-02, after the first rules' commit): the HPT set's runs had been
running for about 15 minutes and none of their results had been read; the theory side had been computed
once, with base accuracies taken from an earlier step-0 evaluation (GRPO lowest predicted error, then SRFT,
LUFFY, SFT, HPT paper, HPT code). Table 5's cells run after these rules are committed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments.registry import FigureResult, figure, save_figure  # noqa: E402
from experiments.verdicts import band, beats, final, grade, mean_ci  # noqa: E402

SWEEP = Path("experiments/sweeps/hpt_set.yaml")
WORLD = Path("runs/tiny")
MAIN = "hpt_code"
HPT = ("hpt_code", "hpt_paper")
BASELINES = ("sft", "grpo", "sft_grpo", "luffy", "srft")
METHODS = (*BASELINES, *HPT)
DEMO_METHODS = ("sft", "sft_grpo", "luffy", "srft", *HPT)
TABLE5 = {"SFT/ON (HPT)": "hpt_code", "OFF/ON": "hpt_off", "Mix/ON": "hpt_mix"}
THEORY = {"sft": ("sft", "demonstration", None), "grpo": ("grpo", "on_policy", None),
          "luffy": ("luffy", "mixed", None), "srft": ("srft", "mixed", None),
          "hpt_code": ("hpt_code", "hpt_gate", ("code", 0)), "hpt_paper": ("hpt_paper", "hpt_gate", ("paper", 0.0))}
GATE = {0.0: "hpt_code", 0.125: "hpt_gate__gamma=0.125", 0.25: "hpt_gate__gamma=0.25"}
LABEL = {"sft": "SFT", "grpo": "GRPO", "sft_grpo": "SFT->GRPO", "luffy": "LUFFY", "srft": "SRFT",
         "hpt_code": "HPT (code)", "hpt_paper": "HPT (paper)", "base": "base"}
COLOR = {"sft": "tab:gray", "grpo": "tab:blue", "sft_grpo": "tab:purple", "luffy": "tab:green",
         "srft": "tab:olive", "hpt_code": "tab:red", "hpt_paper": "tab:orange", "base": "black"}
LEVELS = {"middle": (3, 4), "hard": (5, 6)}
RL_STEPS = 60
PASSK_N = 256
MAX_NEW_TOKENS = 40   # the world's generation cap, as in training and in-training evaluation
KEY = "eval/test/{}/avg@8"


# ------------------------------------------------------------------------------------------ the runs
@cache
def runs() -> dict:
    """Build the world if needed, run (or resume) the sweep and the pass@k evaluations; return
    {"metrics": {variant: {seed: rows}}, "dirs": {variant: {seed: run folder}}, "passk": {...}, "seconds"}.
    SFT->GRPO's run folder is its GRPO stage's, so that its steps count RL steps from 0 as the others do."""
    from experiments.sweep import cells, load_metrics, load_sweep, run_sweep
    from toy.world import build

    if not (WORLD / "base").exists():
        build(WORLD)
    sweep = load_sweep(SWEEP)
    failed = run_sweep(sweep)
    if failed:
        raise RuntimeError(f"hpt figures: {len(failed)} cell(s) of {SWEEP} failed, e.g. {failed[0].label}")
    dirs: dict[str, dict[int, Path]] = {}
    for c in cells(sweep):
        final = c.dir / "grpo" if (c.dir / "grpo").is_dir() else c.dir     # SFT->GRPO: its RL stage
        dirs.setdefault(c.variant.name, {})[c.seed] = final
    seconds = sum(json.loads((c.dir / "DONE.json").read_text())["seconds"] for c in cells(sweep))
    passk, passk_seconds = pass_at_k(sweep.out, dirs)
    metrics = {v: {s: load_metrics(d / "metrics.jsonl") for s, d in by.items()} for v, by in dirs.items()}
    return {"metrics": metrics, "dirs": dirs, "passk": passk, "seconds": seconds + passk_seconds}


def pass_at_k(out: Path, dirs: dict[str, dict[int, Path]]) -> tuple[dict, float]:
    """{method: {seed: ptlab eval results}} (seed 0 for the base), each cached as passk.json beside the
    model it evaluates; and the seconds spent by the evaluations run now or recorded earlier."""
    probe = out / "probe_hard.jsonl"
    rows = [json.loads(x) for x in (WORLD / "data" / "probe.jsonl").read_text().splitlines() if x.strip()]
    probe.write_text("".join(json.dumps(r) + "\n" for r in rows if r["role"] == "hard"))
    jobs = {("base", 0): (WORLD / "base", out / "base_passk.json")}
    jobs.update({(m, s): (d / "final", d / "passk.json") for m in METHODS for s, d in dirs[m].items()})
    results, seconds = {}, 0.0
    for (m, s), (model, dest) in jobs.items():
        if not dest.exists():
            tmp = dest.with_suffix(".tmp")
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "experiments.cli", "eval", str(model), str(probe), "--n",
                            str(PASSK_N), "--seed", str(s), "--batch-size", "8", "--max-new-tokens",
                            str(MAX_NEW_TOKENS), "--out", str(tmp)], check=True)
            res = json.loads(tmp.read_text())
            res["seconds"] = time.perf_counter() - t0
            tmp.write_text(json.dumps(res))
            tmp.replace(dest)
        res = json.loads(dest.read_text())
        seconds += res["seconds"]
        results.setdefault(m, {})[s] = res
    return results, seconds


# ------------------------------------------------------------------------------------------ readers
def macro(rows: list[dict], step: int | None = None) -> float:
    """Mean of the middle and hard test avg@8, at the last evaluation or at `step`."""
    pick = [r for r in rows if step is None or r.get("step") == step]
    return float(np.mean([final(pick, KEY.format(role)) for role in LEVELS]))


def records(run_dir: Path, set_name: str) -> list[dict]:
    path = run_dir / "eval_records.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["set"] == set_name]


def train_mean(rows: list[dict], key: str, lo: int, hi: int) -> float:
    """Mean of a training metric over steps lo..hi (inclusive)."""
    vals = [r[key] for r in rows if key in r and lo <= r.get("step", -1) <= hi and "loss" in r]
    if not vals:
        raise ValueError(f"metric {key!r} has no training line in steps {lo}..{hi}")
    return float(np.mean(vals))


def per_seed(metrics: dict, method: str, fn) -> dict[int, float]:
    """{seed: fn(rows)} of one method."""
    return {s: fn(rows) for s, rows in metrics[method].items()}


def _eval_curve(rows: list[dict], fn) -> dict[int, float]:
    return {int(r["step"]): fn(r) for r in rows if KEY.format("middle") in r}


def _macro_of_row(r: dict) -> float:
    return (r[KEY.format("middle")] + r[KEY.format("hard")]) / 2


def _train_curve(rows: list[dict], key: str) -> dict[int, float]:
    return {int(r["step"]): float(r[key]) for r in rows if key in r and "loss" in r}


def _runtime(data: dict) -> str:
    return f"Runs and pass@k evaluations: {data['seconds'] / 60:.0f} min of single-thread processes (sum)."


# ------------------------------------------------------------------------------------------ Tables 2/3
def main_verdict(scores: dict[str, dict[int, float]]) -> tuple[str, dict[str, list[str]]]:
    """(held, {HPT variant: baselines it beats}) from {method: {seed: MACRO}} (module docstring)."""
    won = {v: [b for b in BASELINES if beats(scores[v], scores[b])] for v in HPT}
    best = max(len(w) for w in won.values())
    held = "yes" if best == len(BASELINES) else "partly" if best else "no"
    return held, won


@figure("hpt_main_table", "HPT Tables 2/3: HPT above SFT, GRPO, SFT->GRPO, LUFFY and SRFT", slow=True)
def hpt_main_table(out: Path) -> FigureResult:
    data = runs()
    m = data["metrics"]
    scores = {meth: per_seed(m, meth, macro) for meth in METHODS}
    cols = [f"L{i}" for i in range(1, 7)] + ["middle", "hard"]
    lines = ["| method | " + " | ".join(cols) + " | all | MACRO (mean [95% CI]) | MACRO minus HPT (code), per seed |",
             "|---" * (len(cols) + 4) + "|"]
    for meth in METHODS:
        cells = [f"{np.mean(list(per_seed(m, meth, lambda r, c=c: final(r, KEY.format(c))).values())):.3f}"
                 for c in cols]
        allv = np.mean(list(per_seed(m, meth, lambda r: final(r, "eval/test/avg@8")).values()))
        diffs = [scores[meth][s] - scores[MAIN][s] for s in sorted(scores[meth])]
        lines.append(f"| {LABEL[meth]} | " + " | ".join(cells) + f" | {allv:.3f} | {mean_ci(scores[meth].values())}"
                     f" | {', '.join(f'{d:+.3f}' for d in diffs)} |")
    held, won = main_verdict(scores)
    (out / "hpt_main_table.md").write_text(
        "# HPT set: final held-out avg@8 per level (mean over seeds 1-3)\n\n" + "\n".join(lines) + "\n")
    finding = "; ".join(f"{LABEL[v]} beats {', '.join(LABEL[b] for b in w) or 'no baseline'} in every seed"
                        for v, w in won.items())
    return FigureResult(
        ["hpt_main_table.md"],
        "Final held-out avg@8 (8 samples, temperature 1) on the 384-problem test set, per level and role, mean "
        "over seeds 1-3; MACRO = mean of middle and hard with its 95% t-interval, and its paired per-seed "
        "difference to HPT (code). Every method: 60 steps of 16 prompts from the same base (SFT->GRPO: 60 SFT + 60 "
        f"GRPO). {_runtime(data)}",
        held, finding,
        {"macro": {k: dict(v) for k, v in scores.items()}, "won": won})


# ------------------------------------------------------------------------------------------ Table 4
def final_greedy(run_dir: Path) -> dict[str, tuple[int, int]]:
    """{problem id: (level, greedy right 0/1)} of the test set at the run's last evaluation."""
    recs = records(run_dir, "test")
    last = max(r["step"] for r in recs)
    return {r["id"]: (r["level"], r["greedy"]) for r in recs if r["step"] == last}


def exclusive(a: dict[str, tuple[int, int]], b: dict[str, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """{level: (solved by a only, solved by b only)}, level 0 = all problems."""
    out: dict[int, list[int]] = {}
    for pid, (level, ga) in a.items():
        gb = b[pid][1]
        for key in (level, 0):
            c = out.setdefault(key, [0, 0])
            c[0] += int(ga and not gb)
            c[1] += int(gb and not ga)
    return {k: tuple(v) for k, v in sorted(out.items())}


@figure("hpt_exclusive", "HPT Table 4: HPT solves more problems that GRPO / LUFFY miss than the reverse", slow=True)
def hpt_exclusive(out: Path) -> FigureResult:
    data = runs()
    d = data["dirs"]
    lines = ["| vs | seed | " + " | ".join(f"L{i}" for i in range(1, 7)) + " | all |", "|---" * 9 + "|"]
    ahead = {}
    for base in ("grpo", "luffy"):
        per = {s: exclusive(final_greedy(d[MAIN][s]), final_greedy(d[base][s])) for s in sorted(d[MAIN])}
        ahead[base] = all(c[0][0] > c[0][1] for c in per.values())
        for s, c in per.items():
            lines.append(f"| {LABEL[base]} | {s} | " + " | ".join(f"+{c[k][0]}/-{c[k][1]}" for k in [*range(1, 7), 0])
                         + " |")
    (out / "hpt_exclusive.md").write_text(
        "# HPT set: problems only one method solves (greedy, final step, test set; +HPT only / -baseline only)\n\n"
        + "\n".join(lines) + "\n")
    held = grade(list(ahead.values()))
    return FigureResult(
        ["hpt_exclusive.md"],
        "Per level, test problems (64 per level) whose final greedy answer is right for HPT (code) and wrong for "
        "the baseline (+), and the reverse (-), per paired seed. The paper counts one sample per MATH-500 problem.",
        held, "; ".join(f"ahead of {LABEL[b]} in every seed: {'yes' if a else 'no'}" for b, a in ahead.items()),
        {"ahead": ahead})


# ------------------------------------------------------------------------------------------ Fig. 2
def ks() -> list[int]:
    return [2 ** i for i in range(PASSK_N.bit_length()) if 2 ** i <= PASSK_N]


def passk_verdict(at_max: dict[str, float]) -> tuple[str, bool, bool]:
    """(held, demos above GRPO, HPT (code) highest) from {method: mean pass@256}."""
    above = all(at_max[m] > at_max["grpo"] for m in DEMO_METHODS)
    top = at_max[MAIN] >= max(at_max[m] for m in METHODS)
    return grade([above, top]), above, top


@figure("hpt_passk", "HPT Fig. 2: at large k the methods with demonstrations end above GRPO, HPT on top", slow=True)
def hpt_passk(out: Path) -> FigureResult:
    data = runs()
    pk = data["passk"]
    fig, ax = plt.subplots(figsize=(6, 4))
    at_max = {}
    for m in ("base", *METHODS):
        ys = np.array([[res["metrics"][f"pass@{k}"] for k in ks()] for res in pk[m].values()])
        at_max[m] = float(ys[:, -1].mean())
        ax.plot(ks(), ys.mean(0), marker=".", color=COLOR[m], label=LABEL[m])
        if len(ys) > 1:
            ax.fill_between(ks(), ys.min(0), ys.max(0), color=COLOR[m], alpha=0.12, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set(xlabel="k", ylabel="pass@k (unbiased, 256 samples)", title="probe, hard problems (levels 5, 6)")
    ax.legend(fontsize=7)
    save_figure(fig, out / "hpt_passk.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    held, above, top = passk_verdict(at_max)
    return FigureResult(
        ["hpt_passk.png"],
        f"Unbiased pass@k from {PASSK_N} samples (temperature 1) per hard probe problem (32: levels 5 and 6), final "
        "models, mean over seeds 1-3 with min-max band; the base model once.",
        held, "pass@256: " + ", ".join(f"{LABEL[m]} {v:.3f}" for m, v in at_max.items())
        + f"; demonstration methods above GRPO: {above}; HPT (code) highest: {top}", {"pass@256": at_max})


# ------------------------------------------------------------------------------------------ Figs. 3/4
def probe_accuracy(run_dir: Path) -> dict[int, dict[str, tuple[int, float]]]:
    """{step: {problem id: (level, fraction of samples right)}} of the probe set."""
    out: dict[int, dict[str, tuple[int, float]]] = {}
    for r in records(run_dir, "probe"):
        out.setdefault(r["step"], {})[r["id"]] = (r["level"], r["correct"] / r["n"])
    return out


def heatmap_verdict(diff: dict[int, dict[str, tuple[int, float]]]) -> tuple[str, dict[str, float]]:
    """(held, numbers) from {step: {id: (level, HPT minus SFT->GRPO accuracy, mean over seeds)}}."""
    def mean(step, levels):
        return float(np.mean([d for lv, d in diff[step].values() if lv in levels]))

    mid_hard = LEVELS["middle"] + LEVELS["hard"]
    nums = {"D0": mean(0, mid_hard), "D60": mean(RL_STEPS, mid_hard),
            "hard60": mean(RL_STEPS, LEVELS["hard"]), "middle60": mean(RL_STEPS, LEVELS["middle"])}
    return grade([nums["D0"] < 0, nums["D60"] > 0, nums["hard60"] > nums["middle60"]]), nums


@figure("hpt_heatmaps", "HPT Figs. 3/4: SFT->GRPO leads early, HPT later, most on the hardest problems", slow=True)
def hpt_heatmaps(out: Path) -> FigureResult:
    data = runs()
    d = data["dirs"]
    acc = {m: [probe_accuracy(d[m][s]) for s in sorted(d[m])] for m in ("sft_grpo", MAIN)}
    steps = sorted(set.intersection(*(set(a) for a in acc["sft_grpo"] + acc[MAIN])))
    ids = sorted(acc[MAIN][0][0], key=lambda i: (acc[MAIN][0][0][i][0], i))
    mean = {m: np.array([[np.mean([a[t][i][1] for a in acc[m]]) for t in steps] for i in ids]) for m in acc}
    levels = [acc[MAIN][0][0][i][0] for i in ids]
    diff = {t: {i: (lv, mean[MAIN][k, j] - mean["sft_grpo"][k, j]) for k, (i, lv) in enumerate(zip(ids, levels))}
            for j, t in enumerate(steps)}
    held, nums = heatmap_verdict(diff)
    fig, axes = plt.subplots(1, 2, figsize=(10, 7), sharey=True)
    panels = [(mean["sft_grpo"], "viridis", 0, 1, "SFT->GRPO: probe accuracy (GRPO stage)"),
              (mean[MAIN] - mean["sft_grpo"], "RdBu_r", -1, 1, "HPT (code) minus SFT->GRPO (red: HPT better)")]
    for ax, (z, cmap, lo, hi, title) in zip(axes, panels):
        im = ax.imshow(z, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set(xticks=range(len(steps)), xticklabels=steps, xlabel="RL step", title=title)
        fig.colorbar(im, ax=ax, fraction=0.05)
    bounds = [k for k in range(1, len(levels)) if levels[k] != levels[k - 1]]
    for ax in axes:
        for b in bounds:
            ax.axhline(b - 0.5, color="0.4", linewidth=0.8)
    axes[0].set(yticks=[(a + b) / 2 for a, b in zip([0, *bounds], [*bounds, len(levels)])],
                yticklabels=[f"L{lv}" for lv in sorted(set(levels))], ylabel="probe problem (16 per level)")
    save_figure(fig, out / "hpt_heatmaps.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return FigureResult(
        ["hpt_heatmaps.png"],
        "Per-problem probe accuracy (8 samples, every 10 RL steps), mean over seeds 1-3. Left: SFT->GRPO during its "
        "GRPO stage (it starts from its SFT model); right: HPT (code) at the same RL step minus SFT->GRPO.",
        held, f"HPT minus SFT->GRPO, middle+hard probe: {nums['D0']:+.3f} at step 0, {nums['D60']:+.3f} at step "
        f"{RL_STEPS}; at step {RL_STEPS} hard {nums['hard60']:+.3f}, middle {nums['middle60']:+.3f}", nums)


# ------------------------------------------------------------------------------------------ Fig. 5
@figure("hpt_validation", "HPT Fig. 5: HPT's validation curve above GRPO's and LUFFY's", slow=True)
def hpt_validation(out: Path) -> FigureResult:
    data = runs()
    m = data["metrics"]
    fig, ax = plt.subplots(figsize=(6, 4))
    means = {}
    for meth in METHODS:
        curves = [_eval_curve(rows, _macro_of_row) for rows in m[meth].values()]
        band(ax, curves, LABEL[meth], COLOR[meth])
        means[meth] = {t: float(np.mean([c[t] for c in curves])) for t in (20, 40, RL_STEPS)}
    ax.set(xlabel="RL step (SFT->GRPO: its GRPO stage)", ylabel="held-out avg@8, mean of middle and hard")
    ax.legend(fontsize=7)
    save_figure(fig, out / "hpt_validation.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    above = {t: all(means[MAIN][t] > means[b][t] for b in ("grpo", "luffy")) for t in (20, 40, RL_STEPS)}
    held = "yes" if all(above.values()) else "partly" if above[RL_STEPS] else "no"
    return FigureResult(
        ["hpt_validation.png"],
        "Held-out MACRO (mean of the middle and hard avg@8 on the test set) every 20 steps; line: mean over seeds "
        "1-3, band: min-max.", held,
        "; ".join(f"step {t}: HPT (code) {means[MAIN][t]:.3f}, GRPO {means['grpo'][t]:.3f}, LUFFY "
                  f"{means['luffy'][t]:.3f}" for t in (20, 40, RL_STEPS)), {"means": means})


# ------------------------------------------------------------------------------------------ Figs. 6/7
def dynamics_verdict(m: dict) -> tuple[str, dict[str, bool]]:
    """(held, claims) from {method: {seed: rows}} (module docstring, hpt_dynamics)."""
    hpt, grpo = m[MAIN], m["grpo"]
    early, late = (1, 10), (RL_STEPS - 9, RL_STEPS)
    claims = {
        "offline ratio falls and stays above 0": all(
            train_mean(r, "offline_ratio", *early) > train_mean(r, "offline_ratio", *late) > 0 for r in hpt.values()),
        "entropy above GRPO's": beats({s: train_mean(r, "entropy", 1, RL_STEPS) for s, r in hpt.items()},
                                      {s: train_mean(r, "entropy", 1, RL_STEPS) for s, r in grpo.items()}),
        "response length grows": all(
            train_mean(r, "response_length", *late) > train_mean(r, "response_length", *early) for r in hpt.values()),
    }
    return grade(list(claims.values())), claims


@figure("hpt_dynamics", "HPT Figs. 6/7: offline ratio falls, entropy above GRPO, response length grows", slow=True)
def hpt_dynamics(out: Path) -> FigureResult:
    data = runs()
    m = data["metrics"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, key in zip(axes, ("offline_ratio", "entropy", "response_length")):
        for meth in ("grpo", "luffy", *HPT):
            band(ax, [_train_curve(rows, key) for rows in m[meth].values()], LABEL[meth], COLOR[meth])
        ax.set(xlabel="step", title=key.replace("_", " "))
    n = 8   # generation.n of the RL configs: LUFFY puts one demonstration among n samples
    axes[0].axhline(1 / n, color=COLOR["luffy"], linestyle=":", label=f"1/{n} (LUFFY's constant)")
    axes[0].legend(fontsize=7)
    save_figure(fig, out / "hpt_dynamics.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    held, claims = dynamics_verdict(m)
    return FigureResult(
        ["hpt_dynamics.png"],
        "Training metrics per step, mean over seeds 1-3 with min-max band: the offline-data ratio (demonstration "
        "rows over all rows of the step), the mean token entropy of the rollouts, the mean response length.",
        held, "; ".join(f"{k}: {'yes' if v else 'no'} (every seed)" for k, v in claims.items()), {"claims": claims})


# ------------------------------------------------------------------------------------------ Fig. 8 / Table 6
def gate_verdict(ratio: dict[float, dict[int, float]], score: dict[float, dict[int, float]]) -> tuple[str, bool, bool]:
    """(held, offline ratio rises with gamma in every seed, gamma 0 best mean MACRO)."""
    g = sorted(ratio)
    rises = all(beats(ratio[b], ratio[a]) for a, b in zip(g, g[1:]))
    best = max(score, key=lambda k: (np.mean(list(score[k].values())), -k))
    return grade([rises, best == 0.0]), rises, best == 0.0


@figure("hpt_gate", "HPT Fig. 8 / Table 6: a larger gate gives more offline data; gamma = 0 is best", slow=True)
def hpt_gate(out: Path) -> FigureResult:
    data = runs()
    m = data["metrics"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = dict(zip(GATE, ("tab:red", "tab:purple", "tab:brown")))
    ratio, score = {}, {}
    for gamma, v in GATE.items():
        ratio[gamma] = per_seed(m, v, lambda r: train_mean(r, "offline_ratio", 1, RL_STEPS))
        score[gamma] = per_seed(m, v, macro)
        for ax, key in zip(axes, ("reward", "offline_ratio")):
            band(ax, [_train_curve(rows, key) for rows in m[v].values()], f"gamma = {gamma:g}", colors[gamma])
    for ax, key in zip(axes, ("training reward", "offline-data ratio")):
        ax.set(xlabel="step", title=key)
    axes[0].legend(fontsize=8)
    save_figure(fig, out / "hpt_gate.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    lines = ["| gamma | MACRO per seed | MACRO mean | mean offline ratio |", "|---|---|---|---|"]
    for gamma in GATE:
        lines.append(f"| {gamma:g} | {', '.join(f'{x:.3f}' for x in score[gamma].values())} | "
                     f"{np.mean(list(score[gamma].values())):.3f} | {np.mean(list(ratio[gamma].values())):.3f} |")
    (out / "hpt_gate.md").write_text("# HPT (code) gate ablation: final held-out MACRO\n\n" + "\n".join(lines) + "\n")
    held, rises, best0 = gate_verdict(ratio, score)
    return FigureResult(
        ["hpt_gate.png", "hpt_gate.md"],
        "HPT (code) with the gate gamma in {0, 1/8, 2/8} (SFT on a prompt when at most gamma*8 of its 8 rollouts "
        "are right): training reward and offline-data ratio per step (mean over seeds 1-3, min-max band), and "
        "the final held-out MACRO.", held,
        f"offline ratio rises with gamma in every seed: {rises}; gamma = 0 has the best MACRO: {best0} ("
        + ", ".join(f"{g:g}: {np.mean(list(score[g].values())):.3f}" for g in GATE) + ")",
        {"macro": {str(g): v for g, v in score.items()}})


# ------------------------------------------------------------------------------------------ Table 5
@figure("hpt_table5", "HPT Table 5: SFT on the gated demonstrations (SFT/ON) beats OFF/ON and Mix/ON", slow=True)
def hpt_table5(out: Path) -> FigureResult:
    data = runs()
    scores = {name: per_seed(data["metrics"], v, macro) for name, v in TABLE5.items()}
    main, others = "SFT/ON (HPT)", [k for k in TABLE5 if k != "SFT/ON (HPT)"]
    won = {o: beats(scores[main], scores[o]) for o in others}
    lines = ["| paradigm | MACRO per seed | MACRO (mean [95% CI]) |", "|---|---|---|"]
    lines += [f"| {k} | {', '.join(f'{x:.3f}' for x in v.values())} | {mean_ci(v.values())} |"
              for k, v in scores.items()]
    title = "# HPT (code): what the gated demonstrations train\n\n"
    (out / "hpt_table5.md").write_text(title + "\n".join(lines) + "\n")
    return FigureResult(
        ["hpt_table5.md"],
        "HPT (code) with the gated demonstration trained by SFT (HPT), by LUFFY's off-policy term (OFF/ON), or by "
        "0.1 x SFT + 1 x off-policy (Mix/ON); final held-out MACRO per seed.",
        grade(list(won.values())), "; ".join(f"SFT/ON beats {o} in every seed: {w}" for o, w in won.items()),
        {"macro": scores})


# ------------------------------------------------------------------------------------------ theory vs practice
def batch_sfmse(mean: np.ndarray, variance: float, target: np.ndarray, batch: int) -> float:
    """min over s >= 0 of E||s g_B - t||^2 / ||t||^2 for the mean g_B of `batch` independent estimates with
    mean `mean` and total variance `variance`: 1 - max(<m, t>, 0)^2 / (||t||^2 (variance / batch + ||m||^2))."""
    second = variance / batch + float((mean ** 2).sum())
    return 1.0 - max(float((mean * target).sum()), 0.0) ** 2 / (float((target ** 2).sum()) * second)


def spearman(a: dict[str, float], b: dict[str, float]) -> float:
    from scipy.stats import spearmanr

    keys = sorted(a)
    return float(spearmanr([a[k] for k in keys], [b[k] for k in keys]).statistic)


def predicted_errors(base_acc: list[float]) -> dict[str, float]:
    """{method: batch-16 scale-free MSE against grad J(middle and hard)} on the matched finite problem."""
    from theory.estimator import preset
    from theory.finite import Objective
    from theory.moments import GateRule, exact_moments
    from toy.bandit import make_problem

    prob, theta = make_problem(len(base_acc), 6, difficulty=np.clip(1 - np.asarray(base_acc), 0.01, 0.99),
                               n_correct=1, demo_quality=1.0, seed=0)
    target = Objective(reward=1.0).gradient(prob, theta, theta)
    target[[lv - 1 for lv in range(1, len(base_acc) + 1) if lv not in LEVELS["middle"] + LEVELS["hard"]]] = 0.0
    out = {}
    for m, (name, scheme, gate) in THEORY.items():
        mom = exact_moments(preset(name), prob, theta, 8, scheme, gate=GateRule(*gate) if gate else None)
        out[m] = batch_sfmse(mom.mean, mom.variance, target, 16)
    return out


@figure("hpt_theory_practice", "ours: does the exact bias/variance analysis predict the tiny world's ranking?",
        slow=True)
def hpt_theory_practice(out: Path) -> FigureResult:
    data = runs()
    m = data["metrics"]
    base = [float(np.mean([final([r for r in rows if r.get("step") == 0], KEY.format(f"L{lv}"))
                           for rows in m["grpo"].values()])) for lv in range(1, 7)]
    err = predicted_errors(base)
    measured = {k: float(np.mean(list(per_seed(m, k, macro).values()))) for k in THEORY}
    rho = spearman({k: -v for k, v in err.items()}, measured)
    held = "yes" if rho >= 0.8 else "partly" if rho >= 0.2 else "no"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for k in THEORY:
        ax.scatter(err[k], measured[k], color=COLOR[k], label=LABEL[k])
    ax.set(xlabel="predicted: scale-free MSE of a 16-prompt step vs grad J (middle+hard), exact",
           ylabel="measured: final held-out MACRO (mean of seeds)", title=f"Spearman rho = {rho:+.2f}")
    ax.legend(fontsize=7)
    save_figure(fig, out / "hpt_theory_practice.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return FigureResult(
        ["hpt_theory_practice.png"],
        "x: exact scale-free MSE (theory.moments) of each method's 16-prompt gradient step against the gradient of "
        "the expected reward on the middle and hard contexts, at the base policy of the finite problem matched to "
        "the world (one context per level, the base's measured step-0 accuracy per level: "
        + ", ".join(f"L{i + 1} {a:.3f}" for i, a in enumerate(base)) + "); y: measured final MACRO.",
        held, f"Spearman rho {rho:+.2f}; predicted error " + ", ".join(f"{LABEL[k]} {v:.3f}" for k, v in err.items()),
        {"rho": rho, "predicted": err, "measured": measured, "base_accuracy": base})
