"""scale.sampling (generation.backend=ptlab): the per-step distribution equals transformers' temperature + top-p
warpers exactly and a plain loop; draws follow it; the loop equals model.generate in greedy mode token for
token (left padding, n per prompt, EOS then pad); at temperature -> 0 sampling is greedy; the trainer runs on it."""

from __future__ import annotations

import math

import pytest
import torch

from scale.sampling import draw, generate_ids, sampling_probs


def _nucleus_loop(logits: torch.Tensor, T: float, top_p: float) -> torch.Tensor:
    """Reference written as the rule reads: a token is dropped when the probability mass of the tokens ranked
    at or below it (ascending order, itself included) is <= 1 - top_p; the most likely one always stays."""
    out = torch.zeros(logits.shape, dtype=torch.float64)
    for b, row in enumerate(logits.double() / T):
        p = torch.softmax(row, -1).tolist()
        order = sorted(range(len(p)), key=lambda i: p[i])
        kept, below = [], 0.0
        for rank, i in enumerate(order):
            below += p[i]
            if below > 1 - top_p or rank == len(order) - 1:
                kept.append(i)
        z = sum(math.exp(row[i].item()) for i in kept)
        for i in kept:
            out[b, i] = math.exp(row[i].item()) / z
    return out


@pytest.mark.parametrize("T,top_p", [(1.0, 1.0), (0.7, 1.0), (1.0, 0.9), (1.3, 0.5), (0.5, 0.05)])
def test_sampling_probs_equal_transformers_warpers_and_loop(T, top_p):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(1)) * 3
    hf = logits.clone()
    if T != 1.0:
        hf = TemperatureLogitsWarper(T)(None, hf)
    if top_p < 1.0:
        hf = TopPLogitsWarper(top_p)(None, hf)
    ours = sampling_probs(logits, T, top_p)
    assert torch.equal(ours, hf.softmax(-1))
    torch.testing.assert_close(ours.double(), _nucleus_loop(logits, T, top_p), rtol=1e-5, atol=1e-6)


def test_sampling_probs_named_errors():
    with pytest.raises(ValueError, match="temperature"):
        sampling_probs(torch.zeros(1, 3), 0.0)
    with pytest.raises(ValueError, match="top_p"):
        sampling_probs(torch.zeros(1, 3), 1.0, 0.0)


def test_draw_frequencies_follow_probs():
    """200k draws from 3 rows; every frequency within 5 standard errors; zero-probability tokens never drawn."""
    p = torch.tensor([[0.5, 0.3, 0.2, 0.0, 0.0], [0.0, 0.1, 0.0, 0.6, 0.3], [0.0, 0.0, 0.0, 0.0, 1.0]])
    N = 200_000
    g = torch.Generator().manual_seed(0)
    toks = draw(p.repeat(N, 1), g).view(N, 3)
    for b in range(3):
        freq = torch.bincount(toks[:, b], minlength=5).double() / N
        se = (p[b].double() * (1 - p[b].double()) / N).sqrt()
        assert ((freq - p[b]).abs() <= 5 * se + 1e-12).all(), (b, freq, p[b])
        assert (freq[p[b] == 0] == 0).all()


def test_draw_never_returns_a_zero_tail_token_at_the_top_of_the_cdf(monkeypatch):
    """u * total rounding up to the total must not select a trailing zero-probability token."""
    p = torch.tensor([[0.25, 0.75, 0.0, 0.0]])
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, 1, dtype=torch.float64))
    assert draw(p).tolist() == [1]


@pytest.fixture(scope="module")
def lm(world):
    """A random Qwen2 with an untied head: its greedy paths vary along the sequence (the tied tiny model
    mostly repeats one token), so EOS can fall mid-sequence; a wide init makes attention, and so positions, matter."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(world["model"])
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False, initializer_range=0.3, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), tok


def _prompts(tok):
    from scale.data import collate as pad

    texts = ["What is 3 + 4?", "Compute 12 * 7 - 7. Step:", "1", "The answer is \\boxed{"]
    b = pad([{"input_ids": tok(t)["input_ids"]} for t in texts], tok.pad_token_id, left=True)
    assert (b["attention_mask"] == 0).any()  # left padding is exercised
    return b["input_ids"], b["attention_mask"]


def _hf_greedy(model, ids, att, n, max_new, eos, pad):
    out = model.generate(input_ids=ids.repeat_interleave(n, 0), attention_mask=att.repeat_interleave(n, 0),
                         do_sample=False, max_new_tokens=max_new, pad_token_id=pad, eos_token_id=eos)
    return out[:, ids.shape[1]:]


def test_greedy_equals_model_generate(lm):
    model, tok = lm
    ids, att = _prompts(tok)
    ours = generate_ids(model, ids, att, 3, 12, tok.eos_token_id, tok.pad_token_id, greedy=True)
    assert torch.equal(ours, _hf_greedy(model, ids, att, 3, 12, tok.eos_token_id, tok.pad_token_id))
    assert ours.shape == (12, 12)


def test_greedy_eos_then_pad_equals_model_generate(lm):
    """Make tokens the greedy paths emit the EOS: rows end at different steps (or never), then carry pad, and
    the loop stops when all have ended, exactly as generate."""
    model, tok = lm
    ids, att = _prompts(tok)
    free = generate_ids(model, ids, att, 1, 12, -1, tok.pad_token_id, greedy=True)
    ends_seen = set()
    for j in (2, 1):  # the EOS is a token row 3 emits mid-sequence, then one of row 0's
        row = free[3 if j == 2 else 0].tolist()
        eos = row[next(k for k in range(1, len(row)) if row[k] not in row[:k])]
        ours = generate_ids(model, ids, att, 2, 12, eos, tok.pad_token_id, greedy=True)
        assert torch.equal(ours, _hf_greedy(model, ids, att, 2, 12, eos, tok.pad_token_id))
        for r in ours.tolist():
            if eos in r:
                k = r.index(eos)
                assert all(x == tok.pad_token_id for x in r[k + 1:])
                ends_seen.add(k)
    assert len(ends_seen) >= 2  # rows ended at different steps


def test_temperature_to_zero_is_greedy(lm):
    model, tok = lm
    ids, att = _prompts(tok)
    greedy = generate_ids(model, ids, att, 2, 8, tok.eos_token_id, tok.pad_token_id, greedy=True)
    cold = generate_ids(model, ids, att, 2, 8, tok.eos_token_id, tok.pad_token_id, temperature=1e-4,
                        generator=torch.Generator().manual_seed(3))
    assert torch.equal(cold, greedy)


def test_first_token_frequencies_follow_the_model(lm):
    """n = 3000 samples of one new token: frequencies within 5 standard errors of sampling_probs(model logits,
    T, top_p) (and never outside the nucleus)."""
    model, tok = lm
    ids, att = _prompts(tok)
    ids, att = ids[1:2], att[1:2]
    T, top_p, N = 0.5, 0.8, 3000
    with torch.no_grad():
        p = sampling_probs(model(input_ids=ids, attention_mask=att).logits[:, -1], T, top_p)[0].double()
    s = generate_ids(model, ids, att, N, 1, tok.eos_token_id, tok.pad_token_id, temperature=T, top_p=top_p,
                     generator=torch.Generator().manual_seed(0))[:, 0]
    freq = torch.bincount(s, minlength=p.numel()).double() / N
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / N).sqrt() + 1e-3).all()
    assert (freq[p == 0] == 0).all()


def test_trainer_runs_on_the_ptlab_backend(world, tmp_path):
    from scale.config import load_config
    from scale.train import Trainer
    from tests.scale.conftest import base_overrides

    ov = base_overrides(world, "rl", "rl", tmp_path / "o", **{"generation.backend": "ptlab", "run.cpu": True,
                                                               "generation.temperature": 0.9, "generation.top_p": 0.95})
    tr = Trainer(load_config(None, ov))
    torch.manual_seed(0)
    comps = tr.generate([tr.data[0]["prompt_ids"], tr.data[1]["prompt_ids"]], 3)
    assert len(comps) == 6 and all(1 <= len(c) <= 8 for c in comps)
    assert all(tok.eos_token_id not in c[:-1] for c in comps for tok in [tr.tok])
    m = tr.train_step(0)
    assert math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])


def test_cpu_packed_linears_compute_the_layers_and_are_undone(lm):
    """The oneDNN copies give each linear layer's output to float32 rounding (another kernel, another summation
    order: within 1e-5 of the largest value), the model's logits likewise; after the block (even one left by an
    error) every layer runs its own forward again. Left alone: a layer with a forward set on the instance
    (accelerate's hooks), a float64 layer, and everything under autocast."""
    from scale.sampling import cpu_packed_linears

    model, tok = lm
    ids, att = _prompts(tok)
    lin = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = torch.randn(5, 3, lin[0].in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, logits = lin[0](x), model(input_ids=ids, attention_mask=att).logits
        with cpu_packed_linears(model, 12) as k:
            assert k == len(lin) > 0
            assert all("forward" in m.__dict__ for m in lin)
            got, got_logits = lin[0](x), model(input_ids=ids, attention_mask=att).logits
    assert not any("forward" in m.__dict__ for m in lin)
    for a, b in ((got, want), (got_logits, logits)):
        err = float((a - b).abs().max())
        assert err <= 1e-5 * float(b.abs().max()), err
    with pytest.raises(RuntimeError, match="boom"):
        with cpu_packed_linears(model, 12):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in lin)

    hooked, wide = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3).double()
    hooked.forward = hooked.forward   # an instance attribute, as accelerate's add_hook_to_module sets
    pair = torch.nn.Sequential(hooked, wide)
    with cpu_packed_linears(pair, 2) as k:
        assert k == 0
    assert "forward" in hooked.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16), cpu_packed_linears(model, 12) as k:
        assert k == 0
