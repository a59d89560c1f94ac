"""Checks that run before any model weights load: the model folder and its files, the output folder, and
`loaded`, which names the config key when a loader fails."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def check_model_path(path: str, key: str = "model.path") -> None:
    """A local-looking path must exist and its files be readable (`check_model_files`); a hub name must
    resolve (offline: be in the cache)."""
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise ValueError(f"{key}: {path!r} is a folder without config.json (not a Hugging Face model)")
        if p.is_dir():
            check_model_files(p, key)
        return
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if looks_local:
        raise ValueError(f"{key}: {path!r} does not exist")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"{key}: {path!r} is not a local folder and could not be loaded from the hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_model_files(folder: Path, key: str) -> None:
    """The files of a local model folder, before anything loads: the JSON ones parse (a corrupt
    tokenizer.json otherwise fails with a bare JSON error), each safetensors file is as long as its header
    says (a truncated one otherwise fails after the model is built, naming no file), shards are present."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "model.safetensors.index.json"):
        f = folder / name
        if f.is_file():
            try:
                json.loads(f.read_bytes())
            except ValueError as e:  # JSONDecodeError (names line and column) or UnicodeDecodeError
                raise ValueError(f"{key}: {f} is corrupt: not valid JSON ({e})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
            if not (folder / shard).is_file():
                raise ValueError(f"{key}: {folder / shard} is missing (listed in {index.name})")
    for f in sorted(folder.glob("*.safetensors")):
        _check_safetensors(f, key)


def _check_safetensors(f: Path, key: str) -> None:
    """The layout: 8 bytes of header length n (at most 100 MB, safetensors' own limit), n bytes of JSON
    header, then the tensors, whose largest end offset is the data size; the file must be exactly that long."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 8 + n <= size and n <= 100_000_000 else None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] if header else []
        complete = header is not None and 8 + n + max(ends, default=0) == size
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        complete = False
    if not complete:
        raise ValueError(f"{key}: {f} is truncated or corrupt (its header does not describe its {size} bytes); "
                         "copy or download it again")


def check_output_dir(path: str) -> None:
    """The run can create and write its folder. Checked before the model loads by creating (and at once
    removing) an anonymous file in the nearest existing folder: os.access says yes to root, or on a
    read-only mount. Nothing that exists is touched."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == p else f"lies under {str(probe)!r}, which is a file"
        raise ValueError(f"run.output_dir: {path!r} {where}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"run.output_dir: cannot write into {str(probe)!r} ({e.strerror or e})") from None


def loaded(what: str, path: str, load, key: str = "model.path"):
    """`load(path)`, with a failure named in one line: the key, what, where, and the loader's first line."""
    try:
        return load(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{key}: cannot load {what} from {path!r} ({type(e).__name__}: {first})") from e
