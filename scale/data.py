"""Data for the trainer: loading with `datasets`, TRL's column conventions, and tokenisation.

Columns (TRL's, `ecosystem.md` section 1.5): `prompt`/`completion` (SFT and demonstrations),
`prompt`/`chosen`/`rejected` (DPO), `messages` (a conversation; converted to prompt/completion with the
tokenizer's chat template), plus `answer` for verifiable rewards. `METHOD_COLUMNS` says which columns
each trainer method needs; `require_columns` checks them before any model loads.

Token layout of one example (`tokenize_pairs`): input_ids = prompt ids + completion ids (+ eos);
labels = -100 on the prompt, the completion ids after it. Prompt and completion are tokenised
separately, so the boundary is exact and matches what generation conditions on.
"""

from __future__ import annotations

from pathlib import Path

IGNORE = -100
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

_SFT = ({"prompt", "completion"}, {"messages"})
_DPO = ({"prompt", "chosen", "rejected"},)
_RL = ({"prompt", "answer"},)
_DEMO = ({"prompt", "answer", "completion"}, {"messages", "answer"})
_JOINT = ({"prompt", "completion", "chosen", "rejected"},)
# method -> alternatives; a dataset satisfies the method when it has every column of one alternative.
METHOD_COLUMNS: dict[str, tuple[set[str], ...]] = {
    "sft": _SFT, "dpo": _DPO, "rl": _RL, "hpt": _DEMO, "luffy": _DEMO, "srft": _DEMO,
    "sequential": _JOINT, "mix": _JOINT, "alright": _JOINT, "maxright": _JOINT,
    "eval": ({"prompt", "answer"}, {"messages", "answer"}),
}


def load_data(path_or_dir: str | Path, split: str | None = None):
    """A `datasets.Dataset` from a JSONL/JSON/parquet/CSV file, a folder of such files (split named by
    the file stem: train.jsonl, test.parquet, ...), or a folder written by `Dataset.save_to_disk`.

    `split` picks a split of a folder (default "train", or the only one there).
    """
    import datasets

    path = Path(path_or_dir)
    if not path.exists():
        raise ValueError(f"data: path {str(path)!r} does not exist")
    if path.is_file() and _blank(path):
        raise ValueError(f"data: {str(path)!r} is empty")
    try:
        if path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[_pick_split(list(ds), split, path)]
        elif path.is_dir():
            files = {p.stem: p for p in sorted(path.iterdir()) if p.suffix in _FORMATS}
            if not files:
                raise ValueError(f"data: folder {str(path)!r} holds no {'/'.join(_FORMATS)} file")
            f = files[_pick_split(list(files), split, path)]
            ds = datasets.load_dataset(_FORMATS[f.suffix], data_files=str(f), split="train")
        elif path.suffix in _FORMATS:
            ds = datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            raise ValueError(f"data: {str(path)!r} is not a {'/'.join(_FORMATS)} file or a folder")
    except ValueError:
        raise
    except Exception as e:  # an empty or malformed file: one line naming it, not a builder traceback
        raise ValueError(f"data: cannot read {str(path)!r}: {type(e).__name__}: {e}") from e
    if len(ds) == 0:
        raise ValueError(f"data: {str(path)!r} is empty")
    ds.info.description = str(path)  # remembered so later errors can name the file
    return ds


def _blank(path: Path) -> bool:
    """True for an empty or whitespace-only text file (read until the first non-blank chunk)."""
    if path.stat().st_size == 0:
        return True
    if path.suffix not in (".jsonl", ".json", ".csv"):
        return False
    with path.open() as f:
        return not any(chunk.strip() for chunk in iter(lambda: f.read(1 << 16), ""))


def _pick_split(names: list[str], split: str | None, path: Path) -> str:
    if split is None:
        split = "train" if "train" in names or len(names) != 1 else names[0]
    if split not in names:
        raise ValueError(f"data: split {split!r} not in {str(path)!r} (found {sorted(names)})")
    return split


def require_columns(ds, method: str, source: str | None = None) -> None:
    """Raise ValueError unless `ds` is non-empty and has the columns `method` needs (naming the missing
    ones and the file, `source` or the path `load_data` recorded)."""
    if method not in METHOD_COLUMNS:
        raise ValueError(f"method: expected one of {sorted(METHOD_COLUMNS)}, got {method!r}")
    source = source or getattr(getattr(ds, "info", None), "description", None) or "the dataset"
    if len(ds) == 0:
        raise ValueError(f"data: {source} is empty")
    have = set(ds.column_names)
    options = METHOD_COLUMNS[method]
    if any(need <= have for need in options):
        return
    missing = min((sorted(need - have) for need in options), key=len)
    alts = " or ".join("/".join(sorted(n)) for n in options)
    raise ValueError(f"data: {source} lacks column(s) {missing} needed by method {method!r} "
                     f"(needs {alts}; has {sorted(have)})")


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


def tokenize_pairs(prompts: list[str], completions: list[str], tokenizer, max_length: int,
                   max_prompt_length: int | None = None, add_eos: bool = True) -> list[dict]:
    """Tokenise prompt/completion pairs: one dict per pair with input_ids, labels (IGNORE on the prompt)
    and prompt_len. A prompt longer than `max_prompt_length`, or leaving no room for a completion token in
    `max_length`, raises ValueError naming the example index; a long completion is truncated."""
    if len(prompts) != len(completions):
        raise ValueError(f"prompts and completions: expected equal lengths, got {len(prompts)} and {len(completions)}")
    if max_length < 2:
        raise ValueError(f"max_length: expected >= 2, got {max_length}")
    limit = min(max_prompt_length or max_length - 1, max_length - 1)
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for i, (p, c) in enumerate(zip(p_ids, c_ids)):
        if len(p) > limit:
            raise ValueError(f"example {i}: prompt has {len(p)} tokens, more than the limit {limit} "
                             f"(max_prompt_length={max_prompt_length}, max_length={max_length})")
        if add_eos and eos is not None and (not c or c[-1] != eos):
            c = c + [eos]
        c = c[: max_length - len(p)]
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
