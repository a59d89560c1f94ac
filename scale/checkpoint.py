"""Atomic checkpoints: a new checkpoint never damages the previous one.

Layout under `output_dir`:

    checkpoints/step-000010/      accelerate's save_state (model, optimizer, scheduler, RNG of every rank)
                                  + trainer_state.json (step, data epoch) + extra.pt (schedule state)
    checkpoints/LATEST            the name of the newest complete checkpoint

Writing: everything goes into `step-N.tmp/`; every file and the folder are fsync'ed; the folder is renamed
to `step-N/` (`os.replace`); then `LATEST` is rewritten through a temporary file, fsync and `os.replace`;
only then are older checkpoints deleted. A crash at any point leaves `LATEST` naming a complete
checkpoint (the previous one until the pointer moves). A leftover `*.tmp` folder is ignored and
cleaned on the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

POINTER = "LATEST"


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_pointer(ckpt_root: Path, name: str) -> None:
    tmp = ckpt_root / (POINTER + ".tmp")
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, ckpt_root / POINTER)
    _fsync_dir(ckpt_root)


def latest(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    root = Path(output_dir) / "checkpoints"
    ptr = root / POINTER
    if not ptr.is_file():
        return None
    name = ptr.read_text().strip()
    path = root / name
    if not (path / "trainer_state.json").is_file():
        raise ValueError(f"run.resume: checkpoint pointer {ptr} names {name!r}, which is incomplete or missing")
    return path


def save(accelerator, output_dir: str | Path, step: int, trainer_state: dict, extra: dict,
         _fail_after_state: bool = False) -> Path:
    """Save a checkpoint atomically (module doc). All ranks must call it (accelerate gathers shards)."""
    root = Path(output_dir) / "checkpoints"
    name = f"step-{step:06d}"
    tmp = root / (name + ".tmp")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("*.tmp"):
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
        torch.save(extra, tmp / "extra.pt")
        if _fail_after_state:  # tests: a crash after the files are written, before the checkpoint is published
            raise RuntimeError("simulated crash while writing a checkpoint")
        _fsync_tree(tmp)
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_pointer(root, name)
        for old in root.glob("step-*"):
            if old.name != name and not old.name.endswith(".tmp"):
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return root / name


def load(accelerator, path: Path) -> tuple[dict, dict]:
    """Restore model, optimizer, scheduler and RNG states; returns (trainer_state, extra)."""
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    extra = torch.load(path / "extra.pt", weights_only=False)
    return state, extra
