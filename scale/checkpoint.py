"""Atomic checkpoints: a new checkpoint never damages the previous one.

Layout under `output_dir`:

    checkpoints/step-000010/      accelerate's save_state (model, optimizer, scheduler, RNG of every rank)
                                  + trainer_state.json (step, data epoch) + extra.pt (schedule state)
    checkpoints/LATEST            the name of the newest complete checkpoint

Writing: the main process creates `step-N.tmp/`, then every process writes its part into it (under FSDP2 and
ZeRO each rank writes its shards), and after a barrier the main process fsyncs every file and the folder,
and renames it to `step-N/` (`os.replace`); then `LATEST` is rewritten through a temporary file, fsync and `os.replace`;
only then are older checkpoints deleted. A crash at any point leaves `LATEST` naming a complete
checkpoint (the previous one until the pointer moves). A leftover `*.tmp` folder is ignored and
cleaned on the next save.

A write that fails (a full disk, an I/O error) removes its `.tmp` folder at once, so a full disk gets its
space back, and raises `WriteError` (an OSError) saying where, and "no space left" when that is the cause:
torch's own message on a full disk is "[enforce fail at inline_container.cc] unexpected pos".
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch

POINTER = "LATEST"


class _TiedWeightsNote(logging.Filter):
    """accelerate warns on every save of a model with tied embeddings that it stored the shared tensor once;
    that is the expected case (loading re-ties it; the resume tests check the parameters bit for bit)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Removed shared tensor")


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())


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


class WriteError(OSError):
    """A checkpoint or the final model could not be written; the message says where and why (`ptlab` prints
    it as one line); errno is ENOSPC for a full disk."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.errno = code


NO_SPACE_BYTES = 1 << 20  # a failed write with less free space than this is reported as a full disk


def _no_space(e: BaseException, where: Path) -> bool:
    for x in (e, e.__cause__, e.__context__):
        if isinstance(x, OSError) and x.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if x is not None and ("No space left" in str(x) or "os error 28" in str(x)):
            return True
    try:
        return shutil.disk_usage(_existing(where)).free < NO_SPACE_BYTES
    except OSError:
        return False


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@contextlib.contextmanager
def cleaned_on_failure(tmp: Path, what: str, clean: bool = True):
    """Run a write into `tmp` (a folder or a file); if it raises, remove `tmp` (when `clean`: the main
    process) and raise WriteError naming `what` and `tmp`, "no space left on device" when that is the cause."""
    try:
        yield
    except Exception as e:
        full = _no_space(e, tmp)  # measured before the partial files are removed
        if clean and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif clean:
            tmp.unlink(missing_ok=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = "no space left on device" if full else f"{type(e).__name__}: {first}"
        raise WriteError(f"{what}: cannot write {tmp} ({why}); it was removed, nothing earlier was changed",
                         errno.ENOSPC if full else errno.EIO) from e


def write_pointer(ckpt_root: Path, name: str) -> None:
    tmp = ckpt_root / (POINTER + ".tmp")
    with cleaned_on_failure(tmp, f"checkpoint pointer {ckpt_root / POINTER}"):
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
        tmp.mkdir()   # before any rank writes its shard into it (FSDP2 / ZeRO: every rank writes)
    accelerator.wait_for_everyone()
    what = f"checkpoint of step {step}"
    with cleaned_on_failure(tmp, what, clean=accelerator.is_main_process):
        accelerator.save_state(str(tmp))
        if accelerator.is_main_process:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state))
            torch.save(extra, tmp / "extra.pt")
    accelerator.wait_for_everyone()   # every rank's files are written before the folder is published
    if accelerator.is_main_process:
        if _fail_after_state:  # tests: a crash (kill -9) after the files are written, before publishing
            raise RuntimeError("simulated crash while writing a checkpoint")
        with cleaned_on_failure(tmp, what):
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


def save_final(acc, policy, model, tok, path: Path) -> None:
    """The final model as a Hugging Face folder (an adapter under LoRA), written to `path.tmp` then
    renamed; `policy` is the prepared wrapper (whose state dict holds `model.*`), `model` the inner model."""
    acc.wait_for_everyone()
    state = acc.get_state_dict(policy)   # ZeRO-3: None on all but the main process
    masters = _deepspeed_masters(policy)   # every rank: one collective per parameter
    if acc.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        sd = {k[len("model."):]: v for k, v in {**state, **masters}.items() if k.startswith("model.")}
        for name in _aliases(model):   # tied weights: one copy (a gathered FSDP state dict no longer shares them)
            sd.pop(name, None)
        with cleaned_on_failure(tmp, "final model"):  # a full disk: no final.tmp left behind
            model.save_pretrained(tmp, state_dict=sd)
            tok.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    acc.wait_for_everyone()


def _deepspeed_masters(engine) -> dict:
    """Under DeepSpeed with bf16 / fp16, the float32 master copies of the trained parameters, by state-dict
    name: the engine's module holds half-precision weights, and a final model saved from them would lose the
    low bits that the float32 masters (what training updates, what DDP and FSDP2 save) keep. Empty elsewhere.
    Every rank must call it (ZeRO assembles each master from its partitions)."""
    half = getattr(engine, "bfloat16_enabled", lambda: False)() or getattr(engine, "fp16_enabled", lambda: False)()
    if not half:
        return {}
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in engine.module.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            if full is not None:
                out[name] = full.detach().cpu()
    return out


def _aliases(model) -> list[str]:
    """Names of parameters that are another parameter (tied embeddings), all but the first name of each."""
    seen, out = set(), []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            out.append(name)
        seen.add(id(p))
    return out
