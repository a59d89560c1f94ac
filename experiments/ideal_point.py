"""`ptlab ideal-point`: the optimum values f*_SFT and f*_DPO of a joint SFT+DPO config, by training on each
objective alone with the config's own budget, data, reference and optimizer settings (XRIGHT's released code
does the same with separate optimum runs; docs/xright.md). MAXRIGHT needs them (`method.joint.f_star_sft`,
`f_star_dpo`), and the optimality gaps and the distance to the ideal point are measured from them.

The two runs are the config itself with `method.joint.schedule=mix` and `lam=0` (SFT only: the preference
pairs get weight 0 and are not even read) or `lam=1` (DPO only), in `<out>/sft` and `<out>/dpo`, each with
two extra evaluation sets on its training data (`train_sft`: data.path, `train_pref`: data.pref_path, at the
end only). The result, `<out>/ideal_point.json`:

    f_star_sft, f_star_dpo   the objectives on the FULL training data at the end of the SFT-only and the
                             DPO-only run: what MAXRIGHT's gaps on training batches are measured against
    heldout                  {eval set name: final value} of the config's own sft / dpo eval sets in the run
                             that optimises that objective: the ideal point of the held-out plane
    seconds                  wall time of each run

A run whose metrics already hold its train-set value at max_steps is reused, so a re-run only redoes what
is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

TRAIN_SETS = {"sft": ("train_sft", "sft", "f_sft"), "dpo": ("train_pref", "dpo", "f_dpo")}


def single_objective_overrides(cfg, objective: str, out: Path) -> list[str]:
    """Overrides that turn the joint config `cfg` into its `objective`-only run (module docstring)."""
    sets = [{"name": s.name, "path": s.path, "kind": s.kind, "limit": s.limit, "every": s.every,
             **({"reward": s.reward} if s.reward else {})} for s in cfg.eval.sets]
    sets += [{"name": "train_sft", "path": cfg.data.path, "kind": "sft", "every": 0},
             {"name": "train_pref", "path": cfg.data.pref_path or cfg.data.path, "kind": "dpo", "every": 0}]
    return ["method.joint.schedule=mix", f"method.joint.lam={0 if objective == 'sft' else 1}",
            f"run.output_dir={out}", f"eval.sets={json.dumps(sets)}"]


def _final(out: Path, key: str, max_steps: int) -> float | None:
    """The run's value of `key` at max_steps, None when it has not logged it (not run, or cut short)."""
    from experiments.sweep import load_metrics
    from experiments.verdicts import value_at

    try:
        return value_at(load_metrics(out / "metrics.jsonl"), key, max_steps)
    except ValueError:
        return None


def ideal_point(config: str | Path, overrides: list[str], out: str | Path) -> dict:
    """Run (or reuse) the SFT-only and DPO-only runs of a joint config; write and return ideal_point.json."""
    from scale.config import load_config

    cfg = load_config(config, overrides)
    if cfg.method.name != "sft_dpo":
        raise ValueError(f"method.name: ideal-point needs a joint sft_dpo config, got {cfg.method.name!r}")
    out = Path(out)
    result = {"config": str(config), "overrides": list(overrides), "f_star": {}, "heldout": {}, "seconds": {}}
    kinds = {s.name: s.kind for s in cfg.eval.sets}
    for objective, (train_set, kind, metric) in TRAIN_SETS.items():
        run = out / objective
        key = f"eval/{train_set}/{metric}"
        t0 = time.perf_counter()
        if _final(run, key, cfg.run.max_steps) is None:
            cmd = [sys.executable, "-m", "experiments.cli", "train", str(config), *overrides,
                   *single_objective_overrides(cfg, objective, run)]
            print(f"[ptlab ideal-point] {objective} only: {run}", flush=True)
            subprocess.run(cmd, check=True, env=dict(os.environ))
        result["seconds"][objective] = round(time.perf_counter() - t0, 1)
        result["f_star"][objective] = _final(run, key, cfg.run.max_steps)
        for name in (n for n, k in kinds.items() if k == kind):
            result["heldout"][name] = _final(run, f"eval/{name}/{metric}", cfg.run.max_steps)
    f_star = result.pop("f_star")
    result["f_star_sft"], result["f_star_dpo"] = f_star["sft"], f_star["dpo"]
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "ideal_point.json.tmp"
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out / "ideal_point.json")
    print(f"[ptlab ideal-point] {out / 'ideal_point.json'}; for MAXRIGHT: "
          f"method.joint.f_star_sft={result['f_star_sft']:.6g} method.joint.f_star_dpo={result['f_star_dpo']:.6g}")
    return result
