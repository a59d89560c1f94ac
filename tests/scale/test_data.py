"""scale.data: loading JSONL / parquet / folders, the column check per method, chat conversion, and
tokenisation with prompt masks and the prompt-length check."""

import json

import pytest

from scale.data import (
    DATA_KINDS,
    IGNORE,
    chat_to_prompt_completion,
    collate,
    load_data,
    require_columns,
    to_prompt_completion,
    tokenize_pairs,
)


@pytest.fixture(scope="module")
def tok():
    from toy.tiny import make_tokenizer

    return make_tokenizer()


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"prompt": "What is 1 + 2?\n", "completion": "1 + 2 = 3. The answer is \\boxed{3}.", "answer": "3"},
        {"prompt": "What is 2 + 2?\n", "completion": "2 + 2 = 4. The answer is \\boxed{4}.", "answer": "4"}]


def test_load_jsonl_parquet_and_folders(tmp_path):
    import datasets

    f = _write(tmp_path / "a.jsonl", ROWS)
    ds = load_data(f)
    assert ds.column_names == ["prompt", "completion", "answer"] and ds[1]["answer"] == "4"
    datasets.Dataset.from_list(ROWS).to_parquet(str(tmp_path / "b.parquet"))
    assert load_data(tmp_path / "b.parquet")[0] == ROWS[0]
    folder = tmp_path / "splits"
    folder.mkdir()
    _write(folder / "train.jsonl", ROWS)
    _write(folder / "test.jsonl", ROWS[:1])
    assert len(load_data(folder)) == 2 and len(load_data(folder, split="test")) == 1
    with pytest.raises(ValueError, match="split 'dev'"):
        load_data(folder, split="dev")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    assert len(load_data(tmp_path / "saved")) == 2


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_data(tmp_path / "missing.jsonl")
    for i, text in enumerate(["", "\n\n"]):
        (tmp_path / f"e{i}.jsonl").write_text(text)
        with pytest.raises(ValueError, match=f"e{i}.jsonl' is empty"):
            load_data(tmp_path / f"e{i}.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="cannot read .*broken.jsonl"):
        load_data(tmp_path / "broken.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="x.txt"):
        load_data(tmp_path / "x.txt")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        load_data(tmp_path / "nothing")


def test_require_columns_per_method(tmp_path):
    """Every registered method's data kind (and a joint method's preference set) is checked; the message
    names the method."""
    import datasets

    from scale.methods import get_method, method_names

    def check(ds, name, source=None):
        m = get_method(name)
        require_columns(ds, m.data, source=source, who=name)
        if m.pref_data:
            require_columns(ds, "dpo", source=source, who=name)

    f = _write(tmp_path / "sft.jsonl", ROWS)
    ds = load_data(f)
    for method in ("sft", "rl", "hpt", "luffy", "srft"):
        check(ds, method)
    require_columns(ds, "eval")
    for method in ("dpo", "sft_dpo"):
        with pytest.raises(ValueError, match=r"sft.jsonl lacks column\(s\) \['chosen', 'rejected'\]") as e:
            check(ds, method)
        assert repr(method) in str(e.value)
    no_answer = datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}])
    with pytest.raises(ValueError, match=r"my.jsonl lacks column\(s\) \['answer'\] needed by method 'rl'"):
        check(no_answer, "rl", source="my.jsonl")
    check(datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}]), "sft")
    with pytest.raises(ValueError, match="empty"):
        check(datasets.Dataset.from_dict({"prompt": [], "completion": []}), "sft")
    with pytest.raises(ValueError, match="kind"):
        require_columns(ds, "ppo2")
    assert set(method_names()) >= {"sft", "dpo", "rl", "hpt", "luffy", "srft", "sft_dpo"}
    assert {get_method(m).data for m in method_names()} <= set(DATA_KINDS)


def test_chat_conversion(tok):
    import datasets

    msgs = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "\\boxed{3}"}]
    p, c = chat_to_prompt_completion(msgs, tok)
    assert p == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n"
    assert c == "\\boxed{3}<|im_end|>\n"
    ds = to_prompt_completion(datasets.Dataset.from_list([{"messages": msgs, "answer": "3"}]), tok)
    assert ds.column_names == ["answer", "prompt", "completion"] and ds[0]["prompt"] == p
    conv = datasets.Dataset.from_list([{"prompt": msgs[:1], "answer": "3"}])
    assert to_prompt_completion(conv, tok)[0]["prompt"] == p
    with pytest.raises(ValueError, match="messages"):
        chat_to_prompt_completion([], tok)


def test_tokenize_pairs_masks_and_limits(tok):
    prompts, comps = [r["prompt"] for r in ROWS], [r["completion"] for r in ROWS]
    rows = tokenize_pairs(prompts, comps, tok, max_length=64)
    for r, p, c in zip(rows, prompts, comps):
        p_ids = tok(p, add_special_tokens=False)["input_ids"]
        assert r["prompt_len"] == len(p_ids) and r["input_ids"][: len(p_ids)] == p_ids
        assert r["labels"][: len(p_ids)] == [IGNORE] * len(p_ids)
        assert r["labels"][len(p_ids):] == r["input_ids"][len(p_ids):]
        assert r["input_ids"][-1] == tok.eos_token_id
        assert tok.decode(r["input_ids"]) == p + c + tok.eos_token    # nothing lost at the boundary
    short = tokenize_pairs(prompts, comps, tok, max_length=10)
    assert all(len(r["input_ids"]) == 10 for r in short)         # long completions are truncated
    with pytest.raises(ValueError, match="example 1: prompt has"):
        tokenize_pairs(["1\n", "What is 1 + 2 + 3 + 4 + 5 + 6?\n"], ["a", "b"], tok, max_length=64,
                       max_prompt_length=4)
    with pytest.raises(ValueError, match="example 0"):
        tokenize_pairs(prompts, comps, tok, max_length=5)             # no room for a completion


def test_collate_right_and_left(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = collate(rows, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[IGNORE, 6, 7], [8, IGNORE, IGNORE]]
    assert collate(rows, pad_id=0, left=True)["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
