"""scale.token_store / scale.data.prepare_data: the tokenised data kept in memory-mapped flat arrays.

The rows must be exactly what a plain tokenisation gives (written out here without ptlab's helpers), across
chunk boundaries; a cache must be reused only for the same data, tokenizer and settings, and a damaged one
rebuilt, never read."""

import json
import threading

import numpy as np
import pytest

from scale import token_store
from scale.config import Config
from scale.data import IGNORE, prepare_data


@pytest.fixture(scope="module")
def tok():
    from toy.tiny import make_tokenizer

    return make_tokenizer()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("PTLAB_DATA_CACHE", str(d))
    monkeypatch.setattr(token_store, "CHUNK_ROWS", 3)   # several chunks even for a few rows
    return d


def _cfg(**data):
    cfg = Config()
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n=11, seed=0):
    """SFT/DPO/RL columns at varied lengths: some completions longer than max_length, one ending in eos
    already, plus columns a reward function would get (nested, numbers, None) and an evaluation id."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a, b = int(rng.integers(0, 99)), int(rng.integers(0, 99))
        steps = " ".join(f"{a} + {k} = {a + k}." for k in range(int(rng.integers(0, 12)) if i != 2 else 0))
        comp = f"{steps} The answer is \\boxed{{{a + b}}}." + ("<|endoftext|>" if i == 2 else "")
        out.append({"prompt": f"What is {a} + {b}?\n" + "Think step by step. " * int(rng.integers(0, 3)),
                    "completion": comp, "chosen": comp, "rejected": f"{a} + {b} = {a * b}." * (i % 4 + 1),
                    "answer": str(a + b), "id": f"q{i}" if i != 5 else None, "level": i % 3,
                    "meta": {"source": "toy", "k": [i, i + 1]}, "weight_hint": None if i == 3 else 0.5 * i})
    return out


def _reference(rows, tok, kind, max_length, max_prompt_length=512, template="{prompt}", keep=(), other=False):
    """The example dicts, tokenised one row at a time with the tokenizer alone."""
    own = {"prompt", "completion", "chosen", "rejected", "answer", "messages", "prompts", "completions",
           "completion_ids", "trainer_state"}
    cols = {"sft": ["completion"], "dpo": ["chosen", "rejected"], "rl": []}[kind]
    eos = tok.eos_token_id
    out = []
    for r in rows:
        prompt = template.format(prompt=r["prompt"])
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        assert len(p) <= min(max_prompt_length, max_length - 1)
        ex = {"prompt": prompt, "answer": str(r.get("answer", ""))}
        ex.update({k: r[k] for k in keep if r.get(k) is not None})
        if other:
            ex["columns"] = {k: v for k, v in r.items() if k not in own}
        for c in cols:
            ids = tok(str(r[c]), add_special_tokens=False)["input_ids"]
            if not ids or ids[-1] != eos:
                ids = ids + [eos]
            ids = ids[:max_length - len(p)]
            ex[c] = {"input_ids": p + ids, "labels": [IGNORE] * len(p) + ids, "prompt_len": len(p)}
        ex["prompt_ids"] = p
        out.append(ex)
    return out


@pytest.mark.parametrize("kind,keep,other", [("sft", (), False), ("dpo", (), False), ("rl", ("id", "level"), True)])
def test_rows_equal_a_plain_tokenisation(tmp_path, tok, cache, kind, keep, other):
    rows = _rows()
    f = _write(tmp_path / "d.jsonl", rows)
    cfg = _cfg(path=str(f), max_length=40, prompt_template="Q: {prompt}")
    data = prepare_data(str(f), cfg, tok, kind, context=128, keep=keep, other_columns=other)
    want = _reference(rows, tok, kind, 40, template="Q: {prompt}", keep=keep, other=other)
    assert len(data) == len(want)
    got = [data[i] for i in range(len(data))]
    assert got == want
    assert data[-1] == want[-1] and data[2:5] == want[2:5]
    if kind != "rl":   # the cases the rules are about occur: truncated rows, and the row ending in eos
        c = "completion" if kind == "sft" else "chosen"
        assert any(len(e[c]["input_ids"]) == 40 for e in got)
        assert got[2][c]["input_ids"].count(tok.eos_token_id) == 1
    assert isinstance(data._a["prompt_tok"], np.memmap)   # mapped from the cache, not held in the process
    with pytest.raises(IndexError):
        data[len(data)]


def test_limit_columns_and_max_new_tokens(tmp_path, tok, cache):
    rows = [{"q": {"text": r["prompt"]}, "sol": r["completion"], "answer": r["answer"]} for r in _rows()]
    f = _write(tmp_path / "d.jsonl", rows)
    cfg = _cfg(path=str(f), max_length=64, columns={"prompt": "q.text", "completion": "sol"}, limit=7)
    data = prepare_data(str(f), cfg, tok, "sft", context=128)
    plain = [{"prompt": r["q"]["text"], "completion": r["sol"], "answer": r["answer"]} for r in rows[:7]]
    assert [data[i] for i in range(len(data))] == _reference(plain, tok, "sft", 64)
    longest = max(len(e["prompt_ids"]) for e in data)
    with pytest.raises(ValueError, match=r"d.jsonl: example \d+: prompt has .* exceeds the context of 128"):
        prepare_data(str(f), cfg, tok, "sft", context=128, max_new_tokens=128 - longest + 1)
    with pytest.raises(ValueError, match=r"d.jsonl: example \d+: prompt has \d+ tokens, more than the limit 3"):
        prepare_data(str(f), _cfg(path=str(f), max_length=64, max_prompt_length=3, columns=cfg.data.columns),
                     tok, "sft", context=128)


def _folders(cache):
    return sorted(p.name for p in cache.iterdir() if p.is_dir())


def test_cache_is_reused_only_for_the_same_key(tmp_path, tok, cache, monkeypatch):
    rows = _rows()
    f = _write(tmp_path / "d.jsonl", rows)
    cfg = _cfg(path=str(f), max_length=40)
    builds = []
    real = token_store.load_or_build

    def counting(key, build, cache_dir=None):
        return real(key, lambda folder: (builds.append(1), build(folder))[1], cache_dir)

    monkeypatch.setattr(token_store, "load_or_build", counting)
    first = prepare_data(str(f), cfg, tok, "sft", context=128)
    again = prepare_data(str(f), cfg, tok, "sft", context=128)
    assert len(builds) == 1 and len(_folders(cache)) == 1 and again[4] == first[4]
    # each setting the rows depend on gives another folder
    prepare_data(str(f), _cfg(path=str(f), max_length=41), tok, "sft", context=128)
    prepare_data(str(f), _cfg(path=str(f), max_length=40, prompt_template="Q: {prompt}"), tok, "sft", context=128)
    prepare_data(str(f), cfg, tok, "sft", context=128, limit=5)
    prepare_data(str(f), cfg, tok, "dpo", context=128)
    from toy.tiny import make_tokenizer

    other_tok = make_tokenizer(vocab_size=300)
    got = prepare_data(str(f), cfg, other_tok, "sft", context=128)
    assert got[0] == _reference(rows[:1], other_tok, "sft", 40)[0]
    assert len(builds) == 6 and len(_folders(cache)) == 6
    # the same file rewritten with other text of the same size: new rows, not the cached ones
    swapped = [dict(r, completion=r["completion"].replace("1", "7")) for r in rows]
    text = "".join(json.dumps(r) + "\n" for r in swapped)
    assert len(text) == f.stat().st_size
    f.write_text(text)
    new = prepare_data(str(f), cfg, tok, "sft", context=128)
    assert [new[i] for i in range(len(new))] == _reference(swapped, tok, "sft", 40)
    assert len(builds) == 7


@pytest.mark.parametrize("damage", ["flip_byte", "truncate", "meta_garbage", "meta_other_key", "missing_file"])
def test_a_damaged_cache_is_rebuilt_not_read(tmp_path, tok, cache, damage, capsys):
    rows = _rows()
    f = _write(tmp_path / "d.jsonl", rows)
    cfg = _cfg(path=str(f), max_length=40)
    prepare_data(str(f), cfg, tok, "sft", context=128)
    (folder,) = [cache / n for n in _folders(cache)]
    tokens = folder / "completion_tok.bin"
    if damage == "flip_byte":
        b = bytearray(tokens.read_bytes())
        b[5] ^= 1
        tokens.write_bytes(bytes(b))
    elif damage == "truncate":
        tokens.write_bytes(tokens.read_bytes()[:-4])
    elif damage == "meta_garbage":
        (folder / "meta.json").write_text("{not json")
    elif damage == "meta_other_key":
        meta = json.loads((folder / "meta.json").read_text())
        meta["key"]["max_length"] = 41
        (folder / "meta.json").write_text(json.dumps(meta))
    else:
        tokens.unlink()
    with pytest.raises(token_store.CacheError):
        token_store.validate(folder, token_store.cache_key(str(f), tok, **_settings(cfg, "sft")))
    data = prepare_data(str(f), cfg, tok, "sft", context=128)
    assert [data[i] for i in range(len(data))] == _reference(rows, tok, "sft", 40)
    assert "rebuilding the token cache" in capsys.readouterr().err


def _settings(cfg, kind):
    d = cfg.data
    return dict(split=d.split, columns={}, limit=0, kind=kind, keep=[], other_columns=False,
                prompt_template=d.prompt_template, chat_template=d.chat_template,
                max_prompt_length=d.max_prompt_length, max_length=min(d.max_length, 128))


def test_concurrent_processes_build_once(tmp_path):
    """Two builders of one key (threads here; the lock is per open file, as between processes): one builds,
    the other waits and maps the result."""
    key = {"format": token_store.FORMAT, "test": "concurrent"}
    calls, started = [], threading.Event()

    def build(folder):
        calls.append(folder)
        started.set()
        threading.Event().wait(0.3)   # long enough for the other thread to reach the lock
        spec = token_store.write_array(folder, "prompt_tok", np.arange(6, dtype=np.int32))
        spec.update(token_store.write_array(folder, "prompt_tok_off", np.array([0, 2, 6], dtype=np.int64)))
        for name in ("prompt_txt", "answer_txt"):
            spec.update(token_store.write_array(folder, name, np.frombuffer(b"abc", dtype=np.uint8)))
            spec.update(token_store.write_array(folder, name + "_off", np.array([0, 1, 3], dtype=np.int64)))
        spec.update(token_store.write_array(folder, "ref_logp", np.full((2, 2), np.nan)))
        return {"n": 2, "cols": [], "keep": [], "extra": False, "ref_columns": [False, False], "arrays": spec}

    out = [None, None]

    def run(j):
        if j:
            started.wait()
        out[j] = token_store.load_or_build(key, build, tmp_path)

    threads = [threading.Thread(target=run, args=(j,)) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert out[0][1] == out[1][1] == {"prompt": "bc", "answer": "bc", "prompt_ids": [2, 3, 4, 5]}


def test_precomputed_reference_logps_are_kept(tmp_path, tok, cache):
    rows = _rows(4)
    f = _write(tmp_path / "d.jsonl", [dict(r, ref_chosen_logp=-1.5 * i, ref_rejected_logp=-2.0 - i)
                                      for i, r in enumerate(rows)])
    data = prepare_data(str(f), _cfg(path=str(f), max_length=40), tok, "dpo", context=128)
    assert [(e["ref_chosen_logp"], e["ref_rejected_logp"]) for e in data] == [(-1.5 * i, -2.0 - i) for i in range(4)]
    g = _write(tmp_path / "g.jsonl", rows)
    data = prepare_data(str(g), _cfg(path=str(g), max_length=40), tok, "dpo", context=128)
    assert "ref_chosen_logp" not in data[1]
    data.set_ref_logps(1, -3.25, -4.5)
    assert (data[1]["ref_chosen_logp"], data[1]["ref_rejected_logp"]) == (-3.25, -4.5)
    assert "ref_chosen_logp" not in data[0]


def test_same_rows_as_the_former_list_implementation(tmp_path, tok, cache):
    """The benchmark's copy of the former prepare_data (Python lists) and the mapped storage agree row for row."""
    from experiments.bench_data_memory import _old_prepare, write_data

    write_data(tmp_path / "d.jsonl", 40, seed=1)
    cfg = _cfg(path=str(tmp_path / "d.jsonl"), max_length=200)
    old = _old_prepare(cfg.data.path, cfg, tok, 128)
    new = prepare_data(cfg.data.path, cfg, tok, "sft", 128)
    assert any(len(e["completion"]["input_ids"]) == 128 for e in old)   # some truncated at the context
    assert [new[i] for i in range(len(new))] == old
