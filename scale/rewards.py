"""Verifiable rewards: the last boxed answer graded with math-verify, exact match, or user functions.

A reward is "math", "exact" or "module:function"; a run may combine several with weights
(`method.rl.reward: [math, my_rewards:format]`, `method.rl.reward_weights: [1.0, 0.2]`). Reward functions
follow TRL's convention (GRPOTrainer's `reward_funcs`): each is called with keywords only,

    f(prompts=[...], completions=[...], completion_ids=[...], trainer_state=..., answer=[...], <column>=[...])
        -> list[float | None]

`prompts` are the prompt texts as the model saw them (after `data.prompt_template` or the chat template),
`completions` the decoded completions, `completion_ids` their token ids (None where the caller has none),
`trainer_state` has `global_step` and `max_steps` (None outside training); every other column of the data
example arrives under its own name, one value per completion (`answer` as text, `level`, `id`, ...). A
function names the keywords it uses and takes `**kwargs` for the rest. None for an item means "not
applicable": the total of a completion is the weighted sum of the values that are not None (TRL's nansum
over functions); a completion for which every function gives None is an error (RL needs a number; TRL
instead leaves it out of the group baseline). ptlab's earlier convention still works:

    f(completions, answers, **kw) -> list[float]

a function with two positional parameters whose second is named `answers`, or whose parameters name none of
prompts / completions / completion_ids (`lambda c, a: ...`), gets completions and answers positionally and
the other keywords that its signature accepts.

`load_rewards(specs, weights)` returns a `Rewards`; it checks each function's signature against the keywords
it will get, and `Rewards.check(columns)` again once the data's columns are known, so a wrong signature fails
before any model loads. A function that raises, returns the wrong number of values, a value that is not a
number, or NaN raises `RewardError` naming the function and the completion to blame.
"""

from __future__ import annotations

import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable, Collection, Sequence

RewardFn = Callable[..., list[float]]
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
CALL_KEYS = ("prompts", "completions", "completion_ids", "trainer_state")   # TRL's keywords besides the columns


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


def _batched(one: Callable[[str, str], float], name: str) -> RewardFn:
    def reward_fn(completions: list[str], answer: list[str], **kwargs) -> list[float]:
        return [one(c, a) for c, a in zip(completions, answer)]

    reward_fn.__name__ = name
    reward_fn.__doc__ = f"{one.__name__} per completion, TRL's convention: (completions=, answer=, **kwargs)."
    return reward_fn


BUILTIN = {"math": _batched(math_reward, "math"), "exact": _batched(exact_match_reward, "exact")}


class RewardError(ValueError):
    """A reward function failed or returned something that is not a finite number (or None); `index` is the
    completion to blame (its position in the batch), None when no single one is."""

    def __init__(self, message: str, index: int | None = None):
        super().__init__(message)
        self.index = index


class RewardFunction:
    """One user or built-in function with its calling convention (TRL's keywords or ptlab's pair)."""

    def __init__(self, fn: Callable, name: str, short: str):
        self.fn, self.name, self.short = fn, name, short
        try:
            self.sig: inspect.Signature | None = inspect.signature(fn)
        except (TypeError, ValueError):  # some C callables have none: called TRL-style, unchecked
            self.sig = None
        self.pair = self.sig is not None and _pair_convention(self.sig)

    def _args(self, kw: dict) -> tuple[tuple, dict]:
        """The positional and keyword arguments of a call, from TRL's keywords `kw`."""
        if not self.pair:
            return (), kw
        first_two = [p.name for p in self.sig.parameters.values()][:2]
        rest = {k: v for k, v in kw.items() if k not in ("completions", "answer", *first_two) and self._accepts(k)}
        return (kw["completions"], kw.get("answer")), rest

    def _accepts(self, name: str) -> bool:
        p = self.sig.parameters
        return any(q.kind is q.VAR_KEYWORD for q in p.values()) or \
            (name in p and p[name].kind in (p[name].POSITIONAL_OR_KEYWORD, p[name].KEYWORD_ONLY))

    def problem(self, columns: Collection[str] | None) -> str | None:
        """Why the function cannot be called with the keywords a call passes (the data's `columns`; None: not
        known yet, so a required parameter may still be one), or None when it can."""
        if self.sig is None:
            return None
        dummy = dict.fromkeys((*CALL_KEYS, "answer", *(columns or ())))
        if columns is None:
            for p in self.sig.parameters.values():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty:
                    dummy.setdefault(p.name)
        args, kwargs = self._args(dummy)
        try:
            self.sig.bind(*args, **kwargs)
        except TypeError as e:
            passed = ", ".join(f"{k}=" for k in dummy if k in (*CALL_KEYS, "answer", *(columns or ())))
            how = "ptlab's f(completions, answers, **kw)" if self.pair else \
                f"TRL's keywords f({passed}) (name those you use, add **kwargs for the rest)"
            return f"{e}; it is called with {how}"
        return None

    def __call__(self, kw: dict) -> list[float | None]:
        """Its values on a batch, checked: a float or None per completion."""
        n = len(kw["completions"])
        args, kwargs = self._args(kw)
        try:
            out = self.fn(*args, **kwargs)
        except Exception as e:  # the user's code: name it and the completion it fails on
            i = self._culprit(kw)
            raise RewardError(f"reward {self.name!r}: raised {type(e).__name__}: {e}{_where(kw, i)}", i) from e
        if out is None or isinstance(out, (str, bytes)) or not hasattr(out, "__iter__"):
            raise RewardError(f"reward {self.name!r}: returned {out!r:.60}; expected a list of one number (or "
                              "None) per completion")
        out = list(out)
        if len(out) != n:
            raise RewardError(f"reward {self.name!r}: returned {len(out)} values for {n} completions")
        return [self._value(x, i, kw) for i, x in enumerate(out)]

    def _value(self, x, i: int, kw: dict) -> float | None:
        if x is None:
            return None
        v = None
        if not isinstance(x, (str, bytes)):
            try:
                v = float(x)
            except (TypeError, ValueError):
                pass
        if v is None or not math.isfinite(v):
            raise RewardError(f"reward {self.name!r}: value {i} is {x!r:.40}, expected a finite number (or None: "
                              f"not applicable){_where(kw, i)}", i)
        return v

    def _culprit(self, kw: dict, limit: int = 256) -> int | None:
        """The first completion the function fails on alone (called one by one: only after a batch failed)."""
        for i in range(min(len(kw["completions"]), limit)):
            args, kwargs = self._args({k: v[i:i + 1] if isinstance(v, list) else v for k, v in kw.items()})
            try:
                self.fn(*args, **kwargs)
            except Exception:
                return i
        return None


def _pair_convention(sig: inspect.Signature) -> bool:
    """ptlab's f(completions, answers, ...): two positional parameters, the second named `answers` or none of
    them named like TRL's keywords."""
    params = list(sig.parameters.values())
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) < 2:
        return False
    return positional[1].name == "answers" or not {p.name for p in params} & {"prompts", "completions",
                                                                             "completion_ids"}


def _where(kw: dict, i: int | None) -> str:
    if i is None:
        return ""
    answer = kw.get("answer")
    tail = f", answer {answer[i]!r:.40}" if isinstance(answer, list) and i < len(answer) else ""
    return f" (completion {i}: {kw['completions'][i]!r:.60}{tail})"


class Rewards:
    """Several reward functions with weights, called as one: `rewards(completions, answers, prompts=...,
    completion_ids=..., columns=..., trainer_state=...)` -> the weighted total per completion; `score` also
    gives each function's values. `key` (a config key) prefixes its errors."""

    def __init__(self, funcs: list[RewardFunction], weights: list[float], key: str | None = None):
        self.funcs, self.weights, self.key = funcs, weights, key
        names: list[str] = []
        for f in funcs:  # metric names: the function's, numbered when two functions share one
            names.append(f.short if f.short not in names else f"{f.short}_{len(names)}")
        self.names = names

    def _prefix(self) -> str:
        return f"{self.key}: " if self.key else ""

    def check(self, columns: Collection[str] | None = None) -> None:
        """ValueError (naming the key and the function) unless every function can be called with the keywords
        a call passes, the data's `columns` included (None: not known yet)."""
        for f in self.funcs:
            why = f.problem(columns)
            if why is not None:
                raise ValueError(f"{self._prefix()}reward {f.name!r} cannot be called: {why}")

    def score(self, completions: Sequence[str], answers: Sequence | None = None, *, prompts: Sequence | None = None,
              completion_ids: Sequence | None = None, columns: dict[str, Sequence] | None = None,
              trainer_state=None) -> tuple[list[float], dict[str, list[float | None]]]:
        """(weighted total per completion, {function name: its values}). `columns` are the data's other columns,
        one value per completion (`answers` is the `answer` column)."""
        n = len(completions)
        cols = dict(columns or {})
        if answers is not None:
            cols["answer"] = answers
        kw = {"prompts": [""] * n if prompts is None else prompts, "completions": completions,
              "completion_ids": [None] * n if completion_ids is None else completion_ids,
              "trainer_state": trainer_state}
        for k, v in cols.items():
            if k in kw:
                raise ValueError(f"columns: {k!r} is one of the call's own keywords {CALL_KEYS}")
            kw[k] = v
        for k in ("prompts", "completion_ids", *cols):
            if len(kw[k]) != n:
                raise ValueError(f"completions and {k}: expected equal lengths, got {n} and {len(kw[k])}")
        kw = {k: list(v) if k != "trainer_state" else v for k, v in kw.items()}
        parts: dict[str, list[float | None]] = {}
        for name, f in zip(self.names, self.funcs):
            try:
                parts[name] = f(kw)
            except RewardError as e:
                raise RewardError(f"{self._prefix()}{e}", e.index) from e
        totals = []
        for i in range(n):
            vals = [(w, p[i]) for w, p in zip(self.weights, parts.values()) if p[i] is not None]
            if not vals:
                who = f"reward {self.funcs[0].name!r}" if len(self.funcs) == 1 else \
                    f"every reward ({', '.join(f.name for f in self.funcs)})"
                raise RewardError(f"{self._prefix()}{who} returned None (not applicable) for completion {i}; "
                                  f"training needs a number{_where(kw, i)}", i)
            totals.append(sum(w * v for w, v in vals))
        return totals, parts

    def __call__(self, completions, answers=None, **kw) -> list[float]:
        return self.score(completions, answers, **kw)[0]

    @property
    def __name__(self) -> str:  # what results files record as the reward
        return "+".join(self.names)


def _load_one(spec, prefix: str) -> RewardFunction:
    if callable(spec):
        name = getattr(spec, "__name__", repr(spec))
        return RewardFunction(spec, name, name)
    if isinstance(spec, str) and spec in BUILTIN:
        return RewardFunction(BUILTIN[spec], spec, spec)
    if isinstance(spec, str) and spec.count(":") == 1 and all(spec.split(":")):
        mod_name, fn_name = spec.split(":")
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"{prefix}reward {spec!r}: cannot import module {mod_name!r} ({e})") from e
        fn = getattr(module, fn_name, None)
        if not callable(fn):
            raise ValueError(f"{prefix}reward {spec!r}: module {mod_name!r} has no function {fn_name!r}")
        return RewardFunction(fn, spec, fn_name)
    raise ValueError(f"{prefix}reward: expected 'math', 'exact' or 'module:function', got {spec!r}")


def load_rewards(spec, weights: Sequence[float] | None = None, key: str | None = None,
                 weights_key: str | None = None) -> Rewards:
    """`Rewards` from a spec ("math", "exact", "module:function" or a callable) or a list of them, with
    `weights` (None or empty: all 1; one per function otherwise). Each function's signature is checked against
    the keywords it will get; errors name `key` (and `weights_key`), e.g. method.rl.reward."""
    if isinstance(spec, Rewards):
        return spec
    prefix = f"{key}: " if key else ""
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not specs:
        raise ValueError(f"{prefix}expected a reward or a list of rewards, got an empty list")
    funcs = [_load_one(s, prefix) for s in specs]
    wkey = weights_key or (f"{key}_weights" if key else "reward_weights")
    weights = list(weights) if weights else [1.0] * len(funcs)
    if len(weights) != len(funcs):
        raise ValueError(f"{wkey}: expected {len(funcs)} weight(s), one per reward{f' of {key}' if key else ''}, "
                         f"got {len(weights)}")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"{wkey}[{i}]: expected a finite number, got {w!r}")
    out = Rewards(funcs, [float(w) for w in weights], key)
    out.check(None)
    return out


def load_reward(spec) -> Rewards:
    """One reward ("math", "exact", "module:function" or a callable) as a batched function
    `reward(completions, answers, prompts=, completion_ids=, columns=, trainer_state=) -> list[float]`."""
    return load_rewards(spec)
