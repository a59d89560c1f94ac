"""Tokenised data in flat numpy arrays, written once to a cache folder and memory-mapped by every process.

`prepare_data` (scale/data.py) used to keep each example as Python lists of ints (about 165 bytes of host
memory per token, per process). Here the examples of one data set live in a handful of flat arrays:

  prompt_tok / prompt_off         int32 token ids of every prompt, and int64 offsets (n + 1)
  <col>_tok / <col>_off           the same for each completion column (completion, or chosen and rejected)
  prompt_txt, answer_txt (+ _off) the formatted prompt and the answer as UTF-8 bytes
  extra_pkl (+ _off)              per example, the pickled dict of the kept columns and the data's other
                                  columns (only when asked for: evaluation ids, what reward functions get)
  ref_logp                        float64 [n, 2]: ref_chosen_logp / ref_rejected_logp from the data (NaN: absent)

Each array is a raw file in one folder, memory-mapped read-only, so the page cache holds one copy per
machine however many processes read it; a process's own memory holds only the rows it is using.
`TokenData[i]` rebuilds the example dict the trainer has always used (input_ids, labels with IGNORE on the
prompt, prompt_len, prompt_ids, prompt, answer, ...), as Python lists, on demand.

The cache folder is named by a hash of everything the arrays depend on (`cache_key`: the data file's path,
size, modification time and a content digest, the tokenizer's full serialisation, the templates, the
lengths, the columns, the limit, the format version). Its `meta.json` repeats the key and records each
file's size and BLAKE2 digest; a folder whose meta, sizes or digests do not match is rebuilt, never used.
The first process to find no valid folder builds it under a file lock (others wait, then map it), in a
temporary folder renamed into place, so no process ever sees half a cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

IGNORE = -100
FORMAT = 1                  # bump when the layout or the tokenisation rules change: old folders stop matching
CHUNK_ROWS = 1024           # rows tokenised at a time while building (bounds the tokenizer's working memory)
FULL_DIGEST_BYTES = 256 << 20   # data files up to this size are hashed whole for the key; larger: head and tail


def default_cache_dir() -> Path:
    """`$PTLAB_DATA_CACHE`, else ~/.cache/ptlab/tokens."""
    env = os.environ.get("PTLAB_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ptlab" / "tokens"


# ------------------------------------------------------------------------------------------ the cache key
def _file_digest(path: Path, whole: bool) -> str:
    h = hashlib.blake2b(digest_size=16)
    size = path.stat().st_size
    with path.open("rb") as f:
        if whole or size <= 2 * (1 << 20):
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:   # a large file: its first and last MiB (with size and mtime in the key, edits still show)
            h.update(f.read(1 << 20))
            f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
    return h.hexdigest()


def data_fingerprint(path: str | Path) -> list:
    """What identifies the data's content: for each file (the file itself, or every file under a folder) its
    path relative to `path`, size, modification time in ns and a digest (of the whole file when the data
    totals at most FULL_DIGEST_BYTES, else of its first and last MiB). The digest catches a rewrite of the
    same size within the file system's timestamp resolution (a few ms)."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    out = []
    for p in files:
        st = p.stat()
        out.append([str(p.relative_to(path)) if p != path else "", st.st_size, st.st_mtime_ns,
                    _file_digest(p, total <= FULL_DIGEST_BYTES)])
    return [str(path), out]


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything about the tokenizer that changes token ids or rendered prompts: its class, its
    full serialisation (vocabulary, merges, normaliser, pre-tokeniser, added tokens) for a fast tokenizer,
    else its vocabulary and special tokens, plus the eos id and the chat template."""
    h = hashlib.blake2b(digest_size=16)
    h.update(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([str(tokenizer.eos_token_id), str(getattr(tokenizer, "chat_template", None)),
                         sorted(map(str, tokenizer.all_special_tokens)),
                         str(getattr(tokenizer, "added_tokens_decoder", ""))]).encode())
    return h.hexdigest()


def cache_key(path, tokenizer, **settings) -> dict:
    """The full key (stored in meta.json and compared on load); its hash names the folder."""
    return {"format": FORMAT, "data": data_fingerprint(path), "tokenizer": tokenizer_fingerprint(tokenizer),
            **{k: settings[k] for k in sorted(settings)}}


def key_name(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


# ------------------------------------------------------------------------------------------ the data
class TokenData(Sequence):
    """The tokenised examples of one data set (module doc). Indexing gives the example dict; a slice a list
    of them. Reference log-probs computed by the trainer (`set_ref_logps`) are kept in this process's memory."""

    def __init__(self, folder: Path, meta: dict):
        self.folder, self.meta = Path(folder), meta
        self.n = int(meta["n"])
        self.cols: list[str] = list(meta["cols"])
        self.keep: list[str] = list(meta["keep"])
        self.has_extra = bool(meta["extra"])
        self._a = {name: _map(self.folder / f"{name}.bin", spec) for name, spec in meta["arrays"].items()}
        self.ref = np.array(self._a["ref_logp"], dtype=np.float64)   # writable copy: precompute fills it
        self.has_ref = [bool(x) for x in meta["ref_columns"]]

    def __len__(self) -> int:
        return self.n

    def _span(self, name: str, i: int) -> np.ndarray:
        off = self._a[name + "_off"]
        return self._a[name][int(off[i]):int(off[i + 1])]

    def _text(self, name: str, i: int) -> str:
        return bytes(self._span(name, i)).decode("utf-8")

    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self._a["prompt_tok_off"])

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        i = int(i)
        if i < 0:
            i += self.n
        if not 0 <= i < self.n:
            raise IndexError(f"example {i} of {self.n}")
        p = self._span("prompt_tok", i).tolist()
        ex = {"prompt": self._text("prompt_txt", i), "answer": self._text("answer_txt", i)}
        if self.has_extra:
            ex.update(pickle.loads(bytes(self._span("extra_pkl", i))))
        for c in self.cols:
            comp = self._span(f"{c}_tok", i).tolist()
            ex[c] = {"input_ids": p + comp, "labels": [IGNORE] * len(p) + comp, "prompt_len": len(p)}
        ex["prompt_ids"] = p
        for j, k in enumerate(("ref_chosen_logp", "ref_rejected_logp")):
            if self.has_ref[j] or not np.isnan(self.ref[i, j]):
                ex[k] = float(self.ref[i, j])
        return ex

    def set_ref_logps(self, i: int, chosen: float, rejected: float) -> None:
        self.ref[i] = (chosen, rejected)

    def nbytes(self) -> int:
        """Bytes of the mapped files (shared by every process on the machine)."""
        return sum(int(a.nbytes) for a in self._a.values())

    def n_tokens(self) -> int:
        """Token ids stored: prompts once, plus every completion column."""
        return int(self._a["prompt_tok"].size + sum(self._a[f"{c}_tok"].size for c in self.cols))


def _map(path: Path, spec: dict) -> np.ndarray:
    dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
    if int(np.prod(shape)) == 0:   # np.memmap refuses empty files
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


# ------------------------------------------------------------------------------------------ load or build
class CacheError(Exception):
    """A cache folder that does not match (a reason for rebuilding it)."""


def validate(folder: Path, key: dict) -> dict:
    """The folder's meta when the folder is a complete cache for `key`; CacheError saying why not."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise CacheError("no meta.json")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise CacheError(f"meta.json unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("key") != key:
        raise CacheError("meta.json records another key")
    try:
        if not isinstance(meta.get("arrays"), dict):
            raise CacheError("meta.json lists no arrays")
        for name, spec in meta["arrays"].items():
            f = folder / f"{name}.bin"
            want = int(np.prod(spec["shape"])) * np.dtype(spec["dtype"]).itemsize
            if not f.is_file() or f.stat().st_size != want:
                raise CacheError(f"{f.name}: expected {want} bytes, found "
                                 f"{f.stat().st_size if f.is_file() else 'no file'}")
            if _digest(f) != spec["digest"]:
                raise CacheError(f"{f.name}: content digest differs")
    except (KeyError, TypeError, ValueError) as e:
        raise CacheError(f"meta.json incomplete ({e})") from None
    except OSError as e:   # a file removed while being checked (another process rebuilding it)
        raise CacheError(f"unreadable ({e})") from None
    return meta


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:   # plain reads: the pages go to the page cache, not this process's memory
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive advisory lock on `path` (fcntl; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:   # pragma: no cover - not POSIX
        yield
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_or_build(key: dict, build, cache_dir: str | Path | None = None) -> TokenData:
    """The cached data for `key`, building it with `build(folder) -> meta fields` when there is no valid
    cache (an invalid one is removed first, with a note on stderr)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / key_name(key)
    try:
        return TokenData(folder, validate(folder, key))
    except CacheError:
        pass
    with _lock(root / f"{folder.name}.lock"):
        try:   # another process may have built it while this one waited
            return TokenData(folder, validate(folder, key))
        except CacheError as e:
            if folder.exists():
                print(f"ptlab: rebuilding the token cache {folder} ({e})", file=sys.stderr, flush=True)
                shutil.rmtree(folder)
        tmp = root / f"{folder.name}.tmp{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            meta = build(tmp)
            meta["key"] = key
            for name, spec in meta["arrays"].items():
                spec["digest"] = _digest(tmp / f"{name}.bin")
            (tmp / "meta.json").write_text(json.dumps(meta))
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _trim_heap()
    return TokenData(folder, validate(folder, key))


def _trim_heap() -> None:
    """Hand the memory the tokenizer freed back to the system (glibc keeps freed blocks otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass


class ArrayWriter:
    """Appends rows of one variable-length field to `<name>.bin`, recording offsets (`<name>_off`)."""

    def __init__(self, folder: Path, name: str, dtype):
        self.folder, self.name, self.dtype = folder, name, np.dtype(dtype)
        self.f = (folder / f"{name}.bin").open("wb")
        self.offsets = [0]
        self.size = 0

    def add(self, values) -> None:
        a = np.asarray(values, dtype=self.dtype) if not isinstance(values, bytes) else \
            np.frombuffer(values, dtype=np.uint8)
        self.f.write(a.tobytes())
        self.size += a.size
        self.offsets.append(self.size)

    def close(self) -> dict:
        self.f.close()
        off = np.asarray(self.offsets, dtype=np.int64)
        off.tofile(self.folder / f"{self.name}_off.bin")
        return {self.name: {"dtype": self.dtype.str, "shape": [self.size]},
                f"{self.name}_off": {"dtype": off.dtype.str, "shape": [off.size]}}


def write_array(folder: Path, name: str, a: np.ndarray) -> dict:
    a.tofile(folder / f"{name}.bin")
    return {name: {"dtype": a.dtype.str, "shape": list(a.shape)}}
