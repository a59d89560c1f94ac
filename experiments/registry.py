"""The figure registry behind `ptlab figures`.

A module `experiments/fig_<name>.py` registers each figure it draws with `@figure(...)`. The
function receives the output folder, writes its files there and returns a `FigureResult` saying
what it found. `ptlab figures` imports every `fig_*` module, runs the figures, stores one metadata
record per figure under `<out>/meta/` and rebuilds the index `<out>/README.md` from all records,
so running one figure (`--only`) refreshes its row and keeps the others.

Slow figures. A figure is registered `slow=True` when one build takes more than 60 s of wall time on the
reference machine (2 shared CPU cores, under `nice -n 19`, `OMP_NUM_THREADS=1`); `ptlab figures --fast`
skips those. Measured once per figure with `ptlab figures --only NAME` (wall time, process start included):
table1 6 s, forgetting_toy 9 s, forgetting_tradeoff 13 s, forgetting_seq_bound 22 s, moments_vs_group_size
9 s, moments_vs_policy_quality 10 s, moments_table1 9 s, projection_spectrum 15 s; slow: projection_target_loss
508 s, datareg_sft (a sweep of 20 training runs, experiments/fig_datareg.py), datareg_case_study 86 s (with
two sweeps running beside it; it needs the world's base model), the nine `hpt_*` figures, which
share the HPT set's runs (experiments/fig_hpt.py: a sweep of 33 training runs and 22 pass@k evaluations,
cached, so only the first of them pays), four `xright_*` figures (experiments/fig_xright.py: a sweep
of 66 training runs, cached), xright_pythia_grid (a sweep of 42 runs, cached) and xright_convex
(168 s alone, 375 s beside a sweep: 5120 gradients of the world's base; it reads xright_tradeoff's record).

Byte-stable output. `ptlab figures` run twice on one machine with the same library versions writes the same
bytes. `run_figures` builds every figure under `deterministic()`: one numpy BLAS thread and one torch thread
(a float reduction split over threads sums in another order, so its last digits depend on the thread count),
the global random streams (random, np.random, torch) seeded 0 before each figure, and matplotlib's default
style whatever the user's matplotlibrc says. Figures are written with `save_figure`, which drops the
metadata that names the matplotlib version or a date. The records under `<out>/meta/` keep floats to
`RECORD_DIGITS` significant digits (the computations are float64), so a last-digit change of a computation
does not rewrite them. Across CPUs (another BLAS kernel) or other numpy/torch/matplotlib versions the last
digits of a result, and so a few antialiased pixels, may still change.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import pkgutil
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

RECORD_DIGITS = 12  # significant digits of the floats stored in <out>/meta/*.json


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
    slow: bool = False          # more than 60 s to build (module docstring): skipped by `ptlab figures --fast`


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
        with deterministic():
            res = fig.build(out)
        for f in res.files:
            if not (out / f).exists():
                raise RuntimeError(f"figure {fig.name!r} claims to have written {f!r}, which is missing")
        record = _rounded({"name": fig.name, "reproduces": fig.reproduces, **asdict(res)})
        (out / "meta" / f"{fig.name}.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    write_index(out)
    return [f.name for f in chosen]


def _rounded(x):
    """`x` with every float rounded to RECORD_DIGITS significant digits (for the stored records)."""
    if isinstance(x, float) and math.isfinite(x) and x != 0.0:
        return float(f"{x:.{RECORD_DIGITS}g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


@contextlib.contextmanager
def deterministic(seed: int = 0) -> Iterator[None]:
    """The fixed conditions a figure is built under (module docstring, 'Byte-stable output').

    One BLAS thread for numpy's OpenBLAS and one intra-op thread for torch; `random`, `np.random` and torch's
    global generator seeded with `seed`; matplotlib's default style (rcParams of no matplotlibrc) with a fixed
    SVG hash salt. Everything is put back on exit.
    """
    import matplotlib
    import numpy as np
    import torch

    from toy.datareg import _one_blas_thread

    threads, py_state, np_state = torch.get_num_threads(), random.getstate(), np.random.get_state()
    torch_state = torch.random.get_rng_state()
    try:
        torch.set_num_threads(1)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        with _one_blas_thread(), matplotlib.rc_context():
            matplotlib.rcdefaults()
            matplotlib.rcParams["svg.hashsalt"] = "ptlab"
            yield
    finally:
        torch.set_num_threads(threads)
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.random.set_rng_state(torch_state)


# savefig metadata keys that name the software version or a date, per format (None: not written)
_NO_METADATA = {"png": {"Software": None}, "svg": {"Creator": None, "Date": None},
                "pdf": {"Creator": None, "Producer": None, "CreationDate": None, "ModDate": None}}


def save_figure(fig, path: Path, **kwargs) -> None:
    """`fig.savefig(path, **kwargs)` without the metadata that changes between runs or machines (the matplotlib
    version, a creation date), so that the same figure gives the same bytes."""
    fmt = Path(path).suffix.lstrip(".").lower()
    fig.savefig(path, metadata=_NO_METADATA.get(fmt), **kwargs)


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
