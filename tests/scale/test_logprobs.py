"""scale.logprobs: the chunked log-probs equal the full-logit computation with or without checkpointing, with
the attention mask dropped for right-padded batches or kept otherwise; a detached entropy has the same values."""

from __future__ import annotations

import pytest
import torch

import scale.logprobs as L


@pytest.fixture(scope="module")
def model(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float64)


def _batch(left: bool):
    g = torch.Generator().manual_seed(0)
    lens, prompt = [7, 11, 4, 9], [3, 5, 2, 4]
    T = max(lens)
    ids = torch.randint(5, 300, (len(lens), T), generator=g)
    att = torch.zeros(len(lens), T, dtype=torch.long)
    score = torch.zeros(len(lens), T, dtype=torch.bool)
    for i, (n, p) in enumerate(zip(lens, prompt)):
        lo = T - n if left else 0
        att[i, lo:lo + n] = 1
        score[i, lo + p:lo + n] = True
    return ids, att, score


def _grads(model, fn):
    model.zero_grad(set_to_none=True)
    out = fn()
    out.backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_policy_equals_full_logits(model, monkeypatch, left, checkpointed):
    """Values and parameter gradients of a weighted sum of log-probs, float64, against reference_logprobs
    (the plain full-logit computation with the attention mask)."""
    if checkpointed:
        monkeypatch.setattr(L, "SMALL_CHUNK", 0)
    ids, att, score = _batch(left)
    w = torch.linspace(-1, 2, ids.numel(), dtype=torch.float64).view_as(ids)
    pol = L.Policy(model, chunk=5)
    assert L.is_right_padded(att) == (not left)
    v, g = _grads(model, lambda: (pol(ids, att, score, temperature=0.7, entropy_grad=False)[0] * w).sum())
    v_ref, g_ref = _grads(model, lambda: (L.reference_logprobs(model, ids, att, score, temperature=0.7) * w).sum())
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-10)
    assert g.keys() == g_ref.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-8, atol=1e-10)


def test_detached_entropy_same_values_no_graph(model):
    ids, att, score = _batch(False)
    pol = L.Policy(model, chunk=1024)
    lp1, e1 = pol(ids, att, score, entropy_grad=True)
    lp2, e2 = pol(ids, att, score, entropy_grad=False)
    torch.testing.assert_close(e1.detach(), e2, rtol=0, atol=0)
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=0)
    # independent reference: entropy of softmax of the full logits at the scored positions
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    p = torch.softmax(logits, -1)
    ent = -(p * p.log()).sum(-1)
    ref = torch.cat([torch.zeros_like(ent[:, :1]), ent], 1).where(score, torch.zeros(()).double())
    torch.testing.assert_close(e2, ref.detach(), rtol=1e-10, atol=1e-10)
    assert e1.requires_grad and not e2.requires_grad  # the statistic builds no graph


def test_is_right_padded():
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert L.is_right_padded(m)
    assert not L.is_right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))
    assert not L.is_right_padded(torch.tensor([[1, 0, 1]]))
    assert not L.is_right_padded(torch.tensor([[0, 0, 0]]))


def test_collate_equals_row_loop():
    """methods.collate's masks and ids equal a row-by-row construction (right padding, completion scored)."""
    from scale.loss import Row, collate

    rows = [Row([5, 6, 7, 8], 2, "rl", old_logp=[-1.0, -2.0]), Row([9, 10], 1, "sft"), Row([3, 4, 5], 3, "sft")]
    b = collate(rows, pad_id=0)
    T = 4
    for i, r in enumerate(rows):
        L = len(r.input_ids)
        assert b["input_ids"][i].tolist() == r.input_ids + [0] * (T - L)
        assert b["attention_mask"][i].tolist() == [1] * L + [0] * (T - L)
        assert b["score_mask"][i].tolist() == [r.prompt_len <= t < L for t in range(T)]
    assert b["old_logp"].tolist() == [[0, 0, -1.0, -2.0], [0] * 4, [0] * 4]
    assert b["ref_token_logp"] is None
