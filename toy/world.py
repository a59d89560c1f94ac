"""The miniature world: an arithmetic difficulty ladder on which post-training methods visibly learn.

Every rung of the ladder has one role (measured numbers in the README, "The miniature world"):

    level  problem                         role     how the base model meets it
    1      a + b      a in 10..89, b 1..9  easy     pretrained on clean solutions
    2      a - b      a in 10..99, b 1..9  easy     pretrained on clean solutions
    3      a + b      a, b in 10..89       middle   pretrained on NOISY solutions (final value right w.p. 0.35)
    4      a - b      a, b in 10..99, a>b  middle   pretrained on NOISY solutions
    5      a + b + c  a 10..80, b, c 1..9  hard     never seen: two chained level-1 steps
    6      a + b - c  a 10..80, b, c 1..9  hard     never seen: a level-1 step, then a level-2 step

Easy rungs the base solves (greedy); middle rungs it solves sometimes when sampling, so RL has signal
(groups with mixed rewards); hard rungs it almost never solves, since it has never seen a three-operand
question, but every step of their worked solution is an easy-rung skill, so demonstrations teach them.
The middle rungs' noise models a base that has a skill but samples slips often ("a carry or off-by-one
slip": the final value off by one of -10, -2, -1, 1, 2, 10); this construction is ours.

Train and test problems are disjoint by construction: each level's problems form a finite set, and a
problem belongs to the test split iff a hash of (level, operands) falls in the first quarter
(`split_of`). Held-out sets draw only test problems, training sets only train problems.

Two styles of solution, so that SFT and preference data can conflict in style while both are correct
(the XRIGHT miniature); the base is pretrained on both (terse with probability 0.25), so both have
non-negligible probability under the reference model:
    worked  "23 + 4 = 27; 27 + 5 = 32. The answer is \\boxed{32}."
    terse   "The answer is \\boxed{32}."
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from pathlib import Path

from toy.tasks import write_jsonl

SLIPS = (-10, -2, -1, 1, 2, 10)


@dataclass(frozen=True)
class Level:
    role: str          # easy | middle | hard
    description: str
    ranges: tuple      # one range per operand
    ops: tuple         # the operators between operands, e.g. ("+", "-")
    min_gap: int = 0   # two-operand subtraction: a - b >= min_gap (1 for level 4: a > b)


LEVELS = {
    1: Level("easy", "a + b, a in 10..89, b in 1..9", (range(10, 90), range(1, 10)), ("+",)),
    2: Level("easy", "a - b, a in 10..99, b in 1..9", (range(10, 100), range(1, 10)), ("-",)),
    3: Level("middle", "a + b, a and b in 10..89", (range(10, 90), range(10, 90)), ("+",)),
    4: Level("middle", "a - b, a and b in 10..99, a > b", (range(10, 100), range(10, 100)), ("-",), min_gap=1),
    5: Level("hard", "a + b + c, a in 10..80, b and c in 1..9", (range(10, 81), range(1, 10), range(1, 10)),
             ("+", "+")),
    6: Level("hard", "a + b - c, a in 10..80, b and c in 1..9", (range(10, 81), range(1, 10), range(1, 10)),
             ("+", "-")),
}
ROLES = {role: tuple(lv for lv, L in LEVELS.items() if L.role == role) for role in ("easy", "middle", "hard")}
TEST_FRACTION = 4  # one problem in four is held out


def _check_level(level) -> Level:
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {sorted(LEVELS)}, got {level!r}")
    return LEVELS[level]


def problems(level: int) -> list[tuple[int, ...]]:
    """Every problem of a level, as operand tuples, in a fixed order."""
    L = _check_level(level)
    out: list[tuple[int, ...]] = [()]
    for r in L.ranges:
        out = [p + (x,) for p in out for x in r]
    if L.min_gap:
        out = [p for p in out if p[0] - p[1] >= L.min_gap]
    return out


def split_of(level: int, operands: tuple[int, ...]) -> str:
    """'test' for one problem in TEST_FRACTION (by a hash of level and operands), else 'train'."""
    digest = hashlib.sha256(f"ptlab-world:{level}:{operands}".encode()).digest()
    return "test" if digest[0] % TEST_FRACTION == 0 else "train"


def solve(level: int, operands: tuple[int, ...]) -> tuple[str, list[tuple[str, int]], int]:
    """(question expression, worked steps as (expression, value), final value): left to right."""
    L = _check_level(level)
    steps, value = _steps(L.ops, operands)
    question = " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(L.ops, operands[1:])])
    return question, steps, value


def _steps(ops: tuple[str, ...], operands: tuple[int, ...]) -> tuple[list[tuple[str, int]], int]:
    steps, acc = [], operands[0]
    for op, x in zip(ops, operands[1:]):
        value = acc + x if op == "+" else acc - x
        steps.append((f"{acc} {op} {x}", value))
        acc = value
    return steps, acc


def worked(steps: list[tuple[str, int]], final: int) -> str:
    """The worked solution; the last step shows `final` (a slip when it is not the true value)."""
    parts = [f"{e} = {v}" for e, v in steps[:-1]] + [f"{steps[-1][0]} = {final}"]
    return "; ".join(parts) + f". The answer is \\boxed{{{final}}}."


def terse(final: int) -> str:
    return f"The answer is \\boxed{{{final}}}."


def prompt_of(question: str) -> str:
    return f"What is {question}?\n"


def pool(level: int, split: str) -> list[tuple[int, ...]]:
    """The level's problems of one split, in a fixed pseudo-random order (so prefixes are unbiased)."""
    if split not in ("train", "test"):
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    ps = [p for p in problems(level) if split_of(level, p) == split]
    random.Random(f"ptlab-world-order:{level}:{split}").shuffle(ps)
    return ps


def example(level: int, operands: tuple[int, ...]) -> dict:
    """One row with every column any data set of the world uses."""
    question, steps, value = solve(level, operands)
    return {"prompt": prompt_of(question), "answer": str(value), "level": level, "role": LEVELS[level].role,
            "worked": worked(steps, value), "terse": terse(value)}


def examples(level: int, split: str, n: int, offset: int = 0) -> list[dict]:
    """`n` distinct problems of one level and split, starting at `offset` in the fixed order."""
    ps = pool(level, split)
    if not isinstance(n, int) or n < 0 or offset < 0 or offset + n > len(ps):
        raise ValueError(f"n: expected 0 <= offset + n <= {len(ps)} (the level-{level} {split} pool), "
                         f"got n={n!r}, offset={offset!r}")
    return [example(level, p) for p in ps[offset: offset + n]]


def pretraining_pairs(n: int, levels: dict[int, float], noisy: tuple[int, ...], correct_prob: float,
                      terse_prob: float = 0.0, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (prompt, completion) pairs from TRAIN problems, levels drawn by weight; on `noisy` levels the
    final value is right with probability `correct_prob`, else off by one of SLIPS; a completion is terse
    with probability `terse_prob`, else worked (so the base writes both styles, as the SFT / preference
    conflict needs: both have non-negligible probability under the reference model)."""
    rng = random.Random(f"ptlab-world-pretrain:{seed}")
    pools = {lv: pool(lv, "train") for lv in levels}
    out = []
    for lv in rng.choices(list(levels), weights=list(levels.values()), k=n):
        question, steps, value = solve(lv, rng.choice(pools[lv]))
        final = value if lv not in noisy or rng.random() < correct_prob else value + rng.choice(SLIPS)
        out.append((prompt_of(question), terse(final) if rng.random() < terse_prob else worked(steps, final)))
    return out


def parse_prompt(prompt: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(operators, operands) of a world prompt "What is 23 + 4 - 5?"; ValueError for any other text."""
    m = re.fullmatch(r"What is (\d+(?: [+-] \d+)+)\?\s*", prompt)
    if m is None:
        raise ValueError(f"prompt: expected a world question like 'What is 23 + 4?', got {prompt!r}")
    tokens = m.group(1).split(" ")
    return tuple(tokens[1::2]), tuple(int(x) for x in tokens[0::2])


def worked_of(prompt: str) -> str:
    """The worked solution of a world prompt (left to right, as `solve`)."""
    return worked(*_steps(*parse_prompt(prompt)))


# Task metrics of the XRIGHT miniature (rewards for `eval.sets[i].reward`): which of the two conflicting
# styles a completion takes, given that it is right. The SFT data teaches `terse`, the preference data
# prefers `worked`; a completion matches at most one of them.
def terse_reward(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """1.0 when the completion is exactly the terse answer (the SFT target), else 0.0."""
    return [float(c.strip() == terse(int(a))) for c, a in zip(completions, answer)]


def worked_reward(completions: list[str], prompts: list[str], **kwargs) -> list[float]:
    """1.0 when the completion is exactly the right worked solution (the preferred answer), else 0.0."""
    return [float(c.strip() == worked_of(p)) for c, p in zip(completions, prompts)]


def _cols(rows: list[dict], **spec) -> list[dict]:
    """Rename / select columns: spec maps output column -> input column."""
    return [{k: r[v] for k, v in spec.items()} for r in rows]


def write_world(out_dir: str | Path, n_train: int = 256, n_test: int = 64, n_probe: int = 16) -> dict[str, Path]:
    """Write the world's data sets into `out_dir`; returns {name: path}. Per level (all six unless noted):

    train (train problems)
      sft.jsonl         prompt, completion (worked), level              n_train per level
      rl.jsonl          prompt, answer, completion (worked demo), level  n_train per level (same problems)
      dpo.jsonl         prompt, chosen (worked), rejected (terse)        levels 1-4, n_train per level, prompts
                        disjoint from sft_terse.jsonl's
      sft_terse.jsonl   prompt, completion (terse)                       levels 1-4, n_train per level
    held out (test problems)
      test.jsonl        id, prompt, answer, level, role                  n_test per level
      probe.jsonl       id, prompt, answer, level, role                  the first n_probe of test.jsonl per level
      test_sft.jsonl    prompt, completion (worked): sft.jsonl's loss    n_test per level
      test_terse.jsonl  prompt, completion (terse): sft_terse's loss     levels 1-4, n_test per level
      test_pref.jsonl   prompt, chosen, rejected: dpo.jsonl's loss       levels 1-4, n_test per level
      test_style.jsonl  id, prompt, answer, level, role                  levels 1-4 of test.jsonl: the
                        prompts that the style task metrics (terse_reward, worked_reward) grade
    """
    out_dir = Path(out_dir)
    train = {lv: examples(lv, "train", n_train) for lv in LEVELS}
    # preference prompts come after the SFT prompts in the fixed order: disjoint by construction
    pref = {lv: examples(lv, "train", n_train, offset=n_train) for lv in (1, 2, 3, 4)}
    test = {lv: examples(lv, "test", n_test) for lv in LEVELS}
    tests = [dict(id=f"L{lv}-{i}", **r) for lv, rows in test.items() for i, r in enumerate(rows)]
    files = {
        "sft": _cols(_all(train), prompt="prompt", completion="worked", level="level"),
        "rl": _cols(_all(train), prompt="prompt", answer="answer", completion="worked", level="level"),
        "dpo": _cols(_all(pref), prompt="prompt", chosen="worked", rejected="terse"),
        "sft_terse": _cols(_all({lv: train[lv] for lv in (1, 2, 3, 4)}), prompt="prompt", completion="terse"),
        "test": _cols(tests, id="id", prompt="prompt", answer="answer", level="level", role="role"),
        "probe": _cols([r for r in tests if int(r["id"].split("-")[1]) < n_probe],
                       id="id", prompt="prompt", answer="answer", level="level", role="role"),
        "test_sft": _cols(_all(test), prompt="prompt", completion="worked"),
        "test_terse": _cols(_all({lv: test[lv] for lv in (1, 2, 3, 4)}), prompt="prompt", completion="terse"),
        "test_pref": _cols(_all({lv: test[lv] for lv in (1, 2, 3, 4)}), prompt="prompt", chosen="worked",
                           rejected="terse"),
        "test_style": _cols([r for r in tests if r["level"] <= 4], id="id", prompt="prompt", answer="answer",
                            level="level", role="role"),
    }
    return {name: write_jsonl(_interleave(rows), out_dir / f"{name}.jsonl") for name, rows in files.items()}


def _all(by_level: dict[int, list[dict]]) -> list[dict]:
    return [r for rows in by_level.values() for r in rows]


def _interleave(rows: list[dict]) -> list[dict]:
    """A fixed shuffle, so a file's prefix (data.limit) mixes levels."""
    rows = list(rows)
    random.Random("ptlab-world-file").shuffle(rows)
    return rows


def build(root: str | Path, ladder: bool = False) -> dict[str, Path]:
    """The whole world under `root`: data sets in root/data, the pretrained base model in root/base (a copy
    of the cached build, `toy.pretrain.pretrained_base`, built on first use). With `ladder`, measure and
    print each level's rung on the base."""
    import shutil
    import time

    from toy.pretrain import ladder as measure
    from toy.pretrain import pretrained_base

    root = Path(root)
    paths = write_world(root / "data")
    t = time.perf_counter()
    cached = pretrained_base()
    base = root / "base"
    if not (base / "ptlab_recipe.json").exists() or \
            (base / "ptlab_recipe.json").read_text() != (cached / "ptlab_recipe.json").read_text():
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(cached, base)
    print(f"[toy.world] data in {root / 'data'}; base model in {base} ({time.perf_counter() - t:.0f} s)")
    if ladder:
        for lv, m in measure(base).items():
            print(f"level {lv} ({LEVELS[lv].role}): " + ", ".join(f"{k} {v:.3f}" for k, v in m.items()))
    return {**paths, "base": base}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="write the miniature world's data sets and its base model")
    ap.add_argument("--out", type=Path, default=Path("runs/tiny"), help="root folder (default runs/tiny)")
    ap.add_argument("--ladder", action="store_true", help="also measure the ladder on the base (about a minute)")
    a = ap.parse_args()
    build(a.out, ladder=a.ladder)
