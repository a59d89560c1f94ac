"""LUFFY and SRFT: the prompt's demonstration joins its group as one of the n samples (`demo` rows, the
preset's `is_demo` branch: LUFFY's policy shaping, SRFT's demonstration weighting)."""

from __future__ import annotations

from scale.methods import register
from scale.methods.rl import RL


@register("luffy")
class LUFFY(RL):
    data = "demo"
    with_demo = True

    def preset(self) -> str:
        return self.name


@register("srft")
class SRFT(LUFFY):
    pass
