"""The rollout correction in the trainer (`method.rl.estimator_options.rollout_correction`): the ptlab sampler records
each sampled token's log-prob, equal to the policy's own at the sampling temperature; the rows carry them to the
estimator, demonstrations get weight 1; the loss equals the estimator applied directly; backends that do not
record log-probs are refused by name."""

import pytest
import torch

from tests.scale.conftest import base_overrides

T = 0.7
OPTS = {"rollout_correction": "token_truncate", "rollout_is_max": 3.0}


def _trainer(world, tmp_path, method="rl", **extra):
    from scale.config import load_config
    from scale.train import Trainer

    ov = base_overrides(world, method, "rl", tmp_path / "o", **{
        "model.dtype": "float64", "run.cpu": True, "generation.backend": "ptlab", "generation.temperature": T,
        "method.rl.estimator_options": OPTS, **extra})
    return Trainer(load_config(None, ov))


def test_sampler_logprobs_equal_the_policy_at_the_sampling_temperature(world, tmp_path):
    from scale.logprobs import reference_logprobs
    from scale.loss import collate

    tr = _trainer(world, tmp_path)
    prompts = [ex["prompt_ids"] for ex in tr.data[:3]]
    comps = tr.generate(prompts, 4)
    lps = tr.generator.rollout_logprobs
    assert [len(x) for x in lps] == [len(c) for c in comps]
    from scale.loss import Row

    rows = [Row(prompts[i // 4] + c, len(prompts[i // 4]), "rl") for i, c in enumerate(comps)]
    mb = collate(rows, tr.tok.pad_token_id)
    want = reference_logprobs(tr._model(), mb["input_ids"], mb["attention_mask"], mb["score_mask"], temperature=T)
    for i, (r, lp) in enumerate(zip(rows, lps)):
        got = torch.tensor(lp, dtype=torch.float64)
        ref = want[i, r.prompt_len:len(r.input_ids)]
        assert torch.allclose(got, ref, rtol=0, atol=2e-5), (got - ref).abs().max()   # sampler: float32 softmax


def test_top_p_logprobs_are_the_nucleus_distribution(world, tmp_path):
    """With top_p < 1 the sampler draws from the renormalised nucleus: each recorded log-prob is at least the
    plain tempered one, and strictly above it for some token."""
    from scale.logprobs import reference_logprobs
    from scale.loss import Row, collate

    tr = _trainer(world, tmp_path, **{"generation.top_p": 0.5})
    prompts = [ex["prompt_ids"] for ex in tr.data[:3]]
    comps = tr.generate(prompts, 4)
    rows = [Row(prompts[i // 4] + c, len(prompts[i // 4]), "rl") for i, c in enumerate(comps)]
    mb = collate(rows, tr.tok.pad_token_id)
    plain = reference_logprobs(tr._model(), mb["input_ids"], mb["attention_mask"], mb["score_mask"], temperature=T)
    gaps = torch.cat([torch.tensor(lp, dtype=torch.float64) - plain[i, r.prompt_len:len(r.input_ids)]
                      for i, (r, lp) in enumerate(zip(rows, tr.generator.rollout_logprobs))])
    assert bool((gaps > -2e-5).all()) and float(gaps.max()) > 1e-3


def test_loss_with_rollout_logprobs_equals_the_estimator(world, tmp_path):
    """Rows as the trainer builds them (sampled rl rows with their log-probs, one demonstration) through
    micro_loss == the estimator on the same tensors with the demonstration's rollout log-prob set to its own."""
    from scale.loss import Row, Terms, collate, local_counts, micro_loss, rl_estimator

    tr = _trainer(world, tmp_path)
    est = rl_estimator("luffy", OPTS)   # a preset with a demonstration part
    ex = tr.data[0]
    comps = tr.generate([ex["prompt_ids"]], 4)
    g = torch.Generator().manual_seed(0)
    # shift the recorded log-probs so that the weights pi_old / pi_rollout differ from 1 and some hit the cap
    rows = [Row(ex["prompt_ids"] + c, len(ex["prompt_ids"]), "rl", advantage=float(torch.randn(1, generator=g)),
                rollout_logp=[x - 1.5 * float(torch.rand(1, generator=g)) for x in lp])
            for c, lp in zip(comps[:3], tr.generator.rollout_logprobs)]
    rows.append(Row(ex["prompt_ids"] + comps[3], len(ex["prompt_ids"]), "demo", advantage=1.0))   # no rollout_logp
    mb = collate(rows, tr.tok.pad_token_id)
    lp, ent = tr.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"], temperature=T)
    got, _ = micro_loss(lp, ent, mb, Terms(rl=est), local_counts(rows))
    roll = torch.where(mb["has_rollout"][:, None], mb["rollout_logp"], lp.detach())
    counts = local_counts(rows)
    want = est.loss(lp, advantages=mb["advantage"], mask=mb["score_mask"], rollout_logp=roll,
                    is_demo=torch.tensor([r.kind == "demo" for r in rows]), num_items=counts["rl_tokens"],
                    num_seqs=counts["rl_nonempty_rows"])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    plain, _ = micro_loss(lp, ent, mb, Terms(rl=rl_estimator("luffy")), counts)
    assert not torch.allclose(got, plain, rtol=1e-3)       # the correction really changes the loss


def test_a_run_with_the_correction_trains(world, tmp_path):
    from tests.scale.conftest import read_metrics

    tr = _trainer(world, tmp_path, **{"run.max_steps": 2})
    tr.train()
    rows = [r for r in read_metrics(tmp_path / "o") if "loss" in r]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_backends_without_sampler_logprobs_are_refused_by_name(world, tmp_path):
    with pytest.raises(ValueError, match="generation.backend"):
        _trainer(world, tmp_path, **{"generation.backend": "hf"})


def test_without_the_correction_no_logprobs_are_recorded(world, tmp_path):
    """Recording costs a [rows, tokens] list per batch: it happens only when the correction reads it."""
    tr = _trainer(world, tmp_path, **{"method.rl.estimator_options": {}})
    tr.generate([tr.data[0]["prompt_ids"]], 2)
    assert tr.generator.rollout_logprobs is None
