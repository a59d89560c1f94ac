"""Helpers shared by the figure-registry tests."""

from __future__ import annotations

from experiments.registry import FigureResult


def stub_build(name: str, log: list):
    """A figure build that writes one small file and records its name in `log` (no real computation)."""
    def build(out):
        log.append(name)
        (out / f"{name}.md").write_text(name)
        return FigureResult(files=[f"{name}.md"], caption=name, held="n/a", finding=name)
    return build
