"""Helpers shared by the figure modules that grade paper claims on sweeps over seeds: the final value of a
metric or its value at a step, the training time of a run, paired "beats in every seed", the yes / partly /
no grade, and mean-with-interval text and bands."""

from __future__ import annotations


def final(rows: list[dict], key: str) -> float:
    """The last logged value of `key` (ValueError when it was never logged)."""
    for r in reversed(rows):
        if key in r:
            return float(r[key])
    raise ValueError(f"metric {key!r} was never logged")


def value_at(rows: list[dict], key: str, step: int) -> float:
    """The value of `key` logged at `step` (the last such line; ValueError when the run did not log it there)."""
    vals = [r[key] for r in rows if r.get("step") == step and key in r]
    if not vals:
        raise ValueError(f"metric {key!r} was not logged at step {step}")
    return float(vals[-1])


def step_seconds(rows: list[dict]) -> float:
    """Seconds spent in training steps: the logged step_time summed (held-out evaluation excluded)."""
    return float(sum(r["step_time"] for r in rows if "step_time" in r))


def beats(variant: dict[int, float], baseline: dict[int, float]) -> bool:
    """Strictly higher in every paired seed (and at least one seed shared)."""
    seeds = set(variant) & set(baseline)
    return bool(seeds) and all(variant[s] > baseline[s] for s in seeds)


def grade(claims: list[bool], partly_if_any: bool = True) -> str:
    """yes when every claim holds, partly when some do, no when none."""
    if all(claims):
        return "yes"
    return "partly" if any(claims) and partly_if_any else "no"


def mean_ci(values) -> str:
    from experiments.sweep import summarise

    s = summarise(values)
    ci = f" [{s['ci'][0]:+.3f}, {s['ci'][1]:+.3f}]" if s["ci"] else ""
    return f"{s['mean']:.3f}{ci}"


def band(ax, curves: list[dict[int, float]], label: str, color: str) -> None:
    from experiments.sweep import mean_curve

    x, mean, lo, hi = mean_curve(curves)
    ax.plot(x, mean, color=color, label=label)
    ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
