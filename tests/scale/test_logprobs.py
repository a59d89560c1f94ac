"""scale.logprobs: the chunked log-probs and their gradients equal the full-logit computation for explicit
chunks and chunks taken from a memory budget, with or without checkpointing, with the attention mask dropped
for right-padded batches or kept otherwise; a detached entropy has the same values; the entropy and the
temperature division are computed only when needed."""

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


def _vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _chunks_seen(monkeypatch) -> list[int]:
    """Records the number of positions of every chunk the head computes."""
    seen, inner = [], L._chunk_logp

    def spy(head, h, *args):
        seen.append(h.shape[0])
        return inner(head, h, *args)

    monkeypatch.setattr(L, "_chunk_logp", spy)
    return seen


# (chunk, memory_mb) of the Policy: explicit chunks, and chunks from budgets (float64: 8 bytes, 3 copies)
CHUNKS = {"chunk1": (1, None), "chunk5": (5, None), "chunk1000": (1000, None), "tiny_budget": (0, 1e-9),
          "budget_3": (0, "3 positions")}


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("spec", list(CHUNKS))
def test_policy_equals_full_logits(model, monkeypatch, left, checkpointed, spec):
    """Values and parameter gradients of a weighted sum of log-probs, float64, against reference_logprobs
    (the plain full-logit computation with the attention mask), for explicit chunks and budget-sized ones;
    the chunks the head computes are the ones asked for."""
    if checkpointed:
        monkeypatch.setattr(L, "SMALL_CHUNK", 0)
    chunk, mb = CHUNKS[spec]
    if mb == "3 positions":   # room for 3.5 positions of 3 copies x V x 8 bytes: chunks of 3
        mb = 3.5 * L.HEAD_COPIES * 8 * _vocab(model) / 2**20
    ids, att, score = _batch(left)
    w = torch.linspace(-1, 2, ids.numel(), dtype=torch.float64).view_as(ids)
    pol = L.Policy(model, chunk=chunk, **({"memory_mb": mb} if mb is not None else {}))
    assert L.is_right_padded(att) == (not left)
    seen = _chunks_seen(monkeypatch)
    v, g = _grads(model, lambda: (pol(ids, att, score, temperature=0.7, with_entropy=False)[0] * w).sum())
    N = int(score.sum())
    size = {"tiny_budget": 1, "budget_3": 3}.get(spec, chunk)
    chunks = [min(size, N - s) for s in range(0, N, size)]
    assert seen[:len(chunks)] == chunks   # the forward's chunks
    # checkpointed chunks are computed again in the backward; a single chunk is never checkpointed
    assert len(seen) == len(chunks) * (2 if checkpointed and len(chunks) > 1 else 1), seen
    v_ref, g_ref = _grads(model, lambda: (L.reference_logprobs(model, ids, att, score, temperature=0.7) * w).sum())
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-10)
    assert g.keys() == g_ref.keys()
    for k in g:
        torch.testing.assert_close(g[k], g_ref[k], rtol=1e-8, atol=1e-10)


def test_head_chunk_from_the_budget():
    """chunk = budget / (copies x V x bytes), at least 1; an explicit chunk wins; an unknown V is an error
    naming the key to set."""
    assert L.head_chunk(1000, 4, memory_mb=1.0) == 2**20 // (3 * 4 * 1000) == 87
    assert L.head_chunk(1000, 4, memory_mb=1.0, copies=5) == 2**20 // (5 * 4 * 1000)
    assert L.head_chunk(151936, 4, memory_mb=1e-6) == 1
    assert L.head_chunk(151936, 4, chunk=7) == 7
    assert L.head_chunk(None, 4, chunk=7) == 7
    with pytest.raises(ValueError, match="^run.logprob_chunk: "):
        L.head_chunk(None, 4)
    assert L.vocab_size(torch.nn.Linear(3, 11)) == 11


def _profiler():
    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])


def _ops(prof) -> set[str]:
    return {e.name for e in prof.events()}


def _head_inputs(model):
    """(hidden states as a leaf that requires grad, the head, ids, score mask): the head alone is profiled."""
    ids, att, score = _batch(False)
    h = model.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state.detach().requires_grad_()
    return h, model.get_output_embeddings(), ids, score


def test_temperature_one_skips_the_division(model):
    """At temperature 1 the head runs no division (it copied [chunk, V] for nothing) and gives exactly
    log_softmax(logits); at 0.7 it divides and gives log_softmax(logits / 0.7). Forward and backward."""
    h, head, ids, score = _head_inputs(model)
    logits = head(h).detach()[:, :-1]
    for T in (1.0, 0.7):
        with _profiler() as prof:
            lp = L.selected_logprobs(h, head, ids, score, temperature=T, chunk=5, with_entropy=False)[0]
            lp.sum().backward()
        assert ("aten::div" in _ops(prof)) == (T != 1.0), (T, sorted(o for o in _ops(prof) if "div" in o))
        ref = torch.log_softmax(logits / T, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        ref = torch.cat([torch.zeros_like(ref[:, :1]), ref], 1).where(score, torch.zeros(()).double())
        torch.testing.assert_close(lp.detach(), ref, rtol=1e-12, atol=1e-12)


def test_entropy_only_when_asked(model):
    """with_entropy=False returns None and runs no exp (the entropy's p = exp(log p)): the head does the
    log-probs' work only; with it, the log-probs are the same."""
    h, head, ids, score = _head_inputs(model)
    with _profiler() as prof:
        lp, ent = L.selected_logprobs(h, head, ids, score, chunk=5, with_entropy=False)
    assert ent is None and "aten::exp" not in _ops(prof)
    with _profiler() as prof:
        lp2, ent = L.selected_logprobs(h, head, ids, score, chunk=5, entropy_grad=False)
    assert ent is not None and "aten::exp" in _ops(prof)
    torch.testing.assert_close(lp2, lp, rtol=0, atol=0)

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
