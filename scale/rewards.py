"""Verifiable rewards: the last boxed answer graded with math-verify, exact match, or a user function.

Every reward function has one batched signature,

    reward_fn(completions: list[str], answers: list[str], **kw) -> list[float]

`load_reward(spec)` returns one from a spec string: "math", "exact", or "module:function" naming a user
function with that signature (extra dataset columns may arrive as keyword arguments, as in TRL).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable

RewardFn = Callable[..., list[float]]
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """Contents of the last complete `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces kept.

    An unclosed last box is skipped in favour of the previous complete one; no box gives None.
    """
    if not isinstance(text, str):
        raise ValueError(f"text: expected a str, got {type(text).__name__}")
    found = None
    for m in _BOXED.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[m.end(): i - 1]
    return found


def _normalise(s: str) -> str:
    """What exact match compares: whitespace removed, a trailing period dropped, `$` stripped."""
    return re.sub(r"\s+", "", s).strip("$").rstrip(".")


def exact_match_reward(completion: str, answer: str) -> float:
    """1.0 if the last boxed answer (or the whole completion when nothing is boxed) equals `answer`
    after whitespace normalisation, else 0.0."""
    boxed = extract_boxed(completion)
    got = boxed if boxed is not None else completion
    return float(_normalise(got) == _normalise(str(answer)))


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the last boxed answer of `completion` is mathematically equal to `answer` (math-verify:
    1/2 == 0.5 == \\frac{1}{2}), else 0.0. No boxed answer scores 0. When math-verify cannot parse
    either side, the grade falls back to exact string match of the normalised strings."""
    boxed = extract_boxed(completion)
    if boxed is None:
        return 0.0
    answer = str(answer)
    inner = extract_boxed(answer)  # a gold answer given as "\boxed{..}" is accepted too
    answer = inner if inner is not None else answer
    try:
        from math_verify import parse, verify

        gold, pred = parse(f"${answer}$"), parse(f"${boxed}$")
        if gold and pred:
            return float(verify(gold, pred))
    except Exception:  # math-verify raises on exotic input or timeouts; grade by string below
        pass
    return float(_normalise(boxed) == _normalise(answer))


def _batched(one: Callable[[str, str], float]) -> RewardFn:
    def reward_fn(completions: list[str], answers: list[str], **kw) -> list[float]:
        _check_lengths(completions, answers)
        return [one(c, a) for c, a in zip(completions, answers)]

    reward_fn.__name__ = one.__name__
    reward_fn.__doc__ = f"Batched {one.__name__}: list of completions and answers -> list of floats."
    return reward_fn


def _check_lengths(completions, answers) -> None:
    if len(completions) != len(answers):
        raise ValueError(f"completions and answers: expected equal lengths, got {len(completions)} and {len(answers)}")


BUILTIN = {"math": _batched(math_reward), "exact": _batched(exact_match_reward)}


def load_reward(spec: str | Callable) -> RewardFn:
    """A batched reward function from "math", "exact", "module:function" or a callable.

    A user function must take (completions, answers, **kw) and return one number per completion;
    the returned wrapper checks that and converts to floats. An exception inside it, a return that is not a
    list, or a value that is not a finite number raises `RewardError` naming the function and the completion.
    """
    if callable(spec):
        fn = spec
    elif isinstance(spec, str) and spec in BUILTIN:
        return BUILTIN[spec]
    elif isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":")):
        mod_name, fn_name = spec.split(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"reward {spec!r}: cannot import module {mod_name!r} ({e})") from e
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"reward {spec!r}: module {mod_name!r} has no function {fn_name!r}")
    else:
        raise ValueError(f"reward: expected 'math', 'exact' or 'module:function', got {spec!r}")

    name = spec if isinstance(spec, str) else getattr(fn, "__name__", repr(fn))

    def user_reward(completions: list[str], answers: list[str], **kw) -> list[float]:
        _check_lengths(completions, answers)
        try:
            out = fn(completions, answers, **kw)
        except Exception as e:  # the user's code: name it and the completion it failed on
            i = None if kw else _culprit(fn, completions, answers)
            raise RewardError(f"reward {name!r}: raised {type(e).__name__}: {e}{_where(completions, answers, i)}",
                              i) from e
        if out is None or isinstance(out, (str, bytes)) or not hasattr(out, "__iter__"):
            raise RewardError(f"reward {name!r}: returned {out!r:.60}; expected a list of one number per completion")
        out = list(out)
        if len(out) != len(completions):
            raise ValueError(f"reward {name!r}: returned {len(out)} values for {len(completions)} completions")
        return [_value(name, x, i, completions, answers) for i, x in enumerate(out)]

    user_reward.__name__ = getattr(fn, "__name__", "user_reward")
    return user_reward


class RewardError(ValueError):
    """A reward function failed or returned something that is not a finite number; `index` is the completion
    to blame (its position in the batch), None when no single one is."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


def _value(name: str, x, i: int, completions, answers) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        v = None
    if v is None or not math.isfinite(v):
        raise RewardError(f"reward {name!r}: value {i} is {x!r:.40}, expected a finite number"
                          f"{_where(completions, answers, i)}", i)
    return v


def _culprit(fn, completions, answers, limit: int = 256) -> int | None:
    """The first completion the function fails on alone (called one by one: only after a batch failed)."""
    for i, (c, a) in enumerate(zip(completions[:limit], answers[:limit])):
        try:
            fn([c], [a])
        except Exception:
            return i
    return None


def _where(completions, answers, i: int | None) -> str:
    if i is None:
        return ""
    return f" (completion {i}: {completions[i]!r:.60}, answer {answers[i]!r:.40})"
