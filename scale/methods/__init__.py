"""The trainer's methods: each one a `Method` in its own module, found by name in one registry.

A method says what it needs (the kind of its data, a preference set, rollouts, a reference model, its
loss terms and schedule) and how it builds one step's rows; the trainer (`scale.train`) asks it instead
of testing its name. Built-in methods register themselves with `@register("name")` in the modules of
this package; `method.name: my_package.my_module:MyMethod` in a config loads a user's own `Method`
subclass, the way `method.rl.reward: module:function` loads a reward. README, "Add a method", has a
complete example (`experiments/examples/reinforce_with_demos.py`).

What a method may use of the trainer it is given (`tr`): `tr.cfg`, `tr.data` / `tr.pref` (tokenised
examples), `tr.local_indices(step, n, size)`, `tr.generate(prompts, n)`, `tr.rewards(texts, answers,
examples, when, completion_ids=None, parts=None)`, `tr.reference` (`scale.reference.Reference`), `tr.terms`,
`tr.schedule`, `tr.update(rows, extra_norms)`, `tr.fill_old_logps(rows)`, `tr.acc` (accelerate), `tr.opt`,
`tr.P` (processes); `scale.methods.rl.rollout_rows` samples, grades and sets the advantages of a batch.
"""

from __future__ import annotations

import importlib

from scale.loss import Row, Terms

BUILTIN_MODULES = ("sft", "dpo", "joint", "rl", "hpt", "luffy")   # modules of this package that register
_REGISTRY: dict[str, type[Method]] = {}


class Method:
    """One post-training method. Subclass, set the class attributes that differ, override `rows` (and
    what else differs), then `@register("name")` it. An instance is made per run with the config."""

    data = "sft"          # kind of data.path (`scale.data.DATA_KINDS`): sft | dpo | rl | demo
    pref_data = False     # also a preference set: data.pref_path (or data.path), kind dpo -> `tr.pref`
    rollouts = False      # samples completions in training: a reward, prompt + max_new_tokens in the context

    def __init__(self, cfg):
        self.cfg = cfg

    @classmethod
    def check(cls, cfg) -> None:
        """Checks of the method's own config keys across sections (ValueError naming the key)."""

    @property
    def uses_pairs(self) -> bool:
        """Trains on preference pairs (`tr.pref`), so `method.dpo.precompute_ref` applies."""
        return self.data == "dpo" or self.pref_data

    def needs_reference(self) -> bool:
        return False

    def terms(self, tr) -> Terms:
        """The loss terms (`scale.loss.Terms`) the rows enter."""
        raise NotImplementedError

    def schedule(self):
        """A stateful schedule (theory.schedules), checkpointed with the run, or None."""
        return None

    def rows(self, tr, step: int, info: dict) -> list[Row]:
        """This process's rows of the global batch at `step`; step statistics go into `info` (logged)."""
        raise NotImplementedError

    def update(self, tr, rows: list[Row], info: dict) -> dict:
        """The optimizer step(s) on the rows; returns the update's global statistics."""
        return tr.update(rows)

    def updates_per_step(self) -> int:
        """Optimizer (and learning-rate schedule) steps per training step."""
        return 1

    @property
    def logprob_temperature(self) -> float:
        """Temperature of the reference log-probs (the sampling temperature for on-policy methods)."""
        return self.cfg.generation.temperature if self.rollouts else 1.0


def register(name: str):
    """Class decorator: make a `Method` subclass available as `method.name: <name>`."""
    def deco(cls: type[Method]) -> type[Method]:
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register({name!r}): expected a Method subclass, got {cls!r}")
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"register({name!r}): a different method already has this name")
        _REGISTRY[name] = cls
        cls.name = name
        return cls
    return deco


def _load_builtins() -> None:
    for mod in BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{mod}")


def method_names() -> list[str]:
    """The registered methods' names, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def get_method(name: str, key: str = "method.name") -> type[Method]:
    """The Method class of a registered name, or of `module:Class` (a user's own); errors name `key`."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" not in name:
        raise ValueError(f"{key}: unknown value {name!r}; valid: {list(_REGISTRY)} or module:Class")
    mod_name, _, attr = name.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{key}: cannot load {name!r} ({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise ValueError(f"{key}: {name!r} is not a subclass of scale.methods.Method")
    return cls
