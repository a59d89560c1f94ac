"""Schedules: which objective(s) a training step uses, and with what weight.

One set of objects drives the convex forgetting analysis (`theory.forgetting`), the bandit loops and the
scale trainer. Every schedule answers

    weights(step, stats=None) -> dict[str, float]        # objective name -> weight for this step

with objective names "sft" and "dpo" for the SFT/DPO trade-off (XRIGHT, `docs/xright.md`) and
"rl" and "sft" for the HPT gate (`docs/hpt.md` section 4). A weight of 0 means the objective is
not evaluated at all this step, so `cost(weights)` (the number of non-zero weights) is the number of
gradient evaluations the step pays: Mix pays two, the others one.

Objects are plain, picklable and deterministic: ALRIGHT derives its draw from (seed, step), never from
a stateful stream, so a run resumed at step t draws what an uninterrupted run draws. The only state is
MAXRIGHT's cache of objective values (the released code's stale values), which pickles with the object.

| schedule | weights at step t | paper / code |
|---|---|---|
| `Sequential(stages=[("sft", n1), ("dpo", n2)])` | 1 on the current stage's objective | Alg. 1 |
| `Mix(lam)` | {"dpo": lam, "sft": 1 - lam} | Mix baseline |
| `Alright(lam, seed)` | one-hot, "dpo" with probability lam | ALRIGHT |
| `Maxright(lam, f_star, k)` | one-hot on the larger weighted gap to f_star | MAXRIGHT |
| `HptGate(gamma, mode)` | per prompt {"rl": alpha(P), "sft": beta(P)} | HPT Eq. 9-10 |
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from theory._checks import unit_interval

__all__ = ["Schedule", "Sequential", "Mix", "Alright", "Maxright", "HptGate", "cost"]


@runtime_checkable
class Schedule(Protocol):
    """What the analysis and the trainers call. `objectives` lists the names `weights` returns."""

    name: str
    objectives: tuple[str, ...]

    def weights(self, step: int, stats: Mapping[str, float] | None = None) -> dict[str, float]: ...

    def describe(self) -> str: ...


def cost(weights: Mapping[str, float]) -> int:
    """Gradient evaluations a step with these weights pays: objectives with a non-zero weight."""
    return sum(1 for w in weights.values() if w != 0.0)


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step: expected a non-negative integer, got {step!r}")
    return int(step)


def _finite(name: str, value) -> float:
    """A finite real number (an objective value): NaN would silently pick a branch of every comparison."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a finite number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return v


def _items(value) -> tuple | None:
    """The elements of a list, tuple or array; None for a string, a mapping or anything not iterable."""
    if isinstance(value, (str, bytes, Mapping)):
        return None
    try:
        return tuple(value)
    except TypeError:
        return None


def _one_hot(chosen: str, names: Sequence[str]) -> dict[str, float]:
    return {n: (1.0 if n == chosen else 0.0) for n in names}


class Sequential:
    """Train one objective per stage: stages [(name, steps), ...] run one after the other.

    `Sequential(stages=[("sft", 600), ("dpo", 400)])`, or the convenience form
    `Sequential(order=("sft", "dpo"), split=0.6, total_steps=1000)` where `split` is the fraction of
    the budget given to the first stage (rounded to the nearest step). The released XRIGHT code runs each
    stage as a separate process, so a trainer should reset its optimizer state at `stage_start(step)`.
    Steps past the last stage raise ValueError: the budget is part of the schedule.
    """

    name = "sequential"

    def __init__(self, stages: Sequence[tuple[str, int]] | None = None, *, order: Sequence[str] | None = None,
                 split: float | None = None, total_steps: int | None = None):
        if stages is None:
            if order is None or split is None or total_steps is None:
                raise ValueError("stages: give either stages=[(name, steps), ...] or all of order, split, "
                                 "total_steps")
            order = _items(order)
            if order is None or len(order) != 2 or not all(isinstance(o, str) for o in order) or order[0] == order[1]:
                raise ValueError(f"order: expected two different objective names, got {order!r}")
            split = unit_interval("split", split)
            if isinstance(total_steps, bool) or not isinstance(total_steps, (int, np.integer)) or total_steps < 0:
                raise ValueError(f"total_steps: expected a non-negative integer, got {total_steps!r}")
            n1 = int(round(split * int(total_steps)))
            stages = [(order[0], n1), (order[1], int(total_steps) - n1)]
        elif order is not None or split is not None or total_steps is not None:
            raise ValueError("stages: give either stages or (order, split, total_steps), not both")
        items = _items(stages)
        if not items:
            raise ValueError(f"stages: expected a non-empty list of (name, steps) stages, got {stages!r}")
        clean = []
        for s in items:
            pair = _items(s)
            if pair is None or len(pair) != 2 or not isinstance(pair[0], str):
                raise ValueError(f"stages: expected (name, steps) pairs, got {s!r}")
            n = pair[1]
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
                raise ValueError(f"stages: steps must be a non-negative integer, got {s!r}")
            clean.append((pair[0], int(n)))
        self.stages: tuple[tuple[str, int], ...] = tuple(clean)
        self.objectives = tuple(dict.fromkeys(n for n, _ in clean))
        self.bounds = np.cumsum([n for _, n in clean])  # stage i covers [bounds[i-1], bounds[i])

    @property
    def total_steps(self) -> int:
        return int(self.bounds[-1])

    def stage_index(self, step: int) -> int:
        step = _check_step(step)
        if step >= self.total_steps:
            raise ValueError(f"step: {step} is past the last stage (total_steps={self.total_steps})")
        return int(np.searchsorted(self.bounds, step, side="right"))

    def stage_start(self, step: int) -> bool:
        """True at the first step of a (non-empty) stage: where the released code restarts its optimizer."""
        i = self.stage_index(step)
        return step == (0 if i == 0 else int(self.bounds[i - 1]))

    def weights(self, step: int, stats: Mapping[str, float] | None = None) -> dict[str, float]:
        return _one_hot(self.stages[self.stage_index(step)][0], self.objectives)

    def describe(self) -> str:
        return "Sequential " + " -> ".join(f"{n}x{k}" for n, k in self.stages)


class Mix:
    """Both objectives every step: {"dpo": lam, "sft": 1 - lam} (lam is the DPO weight, as in XRIGHT)."""

    name = "mix"
    objectives = ("sft", "dpo")

    def __init__(self, lam: float):
        self.lam = unit_interval("lam", lam)

    def weights(self, step: int, stats: Mapping[str, float] | None = None) -> dict[str, float]:
        _check_step(step)
        return {"sft": 1.0 - self.lam, "dpo": self.lam}

    def describe(self) -> str:
        return f"Mix(lam={self.lam:g}): (1-lam) f_sft + lam f_dpo every step"


class Alright:
    """ALRIGHT: each step trains DPO with probability lam, else SFT (weight 1 on the one drawn).

    The draw at step t is `default_rng([seed, t]).random() < lam`, a pure function of (seed, t), so
    resuming at t reproduces an uninterrupted run. The released code draws
    `np.random.choice([dpo, sft], p=[lam, 1-lam])` from one seeded stream; the law is the same.
    In expectation the weights are Mix(lam)'s, which makes ALRIGHT SGD on f_mix (theory/README.md s3).
    """

    name = "alright"
    objectives = ("sft", "dpo")

    def __init__(self, lam: float, seed: int = 0):
        self.lam = unit_interval("lam", lam)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.seed = int(seed)

    def choice(self, step: int) -> str:
        step = _check_step(step)
        u = np.random.default_rng([self.seed, step]).random()
        return "dpo" if u < self.lam else "sft"

    def weights(self, step: int, stats: Mapping[str, float] | None = None) -> dict[str, float]:
        return _one_hot(self.choice(step), self.objectives)

    def describe(self) -> str:
        return f"ALRIGHT(lam={self.lam:g}, seed={self.seed}): DPO w.p. lam, SFT otherwise"


class Maxright:
    """MAXRIGHT: train the objective whose weighted gap to its optimum is larger.

    Gaps: g_sft = (1 - lam) (f_sft - f*_sft) and g_dpo = lam (f_dpo - f*_dpo); a tie picks SFT (as the
    released code's argmax over [sft, dpo] does). Values come in through `stats={"f_sft", "f_dpo"}`.

    Refresh rule (explicit, as in `xright/trainer/sft_dpo_maxright_trainer.py`):
    - `needs_values(step)` is True at step 0, at every step with step % k == 0, and whenever nothing is
      cached (e.g. after unpickling a fresh object). At those steps `weights` requires both values and
      stores them; at other steps `stats` is ignored and the cached (stale) values decide.
    - After training on the chosen objective, the caller may report its loss at the pre-update point with
      `observe(name, value)`; the code does this (it refreshes only the objective it just trained).
    - k=1 with exact values every step is the paper's exact MAXRIGHT; k=None never refreshes after
      step 0 (the code's max_eval_steps=-1).
    """

    name = "maxright"
    objectives = ("sft", "dpo")

    def __init__(self, lam: float, f_star: Mapping[str, float] | Sequence[float], k: int | None = 1):
        self.lam = unit_interval("lam", lam)
        if isinstance(f_star, Mapping):
            if set(f_star) != {"sft", "dpo"}:
                raise ValueError(f"f_star: expected keys 'sft' and 'dpo', got {sorted(map(str, f_star))}")
            fs = (f_star["sft"], f_star["dpo"])
        else:
            fs = _items(f_star)
            if fs is None or len(fs) != 2:
                raise ValueError(f"f_star: expected (f*_sft, f*_dpo), got {f_star!r}")
        self.f_star = {"sft": _finite("f_star", fs[0]), "dpo": _finite("f_star", fs[1])}
        if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
            raise ValueError(f"k: expected a positive integer or None (never refresh), got {k!r}")
        self.k = None if k is None else int(k)
        self.cached: dict[str, float] = {}

    def needs_values(self, step: int) -> bool:
        step = _check_step(step)
        return len(self.cached) < 2 or step == 0 or (self.k is not None and step % self.k == 0)

    def observe(self, name: str, value: float) -> None:
        if name not in self.objectives:
            raise ValueError(f"name: expected one of {self.objectives}, got {name!r}")
        self.cached[name] = _finite("value", value)

    def gaps(self) -> dict[str, float]:
        """Weighted gaps from the cached values."""
        return {"sft": (1.0 - self.lam) * (self.cached["sft"] - self.f_star["sft"]),
                "dpo": self.lam * (self.cached["dpo"] - self.f_star["dpo"])}

    def weights(self, step: int, stats: Mapping[str, float] | None = None) -> dict[str, float]:
        if self.needs_values(step):
            if not isinstance(stats, Mapping) or "f_sft" not in stats or "f_dpo" not in stats:
                got = sorted(map(str, stats)) if isinstance(stats, Mapping) else stats
                raise ValueError(f"stats: step {step} needs fresh values {{'f_sft', 'f_dpo'}} "
                                 f"(see needs_values), got {got!r}")
            self.cached = {"sft": _finite("stats['f_sft']", stats["f_sft"]),
                           "dpo": _finite("stats['f_dpo']", stats["f_dpo"])}
        g = self.gaps()
        return _one_hot("dpo" if g["dpo"] > g["sft"] else "sft", self.objectives)

    def describe(self) -> str:
        k = "never" if self.k is None else f"every {self.k} step(s)"
        return (f"MAXRIGHT(lam={self.lam:g}, f*_sft={self.f_star['sft']:.4g}, f*_dpo={self.f_star['dpo']:.4g}): "
                f"larger weighted gap, both values refreshed {k}")


class HptGate:
    """HPT's per-prompt gate from rollout accuracy P (correct / n): weights {"rl": alpha, "sft": beta}.

    - mode="switch" (paper Eq. 9-10): (alpha, beta) = (0, 1) if P <= gamma else (1, 0).
    - mode="smooth" [ours]: alpha = sigmoid((P - gamma) / temperature), beta = 1 - alpha; alpha rises and
      beta falls with P, as the paper asks of f and g, and it tends to the switch as temperature -> 0
      (except exactly at P = gamma, where it gives 1/2 each).

    Paper vs released code (docs/hpt.md sections 6.1, 6.6): the code compares the integer count of correct rollouts,
    `on_solve_num <= switch_gate`, and sends the prompt to SFT (one demo row) or RL (its n rollouts).
    With P = c / n this is P <= switch_gate / n, i.e. gamma = switch_gate / n: Qwen switch_gate=0 (gamma 0),
    LLaMA switch_gate=2 with n=8 (gamma 2/8). `HptGate.from_code(switch_gate, n)` builds that gate and
    `count_weights(c)` applies the code's integer comparison (no rounding of c / n). The code's middle
    branch (switch_gate < c <= switch_gate_off: offline RL on the demo) is unused by the released scripts
    and not modelled here.
    """

    name = "hpt_gate"
    objectives = ("rl", "sft")

    def __init__(self, gamma: float, mode: str = "switch", temperature: float = 0.05):
        gamma = unit_interval("gamma", gamma)
        if mode not in ("switch", "smooth"):
            raise ValueError(f"mode: expected 'switch' or 'smooth', got {mode!r}")
        if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and temperature > 0
                                                 and math.isfinite(temperature)):
            raise ValueError(f"temperature: expected a positive number, got {temperature!r}")
        self.gamma, self.mode, self.temperature = gamma, mode, float(temperature)
        self.switch_gate: int | None = None
        self.n: int | None = None

    @classmethod
    def from_code(cls, switch_gate: int, n: int) -> HptGate:
        """The released code's gate: SFT iff (number correct) <= switch_gate, out of n rollouts."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n: expected a positive integer, got {n!r}")
        if isinstance(switch_gate, bool) or not isinstance(switch_gate, (int, np.integer)) or not 0 <= switch_gate <= n:
            raise ValueError(f"switch_gate: expected an integer in [0, n={n}], got {switch_gate!r}")
        gate = cls(switch_gate / n, mode="switch")
        gate.switch_gate, gate.n = int(switch_gate), int(n)
        return gate

    def prompt_weights(self, accuracy) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised: accuracy P [n_prompts] in [0, 1] -> (alpha [n_prompts], beta [n_prompts])."""
        try:
            p = np.asarray(accuracy, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"accuracy: expected numbers in [0, 1], got {accuracy!r}") from None
        if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
            raise ValueError("accuracy: expected values in [0, 1]")
        if self.mode == "switch":
            alpha = (p > self.gamma).astype(np.float64)
        else:
            alpha = 0.5 * (1.0 + np.tanh((p - self.gamma) / (2.0 * self.temperature)))  # stable sigmoid
        return alpha, 1.0 - alpha

    def count_weights(self, num_correct) -> tuple[np.ndarray, np.ndarray]:
        """The code's rule on integer counts [n_prompts]: SFT iff num_correct <= switch_gate."""
        if self.switch_gate is None:
            raise ValueError("num_correct: count_weights needs a gate built with HptGate.from_code")
        c = np.asarray(num_correct)
        if c.dtype.kind not in "iu" or np.any(c < 0) or np.any(c > self.n):
            raise ValueError(f"num_correct: expected integers in [0, {self.n}]")
        alpha = (c > self.switch_gate).astype(np.float64)
        return alpha, 1.0 - alpha

    def weights(self, step: int, stats: Mapping[str, float] | None = None) -> dict[str, float]:
        """One prompt: stats={"accuracy": P}."""
        _check_step(step)
        if not isinstance(stats, Mapping) or "accuracy" not in stats:
            raise ValueError("stats: the HPT gate needs {'accuracy': P} for the prompt")
        a, b = self.prompt_weights(np.array([stats["accuracy"]]))
        return {"rl": float(a[0]), "sft": float(b[0])}

    def describe(self) -> str:
        src = f" (code: switch_gate={self.switch_gate} of n={self.n})" if self.switch_gate is not None else ""
        extra = f", temperature={self.temperature:g}" if self.mode == "smooth" else ""
        rule = "SFT if P <= gamma, else RL" if self.mode == "switch" else "alpha = sigmoid((P - gamma) / T)"
        return f"HptGate(gamma={self.gamma:g}, mode={self.mode}{extra}){src}: {rule}"
