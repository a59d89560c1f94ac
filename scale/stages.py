"""Training runs chained into one command (SFT -> GRPO, SFT -> DPO, ...): a pipeline file lists the stages.

    stages:                       # in order; each a training config plus its own overrides
      - {name: sft, config: experiments/configs/tiny_sft.yaml}
      - {name: grpo, config: experiments/configs/tiny_grpo.yaml, overrides: [run.max_steps=60]}
    output_dir: runs/tiny/sft_grpo

`ptlab train PIPELINE.yaml [key=value ...]` runs the stages one after the other in one process:
- stage k writes into `<output_dir>/<name>` (a run folder of its own) and every stage but the last saves its
  final model, from which stage k+1 starts (`model.path`; a KL or DPO reference is then that model too);
- a command-line `key=value` applies to every stage (`run.seed=1`; `run.output_dir=...` moves the pipeline's
  folder), `<name>.key=value` to one stage (`grpo.run.lr=1e-4`);
- every stage runs with `run.resume=auto`: a stopped pipeline continues where it stopped, a finished stage
  only reloads;
- `<output_dir>/metrics.jsonl` holds every stage's lines with `stage` and a step that continues across the
  stages (the first stage's steps, then the next one's after them), so curves and `ptlab sweep` see one run.
All stages are checked before the first one starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from scale.config import Config, load_config, read_utf8

PIPELINE_KEYS = ("stages", "output_dir")


def is_pipeline(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    try:
        raw = yaml.safe_load(read_utf8(p, "config"))
    except (yaml.YAMLError, ValueError):   # not for us to report: load_config names the line
        return False
    return isinstance(raw, dict) and "stages" in raw


def load_pipeline(path: str | Path, overrides: list[str]) -> list[tuple[str, Config]]:
    """[(stage name, its validated Config)], with folders, model paths and overrides resolved."""
    raw = yaml.safe_load(read_utf8(Path(path), "config"))
    unknown = sorted(set(raw) - set(PIPELINE_KEYS))
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown key in the pipeline {path}; valid: {list(PIPELINE_KEYS)}")
    stages = raw.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ValueError(f"stages: expected a non-empty list of {{name, config, overrides}}, got {stages!r}")
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    if not all(isinstance(n, str) and n.isidentifier() for n in names) or len(set(names)) != len(names):
        raise ValueError(f"stages: every stage needs a distinct name (letters, digits, _), got {names}")
    out_dir = Path(str(raw.get("output_dir") or "runs/pipeline"))
    common, own = [], {n: [] for n in names}
    for o in overrides:
        head = o.split("=", 1)[0].split(".", 1)[0]
        if o.startswith("run.output_dir="):
            out_dir = Path(o.split("=", 1)[1])
        elif head in own:
            own[head].append(o.split(".", 1)[1])
        else:
            common.append(o)
    cfgs, prev = [], None
    for i, (s, name) in enumerate(zip(stages, names)):
        bad = sorted(set(s) - {"name", "config", "overrides"})
        if bad or "config" not in s:
            raise ValueError(f"stages[{i}]: expected keys name, config and optional overrides, got {sorted(s)}")
        fixed = [f"run.output_dir={out_dir / name}", "run.resume=auto"]
        if i < len(stages) - 1:
            fixed.append("run.save_model=true")   # the next stage starts from this model
        if prev is not None:
            fixed.append(f"model.path={prev}")
        try:
            cfg = load_config(s["config"], [*s.get("overrides", []), *common, *own[name], *fixed])
        except ValueError as e:
            raise ValueError(f"stages[{i}] ({name}): {e}") from None
        for key in ("cpu", "mixed_precision"):   # accelerate's state is set once per process
            if cfgs and getattr(cfg.run, key) != getattr(cfgs[0][1].run, key):
                raise ValueError(f"stages[{i}] ({name}): run.{key}: every stage of a pipeline needs the same value "
                                 f"(stage {cfgs[0][0]!r} has {getattr(cfgs[0][1].run, key)!r})")
        cfgs.append((name, cfg))
        prev = out_dir / name / "final"
    return cfgs


def merge_metrics(out_dir: Path, stages: list[tuple[str, Config]]) -> None:
    """`<out_dir>/metrics.jsonl`: the stages' lines in order, with `stage` and a step offset by the earlier
    stages' max_steps."""
    lines, offset = [], 0
    for name, cfg in stages:
        f = Path(cfg.run.output_dir) / "metrics.jsonl"
        if f.is_file():
            for ln in f.read_text().splitlines():
                if ln.strip():
                    row = json.loads(ln)
                    lines.append(json.dumps({**row, "step": row["step"] + offset, "stage": name}))
        offset += cfg.run.max_steps
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "metrics.jsonl.tmp"
    tmp.write_text("".join(ln + "\n" for ln in lines))
    tmp.replace(out_dir / "metrics.jsonl")
