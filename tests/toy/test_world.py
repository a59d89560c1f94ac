"""toy.world: the ladder's problems are computed right, train and test are disjoint by construction (in the
pools and in every written file), the SFT-terse and preference prompts are disjoint, and the pretraining
mixture shows only train problems with the stated noise."""

import json
import random

import pytest

from toy.world import (
    LEVELS,
    ROLES,
    SLIPS,
    example,
    examples,
    pool,
    pretraining_pairs,
    problems,
    solve,
    split_of,
    write_world,
)


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_solutions_are_right_and_splits_partition(level):
    ps = problems(level)
    train, test = pool(level, "train"), pool(level, "test")
    assert not set(train) & set(test) and sorted(train + test) == sorted(ps)
    assert 0.2 < len(test) / len(ps) < 0.3                     # one in four, by hash
    for ops in random.Random(level).sample(ps, 50):
        question, steps, value = solve(level, ops)
        assert eval(question) == value == steps[-1][1]         # the expression is Python arithmetic
        ex = example(level, ops)
        assert ex["worked"].endswith(f"\\boxed{{{value}}}.") and ex["terse"] == f"The answer is \\boxed{{{value}}}."
        assert split_of(level, ops) == ("test" if ops in set(test) else "train")


def test_roles_and_bad_input():
    assert ROLES == {"easy": (1, 2), "middle": (3, 4), "hard": (5, 6)}
    with pytest.raises(ValueError, match="level"):
        problems(7)
    with pytest.raises(ValueError, match="split"):
        pool(1, "dev")
    with pytest.raises(ValueError, match="n: expected"):
        examples(1, "test", 10_000)


def test_written_files_are_disjoint_from_the_held_out_problems(tmp_path):
    paths = write_world(tmp_path, n_train=40, n_test=12, n_probe=4)
    rows = {name: _read(p) for name, p in paths.items()}
    held = {r["prompt"] for name in ("test", "probe", "test_sft", "test_terse", "test_pref") for r in rows[name]}
    for name in ("sft", "rl", "dpo", "sft_terse"):
        assert not {r["prompt"] for r in rows[name]} & held, name
    assert not {r["prompt"] for r in rows["sft_terse"]} & {r["prompt"] for r in rows["dpo"]}
    assert len(rows["test"]) == 12 * len(LEVELS) and len(rows["probe"]) == 4 * len(LEVELS)
    assert {r["id"] for r in rows["probe"]} <= {r["id"] for r in rows["test"]}
    assert all(r["chosen"] != r["rejected"] and r["rejected"].startswith("The answer is") for r in rows["dpo"])
    assert write_world(tmp_path / "again", n_train=40, n_test=12, n_probe=4)["rl"].read_text() == \
        paths["rl"].read_text()                                  # deterministic


def test_pretraining_mixture_uses_train_problems_with_the_stated_noise():
    pairs = pretraining_pairs(4000, {1: 0.5, 3: 0.5}, noisy=(3,), correct_prob=0.35, seed=0)
    test_prompts = {example(lv, p)["prompt"] for lv in (1, 3) for p in pool(lv, "test")}
    assert not {p for p, _ in pairs} & test_prompts
    right = {1: [], 3: []}
    for prompt, completion in pairs:
        expr = prompt[len("What is "):-2]
        lv = 3 if all(int(x) >= 10 for x in expr.split(" + ")) and int(expr.split(" + ")[1]) >= 10 else 1
        value = int(completion.split("boxed{")[1].rstrip("}."))
        right[lv].append(value == eval(expr))
        assert value - eval(expr) in (0,) + SLIPS
    assert all(right[1])                                         # clean level: always right
    frac = sum(right[3]) / len(right[3])                         # ~2000 draws: sd 0.011, tolerance 4 sd
    assert abs(frac - 0.35) < 0.045


def test_style_rewards_grade_each_style_exactly_and_never_both():
    from toy.world import parse_prompt, terse_reward, worked_of, worked_reward

    for lv in LEVELS:
        for p in pool(lv, "test")[:20]:
            r = example(lv, p)
            assert worked_of(r["prompt"]) == r["worked"]          # independent of the level: parsed from the text
            comps = [r["terse"], r["worked"], r["worked"].replace(r["answer"] + ".", str(int(r["answer"]) + 1) + "."),
                     " " + r["terse"] + "\n"]
            t = terse_reward(comps, answer=[r["answer"]] * 4)
            w = worked_reward(comps, prompts=[r["prompt"]] * 4)
            assert t == [1.0, 0.0, 0.0, 1.0] and w == [0.0, 1.0, 0.0, 0.0]
    assert parse_prompt("What is 23 + 4 - 5?\n") == (("+", "-"), (23, 4, 5))
    with pytest.raises(ValueError, match="prompt"):
        worked_of("Compute 2 + 2")
