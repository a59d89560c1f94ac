"""A run folder holds one run. Its resolved config is stored (`config.json`, and in every checkpoint's
`trainer_state.json`); resuming checks that the config has not changed, except in the keys meant to change
between the pieces of one run (`RESUMABLE`); a new run never writes into a folder that holds another run's
files unless `run.overwrite=true`, which first removes them, so nothing of two runs is ever mixed.

`run.resume`: false (a new run), true (continue from the newest checkpoint; there must be one), or auto
(continue when there is a checkpoint, else start a new run).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from scale import checkpoint as ckpt

# Keys that may differ between a checkpoint's run and the run that resumes it: the length of the run, how
# often and what it saves and logs, the folder itself, and how the work is split (threads, the head's chunks,
# length-grouped or packed micro-batches, skipped zero-advantage samples: the same values up to rounding;
# the token cache's folder).
# Everything else fixes the experiment.
RESUMABLE = ("run.max_steps", "run.resume", "run.overwrite", "run.save_every", "run.stop_after", "run.log_every",
             "run.progress", "run.tensorboard", "run.save_model", "run.output_dir", "run.threads",
             "run.entropy_every", "run.logprob_chunk", "run.logprob_memory_mb", "data.cache_dir",
             "run.group_by_length", "run.padding_free", "run.share_prefix", "run.fused_mlp",
             "run.skip_zero_advantage")
RUN_FILES = ("config.json", "metrics.jsonl", "eval_records.jsonl", "checkpoints", "final", "final.tmp", "tb")


def flat(d: dict, prefix: str = "") -> dict:
    """{dotted key: value} of a nested config dict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def changed_keys(old: dict, new: dict) -> list[str]:
    """The dotted keys (outside RESUMABLE) whose values differ between two config dicts. A key only one of
    them has (a config written by another ptlab version) is not compared."""
    a, b = flat(old), flat(new)
    return sorted(k for k in set(a) & set(b) if k not in RESUMABLE and a[k] != b[k])


def others(out: Path) -> list[str]:
    """The files and folders of a run that are present in `out`."""
    return [name for name in RUN_FILES if (out / name).exists()]


def decide(cfg) -> bool:
    """Whether this run resumes (True) or starts (False); raises ValueError naming the key when neither is
    safe. Call before anything is written or loaded."""
    r, out = cfg.run, Path(cfg.run.output_dir)
    latest = ckpt.latest(out) if r.resume in (True, "auto") else None   # raises for a broken pointer
    if r.resume is True and latest is None:
        raise ValueError(f"run.resume: no checkpoint under {out / 'checkpoints'}")
    if latest is not None and r.resume in (True, "auto"):
        state = json.loads((latest / "trainer_state.json").read_text())
        old = state.get("config")
        if old is None and (out / "config.json").is_file():   # a checkpoint from before configs were stored
            old = json.loads((out / "config.json").read_text())
        if old is None:
            raise ValueError(f"run.resume: {latest} does not record the config it was made with; start a new run")
        diff = changed_keys(old, cfg.to_dict())
        if diff:
            a, b = flat(old), flat(cfg.to_dict())
            shown = "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:4])
            raise ValueError(f"run.resume: the checkpoint in {out} belongs to a run with another config "
                             f"({shown}{'; ...' if len(diff) > 4 else ''}); resume with the same config, or start "
                             "a new run in another run.output_dir")
        return True
    present = others(out)
    if present and not r.overwrite:
        raise ValueError(f"run.output_dir: {out} holds another run ({', '.join(present)}); set run.resume=auto to "
                         "continue it, run.overwrite=true to replace it, or choose another folder")
    return False


def clear(out: Path) -> None:
    """Remove a previous run's files from `out` (run.overwrite); other files are left alone."""
    for name in others(out):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
