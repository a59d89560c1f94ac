"""The figure registry behind `ptlab figures`.

A module `experiments/fig_<name>.py` registers each figure it draws with `@figure(...)`. The
function receives the output folder, writes its files there and returns a `FigureResult` saying
what it found. `ptlab figures` imports every `fig_*` module, runs the figures, stores one metadata
record per figure under `<out>/meta/` and rebuilds the index `<out>/README.md` from all records,
so running one figure (`--only`) refreshes its row and keeps the others.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class FigureResult:
    files: list[str]            # file names written into the output folder
    caption: str                # what the figure shows
    held: str                   # "yes", "no", "partly" or "n/a": did the paper's claim hold here
    finding: str = ""           # the numbers behind `held`, in one or two sentences
    extra: dict = field(default_factory=dict)


@dataclass
class Figure:
    name: str
    reproduces: str             # which paper figure or table, and its claim
    build: Callable[[Path], FigureResult]
    slow: bool = False          # minutes to build: skipped by `ptlab figures --fast`


FIGURES: dict[str, Figure] = {}


def figure(name: str, reproduces: str, slow: bool = False):
    """Register `fn(out_dir) -> FigureResult` under `name`."""

    def wrap(fn: Callable[[Path], FigureResult]):
        if name in FIGURES:
            raise ValueError(f"figure name {name!r} is registered twice")
        FIGURES[name] = Figure(name, reproduces, fn, slow)
        return fn

    return wrap


def discover() -> dict[str, Figure]:
    """Import every `experiments.fig_*` module so that its figures register."""
    import experiments

    for mod in pkgutil.iter_modules(experiments.__path__):
        if mod.name.startswith("fig_"):
            importlib.import_module(f"experiments.{mod.name}")
    return FIGURES


def run_figures(out: Path, only: list[str] | None = None, include_slow: bool = True) -> list[str]:
    """Build the selected figures into `out`, then rebuild the index. Returns the names built."""
    figs = discover()
    if only:
        unknown = sorted(set(only) - set(figs))
        if unknown:
            raise ValueError(f"only: unknown figure(s) {unknown}; registered: {sorted(figs)}")
        chosen = [figs[n] for n in only]
    else:
        chosen = [f for f in figs.values() if include_slow or not f.slow]
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta").mkdir(exist_ok=True)
    for fig in chosen:
        print(f"[ptlab figures] {fig.name} ...", flush=True)
        res = fig.build(out)
        for f in res.files:
            if not (out / f).exists():
                raise RuntimeError(f"figure {fig.name!r} claims to have written {f!r}, which is missing")
        record = {"name": fig.name, "reproduces": fig.reproduces, **asdict(res)}
        (out / "meta" / f"{fig.name}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    write_index(out)
    return [f.name for f in chosen]


def write_index(out: Path) -> None:
    records = [json.loads(p.read_text()) for p in sorted((out / "meta").glob("*.json"))]
    lines = [
        "# paper_figs: regenerated figures and tables",
        "",
        "Written by `ptlab figures` (the README's main job); every file here is drawn from code in",
        "`experiments/fig_*.py`. `held` says whether the paper's claim held in our regeneration, and",
        "`finding` gives the numbers behind that verdict. Do not edit by hand.",
        "",
        "| figure | files | reproduces | held | finding |",
        "|---|---|---|---|---|",
    ]
    for r in records:
        files = ", ".join(f"[{f}]({f})" for f in r["files"])
        cells = [r["name"], files, r["reproduces"], r["held"], r["finding"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    lines += ["", "## Captions", ""]
    for r in records:
        lines += [f"### {r['name']}", "", r["caption"], ""]
    (out / "README.md").write_text("\n".join(lines))
