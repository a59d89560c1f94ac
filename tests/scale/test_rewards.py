"""scale.rewards: boxed extraction edge cases, math equivalence through math-verify, exact match,
loading user reward functions by "module:function"; TRL's calling convention (prompts, completions,
completion_ids, the data's columns) next to ptlab's (completions, answers), several functions with weights,
None as "not applicable", signatures checked before the model loads, failures naming function and example."""

import math
import sys

import pytest

from scale.rewards import (
    BUILTIN,
    RewardError,
    exact_match_reward,
    extract_boxed,
    load_reward,
    load_rewards,
    math_reward,
)


@pytest.mark.parametrize("text, want", [
    ("The answer is \\boxed{7}.", "7"),
    ("\\boxed{1} then \\boxed{2}", "2"),                      # the last box wins
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),                 # nested braces kept
    ("\\boxed{{a}{b{c}}}", "{a}{b{c}}"),
    ("\\boxed {42}", "42"),                                    # space before the brace
    ("\\fbox{5}", "5"),
    ("\\boxed{3} and an unclosed \\boxed{4", "3"),             # an unclosed last box is skipped
    ("no box here", None),
    ("\\boxed{}", ""),
    ("", None),
])
def test_extract_boxed(text, want):
    assert extract_boxed(text) == want


def test_extract_boxed_rejects_non_str():
    with pytest.raises(ValueError, match="text"):
        extract_boxed(3)


@pytest.mark.parametrize("completion, answer, want", [
    ("so \\boxed{0.5}", "1/2", 1.0),
    ("so \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("so \\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("so \\boxed{2/4}", "\\boxed{0.5}", 1.0),                 # a boxed gold answer is unwrapped
    ("\\boxed{7}", "7", 1.0),
    ("\\boxed{ 7 }", "7", 1.0),
    ("\\boxed{8}", "7", 0.0),
    ("the answer is 7", "7", 0.0),                           # nothing boxed: no credit
    ("\\boxed{7} ... wait \\boxed{8}", "7", 0.0),             # graded on the last box
    ("\\boxed{-79}", "-79", 1.0),
    ("\\boxed{\\sqrt{4}}", "2", 1.0),
])
def test_math_reward(completion, answer, want):
    assert math_reward(completion, answer) == want


@pytest.mark.parametrize("failure", ["empty", "raises"])
def test_math_reward_falls_back_to_exact_match(monkeypatch, failure):
    import math_verify

    def broken_parse(*a, **k):
        if failure == "raises":
            raise RuntimeError("cannot parse")
        return []

    monkeypatch.setattr(math_verify, "parse", broken_parse)
    assert math_reward("\\boxed{ 1/2 }", "1/2") == 1.0       # graded by normalised string equality
    assert math_reward("\\boxed{0.5}", "1/2") == 0.0         # no math equivalence without math-verify


def test_exact_match():
    assert exact_match_reward("\\boxed{1/2}", "1/2") == 1.0
    assert exact_match_reward("\\boxed{0.5}", "1/2") == 0.0
    assert exact_match_reward(" 12 ", "12") == 1.0             # no box: the whole completion


def test_load_builtin_batched():
    math = load_reward("math")
    assert math(["\\boxed{0.5}", "\\boxed{3}", "x"], ["1/2", "4", "x"]) == [1.0, 0.0, 0.0]
    assert load_reward("exact")(["\\boxed{0.5}"], ["1/2"]) == [0.0]
    with pytest.raises(ValueError, match="equal lengths"):
        math(["a"], ["a", "b"])


def test_load_user_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(
        "def length(completions, answers, **kw):\n"
        "    return [len(c) + b for c, b in zip(completions, kw.get('bonus', [0] * len(completions)))]\n"
        "def wrong_len(completions, answers, **kw):\n"
        "    return [1]\n"
        "value = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("my_rewards_mod:length")
    out = fn(["ab", "abcd"], ["", ""], columns={"bonus": [1, 2]})   # a data column arrives as a keyword
    assert out == [3.0, 6.0] and all(isinstance(x, float) for x in out)
    with pytest.raises(ValueError, match="returned 1 values for 2"):
        load_reward("my_rewards_mod:wrong_len")(["a", "b"], ["", ""])
    with pytest.raises(ValueError, match="has no function 'value'"):
        load_reward("my_rewards_mod:value")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        load_reward("my_rewards_mod:nope")
    sys.modules.pop("my_rewards_mod", None)


@pytest.mark.parametrize("spec", ["mathh", "", "a:b:c", ":f", "m:", None, 3])
def test_bad_spec(spec):
    with pytest.raises(ValueError, match="reward"):
        load_reward(spec)


def test_missing_module():
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:f")


def test_callable_passthrough():
    assert load_reward(lambda c, a, **kw: [1] * len(c))(["x", "y"], ["", ""]) == [1.0, 1.0]


# ------------------------------------------------------------------------------ TRL's convention, several functions
def _trl_kwargs(n=2):
    return {"prompts": [f"Q{i}" for i in range(n)], "completion_ids": [[i, i + 1] for i in range(n)],
            "columns": {"level": [i + 1 for i in range(n)]}, "trainer_state": "state"}


def test_trl_function_gets_prompts_completions_ids_and_columns():
    seen = {}

    def trl_style(prompts, completions, completion_ids, answer, level, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                    level=level, kwargs=kwargs)
        return [float(x) for x in level]

    out = load_rewards(trl_style)(["a", "b"], ["7", "8"], **_trl_kwargs())
    assert out == [1.0, 2.0]
    assert seen == {"prompts": ["Q0", "Q1"], "completions": ["a", "b"], "completion_ids": [[0, 1], [1, 2]],
                    "answer": ["7", "8"], "level": [1, 2], "kwargs": {"trainer_state": "state"}}


def test_old_convention_gets_completions_and_answers_positionally():
    got = []

    def old(completions, answers):          # no **kw: only the two lists
        got.append((completions, answers))
        return [1.0] * len(completions)

    def old_kw(completions, answers, **kw):  # with **kw: the other keywords too
        got.append(sorted(kw))
        return [0.0] * len(completions)

    def trl_answer(completions, answer, **kwargs):   # `answer` (TRL's column name): keywords
        got.append((completions, answer, sorted(kwargs)))
        return [2.0] * len(completions)

    rewards = load_rewards([old, old_kw, lambda c, a: [float(a[0] == "7")] * len(c), trl_answer])
    assert [f.pair for f in rewards.funcs] == [True, True, True, False]
    assert rewards(["a"], ["7"], **_trl_kwargs(1)) == [1.0 + 0.0 + 1.0 + 2.0]
    assert got == [(["a"], ["7"]), ["completion_ids", "level", "prompts", "trainer_state"],
                   (["a"], ["7"], ["completion_ids", "level", "prompts", "trainer_state"])]


def test_builtins_take_trl_keywords():
    for name, want in (("math", [1.0, 0.0]), ("exact", [0.0, 0.0])):
        out = BUILTIN[name](prompts=["p", "p"], completions=["\\boxed{0.5}", "\\boxed{3}"], completion_ids=[[1], [2]],
                            answer=["1/2", "4"], trainer_state=None, level=[1, 2])
        assert out == want, name


def test_weighted_sum_of_two_functions():
    def correct(completions, answer, **kwargs):
        return [float(c == a) for c, a in zip(completions, answer)]

    def short(completions, **kwargs):
        return [1.0 / len(c) for c in completions]

    comps, answers = ["7", "12", "x"], ["7", "1", "x"]
    total, parts = load_rewards([correct, short], [2.0, -0.5]).score(comps, answers)
    assert parts == {"correct": [1.0, 0.0, 1.0], "short": [1.0, 0.5, 1.0]}
    assert total == pytest.approx([2.0 - 0.5, 0.0 - 0.25, 2.0 - 0.5])
    assert load_rewards([correct, short]).score(comps, answers)[0] == pytest.approx([2.0, 0.5, 2.0])  # default 1s


def test_none_means_not_applicable():
    def only_even(completions, **kwargs):
        return [1.0 if len(c) % 2 == 0 else None for c in completions]

    def only_odd(completions, **kwargs):
        return [3.0 if len(c) % 2 else None for c in completions]

    assert load_rewards([only_even, only_odd], [1.0, 0.5])(["ab", "abc"], ["", ""]) == [1.0, 1.5]
    with pytest.raises(RewardError, match=r"reward 'only_even' returned None \(not applicable\) for completion 1"
                                          r".*completion 1: 'abc'") as e:
        load_rewards(only_even)(["ab", "abc"], ["", ""])
    assert e.value.index == 1
    with pytest.raises(RewardError, match=r"every reward \(only_even, only_even\) returned None.*completion 0") as e:
        load_rewards([only_even, only_even])(["a", "bb"], ["", ""])
    assert e.value.index == 0


@pytest.mark.parametrize("bad, index, fragment", [
    (lambda c, **kw: [1.0, math.nan, 1.0], 1, "value 1 is nan, expected a finite number"),
    (lambda c, **kw: [1.0, 1.0, math.inf], 2, "value 2 is inf"),
    (lambda c, **kw: [1.0, "0.5", 1.0], 1, "value 1 is '0.5'"),          # a string is not a number
    (lambda c, **kw: [1 / (x != "b") for x in c], 1, "raised ZeroDivisionError"),
    (lambda c, **kw: [1.0], None, "returned 1 values for 3 completions"),
])
def test_failure_names_the_function_and_the_completion(bad, index, fragment):
    def good(completions, **kwargs):
        return [0.0] * len(completions)

    def failing(completions, **kwargs):
        return bad(completions)

    with pytest.raises(RewardError) as e:
        load_rewards([good, failing], key="method.rl.reward")(["a", "b", "c"], ["1", "2", "3"])
    msg = str(e.value)
    assert msg.startswith("method.rl.reward: reward 'failing': ") and fragment in msg, msg
    assert e.value.index == index
    if index is not None:
        assert f"completion {index}: {'abc'[index]!r}, answer '{index + 1}'" in msg, msg


@pytest.mark.parametrize("fn, columns, fragment", [
    (lambda completions: [0.0], None, "unexpected keyword argument 'prompts'"),
    (lambda x, **kwargs: [0.0], None, "missing a required argument: 'x'"),      # a column, if the data has one...
    (lambda completions, difficulty, **kwargs: [0.0], ["level"], "missing a required argument: 'difficulty'"),
    (lambda c, a, b: [0.0], None, "missing a required argument: 'b'"),            # ptlab's pair, one more
])
def test_wrong_signature_fails_at_the_check(fn, columns, fragment):
    rewards = None
    try:
        rewards = load_rewards(fn, key="method.rl.reward")   # columns not known yet: a named one may come
    except ValueError as e:
        assert columns is None and fragment in str(e) and "method.rl.reward: reward '<lambda>'" in str(e), str(e)
    if rewards is not None:
        if columns is None:   # 'x' / 'b' are not columns of this data
            columns = ["level"]
        with pytest.raises(ValueError, match=f"method.rl.reward: reward '<lambda>' cannot be called: {fragment}"):
            rewards.check(columns)
    load_rewards(lambda completions, level, **kwargs: [0.0], key="k").check(["level"])   # the column exists


def test_weights_must_match_and_be_finite():
    with pytest.raises(ValueError, match=r"method.rl.reward_weights: expected 2 weight\(s\), one per reward of "
                                         r"method.rl.reward, got 3"):
        load_rewards(["math", "exact"], [1.0, 2.0, 3.0], key="method.rl.reward")
    with pytest.raises(ValueError, match=r"method.rl.reward_weights\[1\]: expected a finite number"):
        load_rewards(["math", "exact"], [1.0, math.nan], key="method.rl.reward")
    with pytest.raises(ValueError, match="method.rl.reward: expected a reward or a list"):
        load_rewards([], key="method.rl.reward")
    assert load_rewards(["math", "exact"], []).weights == [1.0, 1.0]


def test_metric_names_are_the_functions_and_unique():
    assert load_rewards(["math", "tests.scale.conftest:parity_reward", "math"]).names == \
        ["math", "parity_reward", "math_2"]


def test_config_takes_a_list_of_rewards_with_weights():
    from scale.config import load_config

    paths = ["model.path=m", "data.path=d", "run.output_dir=o"]
    cfg = load_config(None, [*paths, "method.rl.reward=[math, tests.scale.conftest:parity_reward]",
                             "method.rl.reward_weights=[1, 0.5]"])
    assert cfg.method.rl.reward == ["math", "tests.scale.conftest:parity_reward"]
    assert cfg.method.rl.reward_weights == [1.0, 0.5]
    assert load_config(None, [*paths, "method.rl.reward=exact"]).method.rl.reward == "exact"
    with pytest.raises(ValueError, match=r"method.rl.reward_weights\[0\]"):
        load_config(None, [*paths, "method.rl.reward_weights=[.inf]"])


# ------------------------------------------------------------------------------ in the trainer
CALLS: list[dict] = []


def recording_reward(prompts, completions, completion_ids, answer, level, trainer_state, **kwargs):
    """TRL-style: records what it gets; 1 for an even length."""
    CALLS.append({"prompts": list(prompts), "completions": list(completions), "answer": list(answer),
                  "completion_ids": [list(x) for x in completion_ids], "level": list(level),
                  "step": trainer_state.global_step, "kwargs": sorted(kwargs)})
    return [float(len(c) % 2 == 0) for c in completions]


def length_reward(completions, **kwargs):
    return [len(c) / 10 for c in completions]


def nan_on_level_4(completions, level, **kwargs):
    return [math.nan if lv == 4 else 0.0 for lv in level]


def raise_on_level_3(completions, level, **kwargs):
    if 3 in level:
        raise KeyError("level 3")
    return [0.0] * len(completions)


def needs_difficulty(completions, difficulty, **kwargs):
    return [0.0] * len(completions)


def _trainer_cfg(world, out, **extra):
    from scale.config import load_config
    from tests.scale.conftest import base_overrides

    return load_config(None, base_overrides(world, "rl", "general", out, **{"run.max_steps": 1, **extra}))


def test_trainer_calls_trl_rewards_with_prompts_ids_and_columns(world, tmp_path):
    from scale.train import Trainer
    from tests.scale.conftest import read_metrics

    CALLS.clear()
    me = "tests.scale.test_rewards"
    t = Trainer(_trainer_cfg(world, tmp_path / "run", **{
        "method.rl.reward": [f"{me}:recording_reward", f"{me}:length_reward"], "method.rl.reward_weights": [1.0, 0.5]}))
    trial = CALLS[0]   # before the model loaded: the first example, its answer boxed
    e0 = t.data[0]
    assert trial["completions"] == [f"\\boxed{{{e0['answer']}}}"] and trial["prompts"] == [e0["prompt"]]
    assert trial["level"] == [2] and trial["answer"] == ["123"] and trial["step"] == 0
    assert trial["completion_ids"] == [t.tok(trial["completions"][0], add_special_tokens=False)["input_ids"]]
    t.train()
    step = CALLS[1]
    n = 4 * 4   # batch_size prompts x generation.n
    assert len(step["completions"]) == n and step["step"] == 0
    level_of = {e["prompt"]: e["columns"]["level"] for e in t.data}
    answer_of = {e["prompt"]: e["answer"] for e in t.data}
    assert step["level"] == [level_of[p] for p in step["prompts"]] and set(step["prompts"]) <= set(level_of)
    assert step["answer"] == [answer_of[p] for p in step["prompts"]]
    assert t.tok.batch_decode(step["completion_ids"], skip_special_tokens=True) == step["completions"]
    assert step["kwargs"] == []   # general.jsonl's `completion` column is not passed (TRL's rule)
    parity = [float(len(c) % 2 == 0) for c in step["completions"]]
    length = [len(c) / 10 for c in step["completions"]]
    (m,) = read_metrics(tmp_path / "run")
    assert m["reward"] == pytest.approx(sum(p + 0.5 * x for p, x in zip(parity, length)) / n)
    assert m["rewards/recording_reward/mean"] == pytest.approx(sum(parity) / n)
    assert m["rewards/length_reward/mean"] == pytest.approx(sum(length) / n)


@pytest.mark.parametrize("fn, fragments", [
    ("nan_on_level_4", ["value 4 is nan", "example 1 of"]),               # examples 0, 1, 2, 3: levels 2, 4, 3, 2
    ("raise_on_level_3", ["raised KeyError: 'level 3'", "completion 8", "example 2 of"]),
])
def test_trainer_failure_names_function_and_example(world, tmp_path, fn, fragments):
    from scale.train import Trainer

    t = Trainer(_trainer_cfg(world, tmp_path / "run", **{"method.rl.reward": f"tests.scale.test_rewards:{fn}",
                                                         "data.shuffle": False}))
    with pytest.raises(ValueError) as e:
        t.train()
    msg = str(e.value)
    for f in (f"method.rl.reward: reward 'tests.scale.test_rewards:{fn}'", *fragments, "general.jsonl", "step 1"):
        assert f in msg, (f, msg)


@pytest.mark.parametrize("extra, fragment", [
    ({"method.rl.reward": "tests.scale.test_rewards:needs_difficulty"},
     "method.rl.reward: reward 'tests.scale.test_rewards:needs_difficulty' cannot be called: missing a required "
     "argument: 'difficulty'"),
    ({"method.rl.reward": "tests.scale.test_rewards:length_reward", "method.rl.reward_weights": [1.0, 2.0]},
     "method.rl.reward_weights: expected 1 weight(s)"),
    ({"method.rl.reward": ["math", "tests.scale.conftest:nope"]}, "has no function 'nope'"),
])
def test_trainer_wrong_reward_fails_before_the_model_loads(world, tmp_path, monkeypatch, extra, fragment):
    from scale import train

    monkeypatch.setattr(train.Trainer, "_load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError) as e:
        train.Trainer(_trainer_cfg(world, tmp_path / "run", **extra))
    assert fragment in str(e.value), str(e.value)
