"""Synthetic verifiable tasks: arithmetic with difficulty levels, in the column layouts TRL uses.

Every example is a dict with
    prompt     "What is 3 + 4?\\n"                       (plain text; ends in a newline so prompt and
                                                          completion tokenise independently)
    answer     "7"                                        (the ground truth, graded by scale.rewards)
    completion "3 + 4 = 7. The answer is \\boxed{7}."    (a worked demonstration)
    chosen     a correct response (the demonstration)
    rejected   a plausible wrong response: the same steps with the final result off by a small amount
    level      the difficulty level (int)

Levels (`LEVELS`): 1 single-digit a + b; 2 two-digit a + b; 3 a * b + c (single digits);
4 a * b - c (two-digit a, single-digit b, two-digit c); 5 two-digit a - b with a >= b.
Levels 1-4 form the general pool of the data-regularisation runs; level 5 (subtraction, an operation
the general pool never shows) is the target task.

Everything is deterministic given the seed (a `random.Random(seed)` stream per call).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

LEVELS = {
    1: "single-digit addition a + b",
    2: "two-digit addition a + b",
    3: "a * b + c with single digits",
    4: "a * b - c with two-digit a and c, single-digit b",
    5: "two-digit subtraction a - b with a >= b",
}
GENERAL_LEVELS = (1, 2, 3, 4)
TARGET_LEVEL = 5


def _draw(level: int, rng: random.Random) -> tuple[str, list[tuple[str, int]], int]:
    """(question expression, worked steps as (expression, value), final value) for one problem."""
    if level == 1:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"{a} + {b}", [(f"{a} + {b}", a + b)], a + b
    if level == 2:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        return f"{a} + {b}", [(f"{a} + {b}", a + b)], a + b
    if level == 3:
        a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(0, 9)
        return f"{a} * {b} + {c}", [(f"{a} * {b}", a * b), (f"{a * b} + {c}", a * b + c)], a * b + c
    if level == 4:
        a, b, c = rng.randint(10, 99), rng.randint(2, 9), rng.randint(10, 99)
        return f"{a} * {b} - {c}", [(f"{a} * {b}", a * b), (f"{a * b} - {c}", a * b - c)], a * b - c
    if level == 5:
        a = rng.randint(10, 99)
        b = rng.randint(10, a)
        return f"{a} - {b}", [(f"{a} - {b}", a - b)], a - b
    raise ValueError(f"level: expected one of {sorted(LEVELS)}, got {level!r}")


def _response(steps: list[tuple[str, int]], final: int) -> str:
    """The worked solution; the last step's value is replaced by `final` (used for wrong responses)."""
    parts = [f"{e} = {v}" for e, v in steps[:-1]] + [f"{steps[-1][0]} = {final}"]
    return "; ".join(parts) + f". The answer is \\boxed{{{final}}}."


def make_examples(n: int, level: int, seed: int = 0) -> list[dict]:
    """`n` examples of one level: prompt, answer, completion, chosen, rejected, level (see module doc)."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n: expected a non-negative int, got {n!r}")
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {sorted(LEVELS)}, got {level!r}")
    rng = random.Random(f"ptlab-tasks-{level}-{seed}")
    out = []
    for _ in range(n):
        question, steps, value = _draw(level, rng)
        # A plausible mistake: a carry or off-by-one slip in the last step (never the right value).
        wrong = value + rng.choice([-10, -2, -1, 1, 2, 10])
        correct = _response(steps, value)
        out.append({"prompt": f"What is {question}?\n", "answer": str(value), "completion": correct,
                    "chosen": correct, "rejected": _response(steps, wrong), "level": level})
    return out


def make_mixed(n: int, levels: Iterable[int], seed: int = 0) -> list[dict]:
    """`n` examples with levels drawn uniformly from `levels` (in a seeded, shuffled order)."""
    levels = list(levels)
    if not levels:
        raise ValueError("levels: expected at least one level")
    rng = random.Random(f"ptlab-mixed-{seed}")
    picks = [rng.choice(levels) for _ in range(n)]
    pools = {lv: iter(make_examples(picks.count(lv), lv, seed=seed)) for lv in set(picks)}
    return [next(pools[lv]) for lv in picks]


def write_jsonl(records: Iterable[dict], path: str | Path) -> Path:
    """Write one JSON object per line (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path


def _cols(records: list[dict], keys: tuple[str, ...]) -> list[dict]:
    return [{k: r[k] for k in keys} for r in records]


def write_datasets(out_dir: str | Path, n_train: int = 256, n_test: int = 64, seed: int = 0,
                   levels: Iterable[int] = (1, 2)) -> dict[str, Path]:
    """Write the TRL-column data sets of one toy world into `out_dir`; returns {name: path}.

    sft.jsonl      prompt, completion
    dpo.jsonl      prompt, chosen, rejected
    rl.jsonl       prompt, answer, completion (the demonstration used by hpt / luffy / srft)
    joint.jsonl    prompt, completion, chosen, rejected (the joint SFT+DPO schedules)
    test.jsonl     id, prompt, answer, level (the `ptlab eval` format), disjoint seed from training
    general.jsonl  prompt, completion, answer, level: the mixed-level pool (levels 1-4)
    target.jsonl   prompt, completion, answer, level: the target task (level 5, subtraction)
    """
    out_dir = Path(out_dir)
    train = make_mixed(n_train, levels, seed=seed)
    test = make_mixed(n_test, levels, seed=seed + 10_000)
    files = {
        "sft": _cols(train, ("prompt", "completion")),
        "dpo": _cols(train, ("prompt", "chosen", "rejected")),
        "rl": _cols(train, ("prompt", "answer", "completion")),
        "joint": _cols(train, ("prompt", "completion", "chosen", "rejected")),
        "test": [{"id": i, **_cols([r], ("prompt", "answer", "level"))[0]} for i, r in enumerate(test)],
        "general": _cols(make_mixed(n_train, GENERAL_LEVELS, seed=seed + 20_000),
                         ("prompt", "completion", "answer", "level")),
        "target": _cols(make_examples(n_train, TARGET_LEVEL, seed=seed + 30_000),
                        ("prompt", "completion", "answer", "level")),
    }
    return {name: write_jsonl(rows, out_dir / f"{name}.jsonl") for name, rows in files.items()}
