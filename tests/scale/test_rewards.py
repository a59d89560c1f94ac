"""scale.rewards: boxed extraction edge cases, math equivalence through math-verify, exact match,
and loading user reward functions by "module:function"."""

import sys

import pytest

from scale.rewards import exact_match_reward, extract_boxed, load_reward, math_reward


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
        "    return [len(c) + kw.get('bonus', 0) for c in completions]\n"
        "def wrong_len(completions, answers, **kw):\n"
        "    return [1]\n"
        "value = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("my_rewards_mod:length")
    out = fn(["ab", "abcd"], ["", ""], bonus=1)
    assert out == [3.0, 5.0] and all(isinstance(x, float) for x in out)
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
