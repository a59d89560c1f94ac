"""Data for the trainer: loading with `datasets`, TRL's column conventions, and tokenisation.

Columns (TRL's, `docs/ecosystem.md` section 1.5): `prompt`/`completion` (SFT and demonstrations),
`prompt`/`chosen`/`rejected` (DPO), `messages` (a conversation; converted to prompt/completion with the
tokenizer's chat template), plus `answer` for verifiable rewards. `DATA_KINDS` says which columns
each kind of data (a method's `data`) needs; `require_columns` checks them before any model loads.

Token layout of one example (`tokenize_pairs`): input_ids = prompt ids + completion ids (+ eos);
labels = -100 on the prompt, the completion ids after it. Prompt and completion are tokenised
separately, so the boundary is exact and matches what generation conditions on.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
from pathlib import Path

import numpy as np

IGNORE = -100
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# The kinds of data a method trains or evaluates on -> alternative column sets; a dataset has a kind when
# it has every column of one alternative. A method names its kind (`scale.methods.Method.data`).
DATA_KINDS: dict[str, tuple[set[str], ...]] = {
    "sft": ({"prompt", "completion"}, {"messages"}),             # demonstrations
    "dpo": ({"prompt", "chosen", "rejected"},),                   # preference pairs
    "rl": ({"prompt", "answer"},),                                # prompts with a verifiable answer
    "demo": ({"prompt", "answer", "completion"}, {"messages", "answer"}),   # both (HPT, LUFFY, SRFT)
    "eval": ({"prompt", "answer"}, {"messages", "answer"}),
}
COMPLETION_COLUMNS = {"sft": ("completion",), "dpo": ("chosen", "rejected"), "rl": (), "demo": ("completion",),
                      "eval": ()}


def load_data(path_or_dir: str | Path, split: str | None = None):
    """A `datasets.Dataset` from a JSONL/JSON/parquet/CSV file, a folder of such files (split named by
    the file stem: train.jsonl, test.parquet, ...), or a folder written by `Dataset.save_to_disk`.

    `split` picks a split of a folder (default "train", or the only one there).
    """
    import datasets

    path = Path(path_or_dir)
    if not path.exists():
        hub = str(path).count("/") == 1 and not str(path).startswith((".", "/", "~"))
        hint = (f"; ptlab reads local files and folders: save a Hub dataset first, e.g. `datasets.load_dataset("
                f"{str(path)!r}).save_to_disk('data/x')`, then use that folder") if hub else ""
        raise ValueError(f"data: path {str(path)!r} does not exist{hint}")
    if path.is_file() and _blank(path):
        raise ValueError(f"data: {str(path)!r} is empty")
    source = path  # the file actually read, named when it cannot be
    try:
        with _silenced("datasets"):  # its builders log the reader's error before raising; ours names the line
            if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[_pick_split(list(ds), split, path)]
            elif path.is_dir():
                files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in _FORMATS}
                if not files:
                    raise ValueError(f"data: folder {str(path)!r} holds no {'/'.join(_FORMATS)} file")
                source = files[_pick_split(list(files), split, path)]
                check_utf8(source)
                ds = datasets.load_dataset(_FORMATS[source.suffix], data_files=str(source), split="train")
            elif path.suffix in _FORMATS:
                check_utf8(path)
                ds = datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
            else:
                raise ValueError(f"data: {str(path)!r} is not a {'/'.join(_FORMATS)} file or a folder")
    except Exception as e:  # a malformed file: one line naming it (and the line), not a builder traceback
        if isinstance(e, ValueError) and not isinstance(e, UnicodeDecodeError):  # ours, already named
            raise
        if source.is_file():
            check_text_file(source)
        raise ValueError(f"data: cannot read {str(source)!r}: {type(e).__name__}: {_first_line(e)}") from e
    if len(ds) == 0:
        raise ValueError(f"data: {str(path)!r} is empty")
    ds.info.description = str(path)  # remembered so later errors can name the file
    return ds


@contextlib.contextmanager
def _silenced(logger: str):
    """Drop a library's log records below CRITICAL for the duration (restored after)."""
    lg = logging.getLogger(logger)
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(old)


def _blank(path: Path) -> bool:
    """True for an empty or whitespace-only text file (read as bytes until the first non-blank chunk: the
    encoding is checked later, where a bad byte can be named)."""
    if path.stat().st_size == 0:
        return True
    if path.suffix not in (".jsonl", ".json", ".csv"):
        return False
    with path.open("rb") as f:
        return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), b""))


def check_utf8(path: Path) -> None:
    """pyarrow's JSON and CSV readers accept bytes that are not UTF-8 and fail later, at some row, naming
    nothing: check a text file first, streaming (a decode runs at about 1 GB/s)."""
    import codecs

    from scale.config import read_utf8

    if path.suffix not in (".jsonl", ".json", ".csv"):
        return
    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                dec.decode(chunk)
            dec.decode(b"", final=True)
    except UnicodeDecodeError:
        read_utf8(path, "data")  # reads it whole to name the line and the byte
        raise


def check_text_file(path: Path) -> None:
    """Why a text data file cannot be read, named by line: bytes that are not UTF-8, a JSONL line that is not
    one JSON object, a JSON file that does not parse. Returns quietly when it finds nothing (the caller then
    reports the reader's own error). Runs only after a reader failed, so a large good file is read once."""
    import json

    from scale.config import read_utf8

    if path.suffix not in (".jsonl", ".json", ".csv"):
        return
    text = read_utf8(path, "data")
    where = f"data: cannot read {str(path)!r}:"
    if path.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} line {e.lineno} is not valid JSON ({e.msg} at column {e.colno})") from None
        return
    if path.suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where} line {i} is not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} line {i} holds a {type(row).__name__}, not a JSON object") from None


def _first_line(e: BaseException) -> str:
    """The first line of an error, and of the error that caused it when that says more (datasets wraps the
    reader's error in a DatasetGenerationError that names nothing)."""
    cause = e.__cause__ or e.__context__
    text = str(cause if cause is not None and str(cause) else e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _pick_split(names: list[str], split: str | None, path: Path) -> str:
    if split is None:
        split = "train" if "train" in names or len(names) != 1 else names[0]
    if split not in names:
        raise ValueError(f"data: split {split!r} not in {str(path)!r} (found {sorted(names)})")
    return split


def require_columns(ds, kind: str, source: str | None = None, who: str | None = None) -> None:
    """Raise ValueError unless `ds` is non-empty and has the columns of data kind `kind` (naming the
    missing ones, the file, `source` or the path `load_data` recorded, and `who` needs them: a method)."""
    if kind not in DATA_KINDS:
        raise ValueError(f"data kind: expected one of {sorted(DATA_KINDS)}, got {kind!r}")
    source = source or getattr(getattr(ds, "info", None), "description", None) or "the dataset"
    if len(ds) == 0:
        raise ValueError(f"data: {source} is empty")
    have = set(ds.column_names)
    options = DATA_KINDS[kind]
    if any(need <= have for need in options):
        return
    missing = min((sorted(need - have) for need in options), key=len)
    alts = " or ".join("/".join(sorted(n)) for n in options)
    raise ValueError(f"data: {source} lacks column(s) {missing} needed by method {who or kind!r} "
                     f"(needs {alts}; has {sorted(have)})")


TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "answer", "messages")
# columns a reward function does not get among the data's other columns: the text the trainer uses itself
# (`answer` arrives as text on its own), and the keywords of the call (`scale.rewards.CALL_KEYS`)
OWN_COLUMNS = (*TEXT_COLUMNS, "prompts", "completions", "completion_ids", "trainer_state")


def check_text_columns(ds, source: str) -> None:
    """Each row's text columns hold text: a prompt or `messages` may also be a list of {role, content}
    messages, an answer a number. A missing value (None) would otherwise be trained on as the text "None",
    and a number in a prompt fail in the chat template with a TypeError that names nothing."""
    for col in (c for c in TEXT_COLUMNS if c in ds.column_names):
        for i, v in enumerate(ds[col]):
            if isinstance(v, str) or (col == "answer" and isinstance(v, (int, float)) and not isinstance(v, bool)):
                continue
            if col in ("prompt", "messages") and isinstance(v, list) and v and all(isinstance(m, dict) for m in v):
                continue
            want = "text or a list of {role, content} messages" if col in ("prompt", "messages") else "text"
            name = type(v).__name__
            got = "nothing (the key is missing or null)" if v is None else \
                f"{'an' if name[0] in 'aeiou' else 'a'} {name} ({v!r:.40})"
            raise ValueError(f"data: {source}: {_where(source, i)}: column {col!r} holds {got}; expected {want}")


def _where(source: str, i: int) -> str:
    """Example `i` (0-based), with its line number when `source` is a JSON-lines file (blank lines skipped, as
    the reader skips them)."""
    path = Path(source)
    if path.suffix == ".jsonl" and path.is_file():
        seen = -1
        with path.open(encoding="utf-8", errors="replace") as f:
            for line_no, line in enumerate(f, 1):
                seen += bool(line.strip())
                if seen == i:
                    return f"example {i} (line {line_no})"
    return f"example {i}"


def chat_to_prompt_completion(messages: list[dict], tokenizer) -> tuple[str, str]:
    """Split a conversation at its last message: prompt = the chat template of the earlier messages with
    the generation prompt; completion = the rest of the fully templated text (so it keeps the template's
    end-of-turn marker)."""
    if not messages or not isinstance(messages, list):
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("messages: the tokenizer has no chat template to render conversations with")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise ValueError("messages: the chat template does not render the prompt as a prefix of the conversation")
    return prompt, full[len(prompt):]


def render_prompt(prompt, tokenizer) -> str:
    """A prompt as text: strings pass through; a list of messages goes through the chat template."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def to_prompt_completion(ds, tokenizer):
    """Replace a `messages` column by text `prompt` and `completion` columns (other columns kept), and
    render conversational prompts (lists of messages) as text. Datasets without either pass through."""
    if "messages" in ds.column_names and "prompt" not in ds.column_names:
        def split(ex):
            p, c = chat_to_prompt_completion(ex["messages"], tokenizer)
            return {"prompt": p, "completion": c}
        return ds.map(split, remove_columns=["messages"])
    if "prompt" in ds.column_names and len(ds) and not isinstance(ds[0]["prompt"], str):
        return ds.map(lambda ex: {"prompt": render_prompt(ex["prompt"], tokenizer)})
    return ds


def _prompt_limit(max_length: int, max_prompt_length: int | None) -> int:
    if max_length < 2:
        raise ValueError(f"max_length: expected >= 2, got {max_length}")
    return min(max_prompt_length or max_length - 1, max_length - 1)


def _check_prompt(i: int, n: int, limit: int, max_length: int, max_prompt_length: int | None) -> None:
    if n > limit:
        raise ValueError(f"example {i}: prompt has {n} tokens, more than the limit {limit} "
                         f"(max_prompt_length={max_prompt_length}, max_length={max_length})")


def _completion(p: list[int], c: list[int], eos: int | None, max_length: int, add_eos: bool) -> list[int]:
    """The completion ids kept after prompt `p`: an eos appended when missing, then cut to fit max_length."""
    if add_eos and eos is not None and (not c or c[-1] != eos):
        c = c + [eos]
    return c[: max_length - len(p)]


def tokenize_pairs(prompts: list[str], completions: list[str], tokenizer, max_length: int,
                   max_prompt_length: int | None = None, add_eos: bool = True) -> list[dict]:
    """Tokenise prompt/completion pairs: one dict per pair with input_ids, labels (IGNORE on the prompt)
    and prompt_len. A prompt longer than `max_prompt_length`, or leaving no room for a completion token in
    `max_length`, raises ValueError naming the example index; a long completion is truncated.
    (`prepare_data` applies the same rules a chunk at a time and stores the result in flat arrays.)"""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions: expected equal lengths, got {len(prompts)} and {len(completions)}")
    limit = _prompt_limit(max_length, max_prompt_length)
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        _check_prompt(i, len(p), limit, max_length, max_prompt_length)
        c = _completion(p, c, tokenizer.eos_token_id, max_length, add_eos)
        out.append({"input_ids": p + c, "labels": [IGNORE] * len(p) + c, "prompt_len": len(p)})
    return out


def collate(rows: list[dict], pad_id: int, left: bool = False) -> dict:
    """Pad a list of `tokenize_pairs` rows into tensors input_ids, attention_mask, labels [B, T]
    (right padding for training; `left=True` for generation)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        sl = slice(width - n, width) if left else slice(0, n)
        ids[i, sl] = torch.tensor(r["input_ids"])
        labels[i, sl] = torch.tensor(r.get("labels", r["input_ids"]))
        mask[i, sl] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _dotted(ex: dict, key: str):
    from collections.abc import Mapping

    v = ex
    for part in key.split("."):   # Mapping: datasets' map passes rows as LazyRow, not dict
        if not isinstance(v, Mapping) or part not in v:
            raise ValueError(f"data.columns: source column {key!r} not found in the data")
        v = v[part]
    return v


def prepare_data(path: str, cfg, tokenizer, kind: str, context: int, limit: int | None = None,
                 columns: dict | None = None, keep: tuple[str, ...] = (), max_new_tokens: int = 0,
                 who: str | None = None, other_columns: bool = False):
    """Load, map columns, check columns (of data kind `kind`, for `who`) / emptiness / lengths, tokenise.
    Returns a `scale.token_store.TokenData`: a sequence of examples, each a dict with the columns named in
    `keep` copied where present (e.g. an evaluation set's id and level), the formatted prompt, the answer,
    prompt_ids and, per completion column of the kind, {input_ids, labels, prompt_len}. With `max_new_tokens`
    > 0 (data that is sampled from), every prompt plus that many new tokens must fit the model's context.
    With `other_columns`, each example also has "columns": the data's columns other than `OWN_COLUMNS`, as
    they are (what reward functions get, as in TRL).

    The token ids live in flat arrays in a cache folder (`data.cache_dir`), built by the first process that
    needs them and memory-mapped by all (scale/token_store.py); a cache whose key (data file, tokenizer,
    these settings) does not match is rebuilt."""
    from scale import token_store

    d = cfg.data
    columns = d.columns if columns is None else columns
    limit = d.limit if limit is None else limit
    max_len = min(d.max_length, context)
    settings = dict(split=d.split, columns=dict(columns or {}), limit=limit, kind=kind, keep=list(keep),
                    other_columns=other_columns, prompt_template=d.prompt_template, chat_template=d.chat_template,
                    max_prompt_length=d.max_prompt_length, max_length=max_len)
    if not Path(path).exists():
        load_data(path)   # names the missing path (and the Hub hint)
    key = token_store.cache_key(path, tokenizer, **settings)
    data = token_store.load_or_build(
        key, lambda folder: _build(folder, path, cfg, tokenizer, kind, columns, limit, max_len, keep,
                                   other_columns, who), d.cache_dir or None)
    if max_new_tokens:
        over = np.flatnonzero(data.prompt_lengths() + max_new_tokens > context)
        if over.size:
            i = int(over[0])
            raise ValueError(f"data: {path}: example {i}: prompt has {int(data.prompt_lengths()[i])} tokens; with "
                             f"max_new_tokens={max_new_tokens} it exceeds the context of {context} tokens")
    return data


def _build(folder: Path, path: str, cfg, tokenizer, kind: str, columns: dict, limit: int, max_len: int,
           keep: tuple[str, ...], other_columns: bool, who: str | None) -> dict:
    """Write the token cache of one data set into `folder` (scale/token_store.py), CHUNK_ROWS rows at a time,
    with the rules of `tokenize_pairs`; returns the meta fields."""
    d = cfg.data
    ds = load_data(path, d.split if d.split else None)
    if columns:
        first = ds[0]
        for src in columns.values():
            _dotted(first, src)
        ds = ds.map(lambda ex: {dst: _dotted(ex, src) for dst, src in columns.items()})
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    require_columns(ds, kind, source=str(path), who=who)
    check_text_columns(ds, str(path))
    ds = to_prompt_completion(ds, tokenizer)

    def fmt(p):
        if d.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
        return d.prompt_template.format(prompt=p)

    try:
        return _write_tokens(folder, ds, fmt, tokenizer, kind, max_len, d.max_prompt_length, keep, other_columns)
    except ValueError as e:   # a prompt too long for the limits: named with the file
        raise ValueError(f"data: {path}: {e}") from None


def _write_tokens(folder: Path, ds, fmt, tokenizer, kind: str, max_len: int, max_prompt_length: int | None,
                  keep: tuple[str, ...], other_columns: bool) -> dict:
    from scale.token_store import CHUNK_ROWS, ArrayWriter, write_array

    cols = COMPLETION_COLUMNS[kind]
    p_limit = _prompt_limit(max_len, max_prompt_length)
    eos = tokenizer.eos_token_id
    extra = bool(keep) or other_columns
    names = [("prompt_tok", np.int32), *[(f"{c}_tok", np.int32) for c in cols], ("prompt_txt", np.uint8),
             ("answer_txt", np.uint8)] + ([("extra_pkl", np.uint8)] if extra else [])
    w = {name: ArrayWriter(folder, name, dt) for name, dt in names}
    ref_cols = ("ref_chosen_logp", "ref_rejected_logp")
    has_ref = [k in ds.column_names for k in ref_cols]
    ref = np.full((len(ds), 2), np.nan)
    for s in range(0, len(ds), CHUNK_ROWS):
        batch = ds[s:s + CHUNK_ROWS]
        rows = [dict(zip(batch, v)) for v in zip(*batch.values())]
        prompts = [fmt(r["prompt"]) for r in rows]
        p_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        for i, p in enumerate(p_ids):
            _check_prompt(s + i, len(p), p_limit, max_len, max_prompt_length)
        for c in cols:
            c_ids = tokenizer([str(r[c]) for r in rows], add_special_tokens=False)["input_ids"]
            for p, ci in zip(p_ids, c_ids):
                w[f"{c}_tok"].add(_completion(p, ci, eos, max_len, True))
        for i, (r, p, text) in enumerate(zip(rows, p_ids, prompts)):
            w["prompt_tok"].add(p)
            w["prompt_txt"].add(text.encode("utf-8"))
            w["answer_txt"].add(str(r.get("answer", "")).encode("utf-8"))
            if extra:
                e = {k: r[k] for k in keep if r.get(k) is not None}
                if other_columns:
                    e["columns"] = {k: v for k, v in r.items() if k not in OWN_COLUMNS}
                w["extra_pkl"].add(pickle.dumps(e, protocol=pickle.HIGHEST_PROTOCOL))
            for j, k in enumerate(ref_cols):
                if has_ref[j]:
                    ref[s + i, j] = float(r[k])
        del batch, rows, prompts, p_ids
    arrays = {}
    for wr in w.values():
        arrays.update(wr.close())
    arrays.update(write_array(folder, "ref_logp", ref))
    return {"n": len(ds), "cols": list(cols), "keep": list(keep), "extra": extra, "ref_columns": has_ref,
            "arrays": arrays}
