"""`ptlab sweep`: run a grid of training cells (method x grid point x seed) and report over seeds.

A sweep file (YAML, `experiments/sweeps/*.yaml`) names training configs, seeds, overrides and the
metrics to compare; every cell runs `ptlab train` as its own process in `<out>/<variant>/seed<seed>/`.
Relative paths (`out`, each method's `config`) are taken from the working directory, as `ptlab train`
takes them. The schema (every key is checked; an error names the key):

    name: tiny_rl                    # required; [A-Za-z0-9._-]
    out: runs/sweeps/tiny_rl         # default runs/sweeps/<name>
    jobs: 2                          # cells at once (default 1; `--jobs` overrides)
    threads: 1                       # OMP_NUM_THREADS / MKL_NUM_THREADS of each cell (default 1)
    seeds: [1, 2, 3]                 # required, distinct integers
    overrides: ["run.max_steps=60"]  # every cell
    methods:                         # required; label -> {config (required), overrides, grid}
      grpo: {config: experiments/configs/tiny_grpo.yaml, overrides: ["run.lr=1e-4"]}
      sft: {config: experiments/configs/tiny_sft.yaml}
    grid: {method.hpt.gamma: [0, 0.125]}   # cartesian product of extra overrides, every method
    metrics: ["eval/test/avg@8"]     # required; keys of metrics.jsonl compared in the report
    baseline: sft                    # optional; a method label or a variant name

A variant is a method label plus one grid point; its name is `<label>` or `<label>__<point>` with the
point written `gamma=0.125` (several keys joined by `,`). A method may carry its own `grid`, merged into
the top-level one (its keys win), so a sweep over an HPT knob need not repeat the SFT baseline.

Resuming: a cell is done when `<cell>/DONE.json` exists (written after exit code 0); done cells are
skipped, a folder without DONE.json is an interrupted or failed cell and is deleted and rerun. Both are
checked again just before a cell starts, and a cell whose `RUNNING.json` names a live process (another
sweep over the same folder) is skipped, not deleted, so two sweeps can share an `out` folder. A done
cell whose recorded command differs from the current one (the sweep file changed) is an error: its
result would be mixed with cells of another set-up.

The report (`report.md`, `report.json`, `curves.png` under `<out>`) uses finished cells only. For a
cell and a metric, `final` is the value on the last line of metrics.jsonl that has the key, `initial`
the value at step 0 when logged, `gain = final - initial`.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

TOP_KEYS = ("name", "out", "jobs", "threads", "seeds", "overrides", "methods", "grid", "metrics", "baseline")
METHOD_KEYS = ("config", "overrides", "grid")
SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
LOG_TAIL = 20          # lines of a failed cell's log printed
POLL_SECONDS = 0.1     # how often running cells are checked; cells last seconds to hours


# ----------------------------------------------------------------------------------------------
# The sweep specification
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    label: str
    config: str                      # path of the training YAML, as written in the sweep file
    overrides: tuple[str, ...]       # key=value strings
    grid: tuple[tuple[str, tuple], ...]  # ((dotted key, values), ...), already merged with the top-level grid


@dataclass(frozen=True)
class Variant:
    method: str
    point: tuple[tuple[str, object], ...]   # ((dotted key, value), ...); () without a grid
    name: str                               # folder name and row label: `grpo` or `grpo__gamma=0.125`


@dataclass(frozen=True)
class Cell:
    variant: Variant
    seed: int
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.variant.name} seed={self.seed}"


@dataclass(frozen=True)
class Sweep:
    name: str
    out: Path
    jobs: int
    threads: int
    seeds: tuple[int, ...]
    overrides: tuple[str, ...]
    methods: dict[str, Method]
    metrics: tuple[str, ...]
    baseline: str | None = None
    variants: tuple[Variant, ...] = field(default=())


def load_sweep(path: str | Path) -> Sweep:
    """Read and validate a sweep file -> Sweep. Any problem raises ValueError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"sweep file not found: {path}")
    raw = yaml.safe_load(path.read_text())
    return parse_sweep(raw, source=str(path))


def parse_sweep(raw, source: str = "sweep") -> Sweep:
    """Validate the mapping of a sweep file (see the module docstring) -> Sweep."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping of keys, got {type(raw).__name__}")
    _check_keys(raw, TOP_KEYS, "")
    for key in ("name", "seeds", "methods", "metrics"):
        if key not in raw:
            raise ValueError(f"{key}: missing required key")
    name = _safe_name(raw["name"], "name")
    grid = _grid(raw.get("grid", {}), "grid")
    methods = {label: _method(label, spec, grid) for label, spec in _mapping(raw["methods"], "methods").items()}
    if not methods:
        raise ValueError("methods: at least one method is needed")
    variants = tuple(v for m in methods.values() for v in method_variants(m))
    names = [v.name for v in variants]
    clash = next((n for n in names if names.count(n) > 1), None)
    if clash:  # two grid values that differ only in characters a folder name cannot hold
        raise ValueError(f"grid: two variants would share the folder name {clash!r}")
    metrics = tuple(_str_list(raw["metrics"], "metrics", nonempty=True))
    sweep = Sweep(
        name=name,
        out=Path(_typed(raw.get("out", f"runs/sweeps/{name}"), str, "out")),
        jobs=_positive_int(raw.get("jobs", 1), "jobs"),
        threads=_positive_int(raw.get("threads", 1), "threads"),
        seeds=_seeds(raw["seeds"]),
        overrides=tuple(_overrides(raw.get("overrides", []), "overrides")),
        methods=methods,
        metrics=metrics,
        baseline=raw.get("baseline"),
        variants=variants,
    )
    if sweep.baseline is not None:
        baseline_variants(sweep)  # validates the name
    return sweep


def _check_keys(raw: dict, valid: tuple[str, ...], prefix: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in valid)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; valid keys: {', '.join(valid)}")


def _typed(value, tp, key: str):
    # bool is an int in Python; a `jobs: true` is a typo, not 1
    if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
        raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _positive_int(value, key: str) -> int:
    if _typed(value, int, key) < 1:
        raise ValueError(f"{key}: expected a positive integer, got {value!r}")
    return value


def _safe_name(value, key: str) -> str:
    # names become folder names: no slashes, spaces or the `__` that separates label and grid point
    if not SAFE_NAME.match(_typed(value, str, key)) or "__" in value:
        raise ValueError(f"{key}: {value!r} must be made of letters, digits, '.', '_', '-' (no '__')")
    return value


def _mapping(value, key: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected a mapping, got {value!r}")
    return value


def _str_list(value, key: str, nonempty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key}: expected a list of non-empty strings, got {value!r}")
    if nonempty and not value:
        raise ValueError(f"{key}: must not be empty")
    return value


def _overrides(value, key: str) -> list[str]:
    items = _str_list(value, key)
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"{key}: {item!r} is not key=value (e.g. run.max_steps=60)")
    return items


def _seeds(value) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"seeds: expected a non-empty list of integers, got {value!r}")
    for s in value:
        _typed(s, int, "seeds")
    if len(set(value)) != len(value):
        raise ValueError(f"seeds: repeated seed in {value!r}")
    return tuple(value)


def _grid(value, key: str) -> dict[str, tuple]:
    """{dotted key: [values]} -> {key: tuple(values)}; values are YAML scalars."""
    grid = {}
    for k, values in _mapping(value, key).items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$", k):
            raise ValueError(f"{key}: {k!r} is not a dotted config key (e.g. method.hpt.gamma)")
        if not isinstance(values, list) or not values:
            raise ValueError(f"{key}.{k}: expected a non-empty list of values, got {values!r}")
        for v in values:
            if not isinstance(v, (str, int, float, bool)):
                raise ValueError(f"{key}.{k}: values must be scalars, got {v!r}")
        if len({_format_value(v) for v in values}) != len(values):
            raise ValueError(f"{key}.{k}: repeated value in {values!r}")
        grid[k] = tuple(values)
    return grid


def _method(label, spec, top_grid: dict[str, tuple]) -> Method:
    key = f"methods.{label}"
    _safe_name(label, key)
    spec = _mapping(spec, key)
    _check_keys(spec, METHOD_KEYS, key + ".")
    if "config" not in spec:
        raise ValueError(f"{key}.config: missing required key")
    config = _typed(spec["config"], str, f"{key}.config")
    if not Path(config).is_file():
        raise ValueError(f"{key}.config: file not found: {config} (relative paths start at {Path.cwd()})")
    grid = {**top_grid, **_grid(spec.get("grid", {}), f"{key}.grid")}
    return Method(label, config, tuple(_overrides(spec.get("overrides", []), f"{key}.overrides")),
                  tuple(grid.items()))


def _format_value(v) -> str:
    """A grid value as the override text that `ptlab train` parses (YAML) back to the same value."""
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def _point_name(point: tuple[tuple[str, object], ...]) -> str:
    """`gamma=0.125,beta=1`: last part of each key, or the whole key where two last parts clash."""
    tails = [k.rsplit(".", 1)[-1] for k, _ in point]
    parts = []
    for (k, v), tail in zip(point, tails):
        shown = tail if tails.count(tail) == 1 else k
        parts.append(f"{shown}={re.sub(r'[^A-Za-z0-9._+-]', '_', _format_value(v))}")
    return ",".join(parts)


def method_variants(m: Method) -> list[Variant]:
    """Every grid point of a method (the cartesian product of its grid) -> Variants, in grid order."""
    keys = [k for k, _ in m.grid]
    out = []
    for values in itertools.product(*(vals for _, vals in m.grid)):
        point = tuple(zip(keys, values))
        out.append(Variant(m.label, point, m.label + (f"__{_point_name(point)}" if point else "")))
    return out


def baseline_variants(sweep: Sweep) -> dict[tuple, Variant]:
    """The baseline as {grid point: variant}: one entry for a variant name or a method without grid."""
    b = sweep.baseline
    if not isinstance(b, str):
        raise ValueError(f"baseline: expected a method label or variant name, got {b!r}")
    by_name = [v for v in sweep.variants if v.name == b]
    if by_name:
        return {by_name[0].point: by_name[0]}
    if b in sweep.methods:
        return {v.point: v for v in sweep.variants if v.method == b}
    raise ValueError(f"baseline: {b!r} is neither a method label nor a variant name; "
                     f"choose from {sorted({*sweep.methods, *(v.name for v in sweep.variants)})}")


def baseline_for(sweep: Sweep, variant: Variant) -> Variant | None:
    """The variant `variant` is compared with: the single baseline, or the baseline at the same grid point."""
    base = baseline_variants(sweep)
    if variant in base.values():
        return None
    if len(base) == 1:
        return next(iter(base.values()))
    return base.get(variant.point)


# ----------------------------------------------------------------------------------------------
# Cells and their commands
# ----------------------------------------------------------------------------------------------


def cells(sweep: Sweep) -> list[Cell]:
    """All cells, seed-major so that the first complete seed across variants arrives early."""
    return [Cell(v, s, sweep.out / v.name / f"seed{s}") for s in sweep.seeds for v in sweep.variants]


def cell_command(sweep: Sweep, cell: Cell) -> list[str]:
    """The `ptlab train` process of a cell: later overrides win (sweep < method < grid < seed/folder)."""
    m = sweep.methods[cell.variant.method]
    grid = [f"{k}={_format_value(v)}" for k, v in cell.variant.point]
    return [sys.executable, "-m", "experiments.cli", "train", m.config, *sweep.overrides, *m.overrides, *grid,
            f"run.seed={cell.seed}", f"run.output_dir={cell.dir}", "run.progress=false"]


def _done_record(cell: Cell) -> dict | None:
    """The cell's DONE.json, or None when absent or unreadable (a write cut short counts as not done)."""
    path = cell.dir / "DONE.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except json.JSONDecodeError:
        return None


def _same_command(recorded: list[str], current: list[str]) -> bool:
    # the interpreter path may differ between machines or environments; the rest must match
    return list(recorded[1:]) == list(current[1:])


def _check_stale(sweep: Sweep, all_cells: list[Cell]) -> None:
    stale = [c.label for c in all_cells
             if (rec := _done_record(c)) is not None and not _same_command(rec.get("command", []),
                                                                           cell_command(sweep, c))]
    if stale:
        raise ValueError(f"out: {len(stale)} finished cell(s) under {sweep.out} ran another command "
                         f"(the sweep file changed), e.g. {stale[0]}; delete them or choose another `out`")


def dry_run(sweep: Sweep) -> None:
    """Print every cell's command, with `# done` for finished cells."""
    all_cells = cells(sweep)
    for i, c in enumerate(all_cells, 1):
        state = "  # done" if _done_record(c) is not None else ""
        print(f"[{i}/{len(all_cells)}] {c.label}{state}\n  {shlex.join(cell_command(sweep, c))}")


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------


@dataclass
class _Running:
    cell: Cell
    proc: subprocess.Popen
    log: object        # the open log file, closed when the process ends
    command: list[str]
    start: float


def _cell_env(threads: int) -> dict[str, str]:
    from toy.pretrain import pinned_kernel_env

    env = pinned_kernel_env()   # the kernels the world's base and the recorded runs used (toy/pretrain.py)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


def _running_elsewhere(cell: Cell) -> int | None:
    """The pid of a live process that another sweep started in this cell (its RUNNING.json), else None."""
    try:
        pid = int(json.loads((cell.dir / "RUNNING.json").read_text())["pid"])
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
        return pid
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _start(sweep: Sweep, cell: Cell) -> _Running:
    if cell.dir.exists():  # interrupted or failed before: the trainer must start clean
        shutil.rmtree(cell.dir)
    cell.dir.mkdir(parents=True)
    command = cell_command(sweep, cell)
    log = open(cell.dir / "log.txt", "w")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=_cell_env(sweep.threads))
    # a second sweep over the same folder must not delete a cell that is still running
    (cell.dir / "RUNNING.json").write_text(json.dumps({"pid": proc.pid}) + "\n")
    return _Running(cell, proc, log, command, time.monotonic())


def _tail(path: Path, n: int = LOG_TAIL) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else ["(no log)"]
    return "\n".join("    " + ln for ln in lines[-n:])


def _first_metric_text(sweep: Sweep, cell: Cell) -> str:
    key = sweep.metrics[0]
    final = cell_values(load_metrics(cell.dir / "metrics.jsonl"), key)[0]
    return f"{key}={'n/a' if final is None else f'{final:.4g}'}"


def _finish(sweep: Sweep, r: _Running, index: str) -> bool:
    """Record a finished process; True when it succeeded (DONE.json written)."""
    r.log.close()
    (r.cell.dir / "RUNNING.json").unlink(missing_ok=True)
    seconds = time.monotonic() - r.start
    code = r.proc.returncode
    if code == 0:
        record = {"seconds": round(seconds, 3), "returncode": 0, "command": r.command}
        (r.cell.dir / "DONE.json").write_text(json.dumps(record, indent=1) + "\n")
        print(f"{index} {r.cell.label} done in {seconds:.1f} s  {_first_metric_text(sweep, r.cell)}", flush=True)
        return True
    print(f"{index} {r.cell.label} FAILED (exit {code}) after {seconds:.1f} s; end of "
          f"{r.cell.dir / 'log.txt'}:\n{_tail(r.cell.dir / 'log.txt')}", flush=True)
    return False


def run_sweep(sweep: Sweep, jobs: int | None = None) -> list[Cell]:
    """Run every unfinished cell, at most `jobs` at once (default sweep.jobs) -> the failed cells."""
    jobs = sweep.jobs if jobs is None else jobs
    all_cells = cells(sweep)
    _check_stale(sweep, all_cells)
    total, finished = len(all_cells), 0
    pending: deque[Cell] = deque()
    for c in all_cells:
        if _done_record(c) is not None:
            finished += 1
            print(f"[{finished}/{total}] {c.label} skip (done)", flush=True)
        else:
            pending.append(c)
    running: list[_Running] = []
    failed: list[Cell] = []
    try:
        while pending or running:
            while pending and len(running) < jobs:
                c = pending.popleft()
                # checked again now: another sweep over the same folder may have finished or taken it
                if _done_record(c) is not None or (pid := _running_elsewhere(c)) is not None:
                    finished += 1
                    state = "skip (done)" if _done_record(c) is not None else f"skip (running elsewhere, pid {pid})"
                    print(f"[{finished}/{total}] {c.label} {state}", flush=True)
                    continue
                running.append(_start(sweep, c))
            time.sleep(POLL_SECONDS)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                finished += 1
                if not _finish(sweep, r, f"[{finished}/{total}]"):
                    failed.append(r.cell)
    finally:  # Ctrl-C or an error here: stop the children; their folders (no DONE.json) rerun next time
        for r in running:
            r.proc.terminate()
            r.proc.wait()
            r.log.close()
    return failed


# ----------------------------------------------------------------------------------------------
# Metrics and statistics (pure functions)
# ----------------------------------------------------------------------------------------------


def finished_cells(path: Path, run: bool = False) -> list[dict]:
    """[{method, point, seed, dir, rows, done}] of a sweep file's finished cells (running the sweep first
    when `run`)."""
    sweep = load_sweep(path)
    if run:
        failed = run_sweep(sweep)
        if failed:
            raise RuntimeError(f"{len(failed)} cell(s) of {path} failed, e.g. {failed[0].label}")
    out = []
    for c in cells(sweep):
        done = c.dir / "DONE.json"
        if done.exists():
            out.append({"method": c.variant.method, "point": dict(c.variant.point), "seed": c.seed, "dir": c.dir,
                        "rows": load_metrics(c.dir / "metrics.jsonl"), "done": json.loads(done.read_text())})
    return out


def load_metrics(path: str | Path) -> list[dict]:
    """metrics.jsonl -> list of dicts, one per line; a missing file gives []; a torn last line is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill; earlier lines are complete
                continue
    return rows


def cell_values(rows: list[dict], key: str) -> tuple[float | None, float | None]:
    """(final, initial) of one metric: the last line with the key, and the step-0 line with it (or None)."""
    final = next((float(r[key]) for r in reversed(rows) if key in r), None)
    initial = next((float(r[key]) for r in rows if key in r and r.get("step") == 0), None)
    return final, initial


def curve(rows: list[dict], key: str) -> dict[int, float]:
    """{step: value} of one metric (a repeated step keeps its last value)."""
    return {int(r["step"]): float(r[key]) for r in rows if key in r and "step" in r}


def t_interval(values, level: float = 0.95) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean of `values` [n] -> (low, high); None when n < 2."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    half = stats.t.ppf(0.5 + level / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def summarise(values) -> dict | None:
    """values [n] -> {n, mean, ci: [low, high] | None, min, max}; None when empty."""
    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        return None
    ci = t_interval(x)
    return {"n": int(x.size), "mean": float(x.mean()), "ci": list(ci) if ci else None,
            "min": float(x.min()), "max": float(x.max())}


def paired_differences(variant: dict[int, float], baseline: dict[int, float]) -> dict | None:
    """Per-seed final(variant) - final(baseline) over the seeds both have.

    variant, baseline: {seed: final value}. Returns {seeds, diffs, n, mean, ci, better} (better = number of
    seeds where the variant is strictly higher), or None when no seed is shared.
    """
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    diffs = [variant[s] - baseline[s] for s in seeds]
    return {"seeds": seeds, "diffs": diffs, **summarise(diffs), "better": sum(d > 0 for d in diffs)}


def mean_curve(per_seed: list[dict[int, float]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Curves {step: value} of several seeds -> (steps, mean, min, max) [S] over the steps every seed has."""
    if not per_seed:
        return (np.zeros(0),) * 4
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    y = np.array([[c[s] for s in steps] for c in per_seed], dtype=float).reshape(len(per_seed), len(steps))
    return np.array(steps), y.mean(0), y.min(0), y.max(0)


# ----------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------


def collect(sweep: Sweep) -> dict[str, dict[int, list[dict]]]:
    """Metrics of the finished cells: {variant name: {seed: rows}} (cells without DONE.json are left out)."""
    out: dict[str, dict[int, list[dict]]] = {v.name: {} for v in sweep.variants}
    for c in cells(sweep):
        if _done_record(c) is not None:
            out[c.variant.name][c.seed] = load_metrics(c.dir / "metrics.jsonl")
    return out


def build_report(sweep: Sweep, data: dict[str, dict[int, list[dict]]]) -> dict:
    """{variant: {seed: rows}} -> the report as JSON-ready dict (see report.json)."""
    variants = {}
    for v in sweep.variants:
        per_metric = {}
        for key in sweep.metrics:
            vals = {s: cell_values(rows, key) for s, rows in data[v.name].items()}
            finals = {s: f for s, (f, _) in vals.items() if f is not None}
            gains = {s: f - i for s, (f, i) in vals.items() if f is not None and i is not None}
            per_metric[key] = {"final": summarise(finals.values()), "gain": summarise(gains.values()),
                               "finals": {str(s): x for s, x in finals.items()}}
        variants[v.name] = {"method": v.method, "point": {k: val for k, val in v.point},
                            "seeds": sorted(data[v.name]), "metrics": per_metric}
    return {"name": sweep.name, "out": str(sweep.out), "metrics": list(sweep.metrics),
            "cells_total": len(sweep.seeds) * len(sweep.variants),
            "cells_done": sum(len(d) for d in data.values()), "variants": variants,
            "baseline": sweep.baseline, "paired": _paired(sweep, variants)}


def _paired(sweep: Sweep, variants: dict) -> dict:
    if sweep.baseline is None:
        return {}
    out = {}
    for v in sweep.variants:
        base = baseline_for(sweep, v)
        if base is None:
            continue
        out[v.name] = {"baseline": base.name, "metrics": {}}
        for key in sweep.metrics:
            finals = {int(s): x for s, x in variants[v.name]["metrics"][key]["finals"].items()}
            base_finals = {int(s): x for s, x in variants[base.name]["metrics"][key]["finals"].items()}
            out[v.name]["metrics"][key] = paired_differences(finals, base_finals)
    return out


def _num(x: float) -> str:
    return f"{x:.4g}"


def _stat_cells(s: dict | None) -> list[str]:
    """A summary -> [n, mean, 95% CI, min..max] table cells; dashes when absent."""
    if s is None:
        return ["0", "—", "—", "—"]
    ci = f"[{_num(s['ci'][0])}, {_num(s['ci'][1])}]" if s["ci"] else "n/a"
    return [str(s["n"]), _num(s["mean"]), ci, f"{_num(s['min'])}..{_num(s['max'])}"]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    # a `|` inside a metric name or value would split a Markdown cell
    esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
    return ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                            for r in esc[1:]]


def render_markdown(report: dict) -> str:
    """The report dict (build_report) -> Markdown: one table of finals/gains per metric, then paired tables."""
    lines = [f"# Sweep `{report['name']}`", "",
             f"Finished cells: {report['cells_done']}/{report['cells_total']} (folder `{report['out']}`). "
             "Over seeds: mean, 95% confidence interval of the mean (Student t; n/a with one seed), min..max. "
             "`final` = last logged value, `gain` = final - value at step 0 (when logged). "
             "Learning curves: `curves.png`.", ""]
    for key in report["metrics"]:
        lines += [f"## `{key}`", ""]
        rows = [[name, *_stat_cells(v["metrics"][key]["final"]), *_stat_cells(v["metrics"][key]["gain"])]
                for name, v in report["variants"].items()]
        lines += _table(["variant", "n", "final mean", "95% CI", "min..max",
                         "n (gain)", "gain mean", "gain 95% CI", "gain min..max"], rows) + [""]
    if report["paired"]:
        lines += [f"## Paired differences vs baseline `{report['baseline']}`", "",
                  "Per seed (same seed in both): final(variant) - final(baseline); `better` = seeds where the "
                  "variant is higher.", ""]
        for key in report["metrics"]:
            lines += [f"### `{key}`", ""]
            rows = []
            for name, p in report["paired"].items():
                d = p["metrics"][key]
                diffs = ", ".join(f"{s}: {_num(x)}" for s, x in zip(d["seeds"], d["diffs"])) if d else "—"
                better = f"{d['better']}/{d['n']}" if d else "—"
                rows.append([name, p["baseline"], *_stat_cells(d), better, diffs])
            lines += _table(["variant", "baseline", "n pairs", "mean diff", "95% CI", "min..max", "better",
                             "per seed"], rows) + [""]
    return "\n".join(lines)


def plot_curves(sweep: Sweep, data: dict[str, dict[int, list[dict]]], path: Path) -> None:
    """One panel per metric: mean over seeds per variant, band min..max, steps logged by every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sweep.metrics)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, sweep.metrics):
        for v in sweep.variants:
            steps, mean, lo, hi = mean_curve([curve(r, key) for r in data[v.name].values()])
            if steps.size == 0:
                continue
            line = ax.plot(steps, mean, marker="." if steps.size < 30 else None, label=v.name)[0]
            ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    fig.suptitle(f"{sweep.name}: mean over seeds, band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(sweep: Sweep) -> str:
    """Write <out>/report.md, report.json, curves.png from the finished cells -> the Markdown."""
    data = collect(sweep)
    report = build_report(sweep, data)
    sweep.out.mkdir(parents=True, exist_ok=True)
    md = render_markdown(report)
    (sweep.out / "report.md").write_text(md + "\n")
    (sweep.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_curves(sweep, data, sweep.out / "curves.png")
    return md


def main(path: str | Path, jobs: int | None = None, dry: bool = False, report_only: bool = False) -> int:
    """`ptlab sweep`: run (or only report, or only print) a sweep -> exit code (1 when a cell failed)."""
    sweep = load_sweep(path)
    if dry:
        dry_run(sweep)
        return 0
    failed = [] if report_only else run_sweep(sweep, jobs)
    print(write_report(sweep))
    print(f"[ptlab sweep] report: {sweep.out / 'report.md'}, {sweep.out / 'curves.png'}")
    if failed:
        print(f"[ptlab sweep] {len(failed)} cell(s) failed (logs in their folders): "
              + ", ".join(c.label for c in failed), file=sys.stderr)
        return 1
    return 0
