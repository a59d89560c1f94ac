"""Length-grouped and padding-free (packed) micro-batches: the step's loss and gradient equal the plain padded
computation (one padded micro-batch of the whole batch) to 1e-12 in float64 on the tiny model, for batches
with RL rows (GRPO, LUFFY with demonstrations, HPT, Dr. GRPO, verl's norm, KL terms), SFT rows, DPO pairs and an
entropy bonus (the cases of test_invariance). Controls show the comparison can fail: packing whose positions
do not restart per row, and a per-micro-batch normaliser under grouping."""

from __future__ import annotations

import pytest
import torch

from tests.scale.test_invariance import _cases, _recording

MODES = {"plain": {}, "grouped": {"run.group_by_length": True}, "packed": {"run.padding_free": True},
         "grouped+packed": {"run.group_by_length": True, "run.padding_free": True},
         "shared": {"run.padding_free": True, "run.share_prefix": True},
         "grouped+shared": {"run.group_by_length": True, "run.padding_free": True, "run.share_prefix": True}}
SHARED = ("shared", "grouped+shared")   # needs the per-example attention (transformers' sdpa ignores prefixes)


def _trainer(world, gas, out, **run):
    from accelerate import Accelerator

    from scale.config import load_config
    from scale.train import Trainer

    ov = [f"model.path={world['model']}", f"data.path={world['joint']}", "method.name=sft_dpo", "model.dtype=float64",
          "run.cpu=true", "run.batch_size=2", f"run.grad_accum={gas}", "run.max_grad_norm=0", "run.progress=false",
          "data.shuffle=false", f"run.output_dir={out}", *[f"{k}={str(v).lower()}" for k, v in run.items()]]
    return Trainer(load_config(None, ov), accelerator=Accelerator(cpu=True, gradient_accumulation_steps=gas))


def _run(tr, cases, modes):
    """{(case, mode): (loss, gradient vector)}, each from the same parameters."""
    init = {k: v.detach().clone() for k, v in tr.policy.named_parameters()}
    box, out = {}, {}
    tr.opt.optimizer.step = _recording(tr, box, tr.opt.optimizer.step)
    for mode in modes:
        for key, v in MODES[mode].items():
            setattr(tr.cfg.run, key.split(".")[1], v)
        for name, units, terms, extra in cases:
            with torch.no_grad():
                for k, v in tr.policy.named_parameters():
                    v.copy_(init[k])
            tr.terms = terms
            m = tr.update([row for u in units for row in u], extra)
            out[(name, mode)] = (m["loss"], box.pop("g"))
        for key in MODES[mode]:
            setattr(tr.cfg.run, key.split(".")[1], False)
    return out


def _norm_in_float64(monkeypatch):
    """Qwen2's RMSNorm computes in float32 whatever the model's dtype, so gradients pass a float32 cast there.
    With shared prefixes the rows' gradients at a shared position are summed before that cast instead of after:
    the same step up to float32 rounding (the next test). The tests swap in the same
    norm computed in the input's dtype, so that float64 comparisons are held to float64 rounding."""
    from transformers.models.qwen2 import modeling_qwen2

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    monkeypatch.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", forward)


@pytest.mark.parametrize("attention", ["sdpa", "per_row"])
def test_grouped_and_packed_steps_equal_the_padded_one(world, tmp_path, monkeypatch, attention):
    """attention sdpa: packed rows under transformers' block-diagonal mask (the trainer built without
    run.padding_free, then switched); per_row: built with it, so the model attends one packed example at a
    time (scale.logprobs.use_packed_attention), and also packs shared prefixes once (run.share_prefix)."""
    _norm_in_float64(monkeypatch)
    ref_tr = _trainer(world, 1, tmp_path / "a")
    ref = _run(ref_tr, _cases(ref_tr), ["plain"])
    tr = _trainer(world, 3, tmp_path / "b", **({"run.padding_free": True} if attention == "per_row" else {}))
    want = "ptlab_packed" if attention == "per_row" else "sdpa"
    assert tr._model().config._attn_implementation == want
    modes = [m for m in MODES if attention == "per_row" or m not in SHARED]
    if attention == "per_row":   # the shared layout does hold the prompts once (GRPO groups, DPO pairs)
        from scale.logprobs import pack

        for case in (2, 0):
            mb = tr.collate([row for u in _cases(tr)[case][1] for row in u])
            assert pack(mb, share_prefix=True)["input_ids"].shape[1] < int(mb["attention_mask"].sum())
    got = _run(tr, _cases(tr), modes)
    names = {k[0] for k in ref}
    assert len(names) == 7
    for name in names:
        loss0, g0 = ref[(name, "plain")]
        scale = float(g0.abs().max())
        assert scale > 1e-4, f"{name}: zero gradient, the test could not fail"
        for mode in modes:
            loss, g = got[(name, mode)]
            assert abs(loss - loss0) <= 1e-12 * max(1.0, abs(loss0)), (name, mode, loss, loss0)
            err = float((g - g0).abs().max())
            assert err <= 1e-12 * max(1.0, scale), (name, mode, err, scale)


def test_with_qwen2s_float32_norm_shared_prefixes_differ_by_float32_rounding(world, tmp_path):
    """The reason for _norm_in_float64: with the model's own norm (float32 inside) the shared layout's gradient
    differs from the padded one by float32 rounding (2.8e-10 to 6.4e-9 here), not more, and not by nothing."""
    ref_tr = _trainer(world, 1, tmp_path / "a")
    ref = _run(ref_tr, _cases(ref_tr), ["plain"])
    tr = _trainer(world, 3, tmp_path / "b", **{"run.padding_free": True})
    got = _run(tr, _cases(tr), ["shared"])
    errs = [float((got[(name, "shared")][1] - g0).abs().max()) for (name, _), (_, g0) in ref.items()]
    print(f"shared vs padded with the float32 norm: {min(errs):.2g} to {max(errs):.2g}")
    assert 0 < min(errs) and max(errs) < 1e-7


@pytest.mark.parametrize("attention", ["sdpa", "per_row"])
def test_controls_the_comparison_can_fail(world, tmp_path, monkeypatch, attention):
    """Packed rows whose positions run on (no restart) attend across rows: the gradient moves. A per-micro-
    batch token mean (bnpo, not converted to a global count) changes when grouping regroups the rows."""
    import scale.logprobs as L
    from scale.loss import Terms
    from theory.estimator import preset

    tr = _trainer(world, 3, tmp_path / "c", **({"run.padding_free": True} if attention == "per_row" else {}))
    name, units, terms, extra = _cases(tr)[2]   # grpo
    base = _run(tr, [(name, units, terms, extra)], ["plain"])[(name, "plain")][1]
    real_pack = L.pack

    def no_restart(mb, **kw):
        p = real_pack(mb, **kw)
        p["position_ids"] = torch.arange(p["input_ids"].shape[1])[None]
        return p

    monkeypatch.setattr(L, "pack", no_restart)
    leaky = _run(tr, [(name, units, terms, extra)], ["packed"])[(name, "packed")][1]
    assert float((leaky - base).abs().max()) > 1e-4
    monkeypatch.setattr(L, "pack", real_pack)
    if attention == "per_row":   # a shared prefix that the continuing rows do not attend to
        real_segments = L._segments
        monkeypatch.setattr(L, "_segments", lambda pos: [(a, b, r, 0) for a, b, r, _ in real_segments(pos)])
        blind = _run(tr, [(name, units, terms, extra)], ["shared"])[(name, "shared")][1]
        assert float((blind - base).abs().max()) > 1e-4
        monkeypatch.setattr(L, "_segments", real_segments)
    local = [(name, units, Terms(rl=preset("bnpo")), extra)]
    res = _run(tr, local, ["plain", "grouped"])
    assert float((res[(name, "plain")][1] - res[(name, "grouped")][1]).abs().max()) > 1e-4


def test_grouping_sorts_by_length_and_keeps_pairs():
    from scale.loss import Row, split_rows

    lens = [5, 17, 9, 30, 12, 3, 25, 8]
    rows = [Row(list(range(n)), 2, "sft") for n in lens]
    rows += [Row(list(range(20)), 2, "chosen"), Row(list(range(4)), 2, "rejected")]
    plain, grouped = split_rows(rows, 3), split_rows(rows, 3, by_length=True)
    assert len(grouped) == 3 and sorted(map(id, sum(grouped, []))) == sorted(map(id, rows))
    flat = sum(grouped, [])
    i = flat.index(rows[8])
    assert flat[i + 1] is rows[9]   # the pair stays adjacent, in its order
    unit_len = [len(r.input_ids) if r.kind != "chosen" else 20 for r in flat if r.kind != "rejected"]
    assert unit_len == sorted(lens + [20], reverse=True)   # longest first, within and across micro-batches
    padded = [sum(len(mb) * max(len(r.input_ids) for r in mb) for mb in split) for split in (plain, grouped)]
    assert padded[1] < padded[0]


def test_pack_unpack_and_the_packing_probe(world):
    from transformers import AutoModelForCausalLM

    import scale.logprobs as L
    from scale.logprobs import pack, packing_error, unpack, use_packed_attention

    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    att = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    score = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0], [0, 0, 1, 1]]).bool()
    p = pack({"input_ids": ids, "attention_mask": att, "score_mask": score})
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert unpack(p["input_ids"], p).tolist() == (ids * att).tolist()
    with pytest.raises(ValueError, match="right-padded"):
        pack({"input_ids": ids, "attention_mask": att.flip(1), "score_mask": score})
    # shared prefixes: rows 0 and 1 share the context [5, 6] before their last unscored token (7); row 2's context
    # is [5]; row 3 scores nothing and continues row 2 from its last token; row 4 has row 0's tokens but is scored
    # from column 2, so its context is [5] too: it joins row 2's group, not row 0's (groups go by context)
    ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 9, 10], [5, 1, 2, 0, 0], [5, 1, 0, 0, 0], [5, 6, 7, 8, 0]])
    att = (ids > 0).long()
    score = torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 1, 1], [0, 0, 1, 0, 0], [0] * 5, [0, 0, 1, 1, 0]]).bool()
    p = pack({"input_ids": ids, "attention_mask": att, "score_mask": score}, share_prefix=True)
    assert p["input_ids"].tolist() == [[5, 6, 7, 8, 7, 9, 10, 5, 1, 2, 1, 6, 7, 8]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 1, 1, 2, 3]]
    assert p["score_mask"].long().tolist() == [[0, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 0, 1, 1]]
    back = unpack(p["input_ids"], p)
    assert back[:, 0].tolist() == [5, 0, 5, 0, 0]   # a continuing row's shared columns come back as 0
    assert back[score].tolist() == ids[score].tolist()
    assert [s[2:] for s in L._segments(p["position_ids"])] == [(0, 0), (0, 2), (7, 0), (7, 1), (7, 1)]
    with pytest.raises(ValueError, match="starts at position 5, past the end"):
        L._segments(torch.tensor([[0, 1, 2, 5, 6]]))
    for impl in ("sdpa", "eager", "per_row"):
        model = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float64,
                                                     attn_implementation="sdpa" if impl == "per_row" else impl)
        if impl == "per_row":
            assert use_packed_attention(model) and model.config._attn_implementation == "ptlab_packed"
            # a left-padded batch (generation) and a cached decode go to sdpa with their mask, unchanged
            plain = AutoModelForCausalLM.from_pretrained(world["model"], dtype=torch.float64)
            lp_ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
            lp_att = torch.tensor([[0, 0, 1, 1, 1], [1] * 5])
            for m in (model, plain):
                m.eval()
            a = model(input_ids=lp_ids, attention_mask=lp_att).logits
            b = plain(input_ids=lp_ids, attention_mask=lp_att).logits
            assert float((a - b)[lp_att.bool()].abs().max()) < 1e-12
            gen = [m.generate(input_ids=lp_ids, attention_mask=lp_att, max_new_tokens=4, do_sample=False,
                              output_scores=True, return_dict_in_generate=True) for m in (model, plain)]
            assert torch.equal(gen[0].sequences, gen[1].sequences)
            assert max(float((x - y).abs().max()) for x, y in zip(gen[0].scores, gen[1].scores)) < 1e-12
        elif impl == "eager":
            assert not use_packed_attention(model)   # only sdpa models are switched
        assert packing_error(model) < 1e-12
        # a row continuing a shared prefix: only the per-example attention reads it (why run.share_prefix needs it)
        assert (packing_error(model, shared=True) < 1e-12) == (impl == "per_row")

        class Blind(torch.nn.Module):   # a decoder that ignores position ids: packed rows see each other
            def __init__(self, dec):
                super().__init__()
                self.dec = dec

            def forward(self, position_ids=None, **kw):
                return self.dec(**kw)

        blind = Blind(model.get_decoder())
        model.get_decoder = lambda blind=blind: blind
        assert packing_error(model) > 1e-2


def test_keys_are_validated(world, tmp_path, monkeypatch):
    import scale.train as train
    from scale.config import load_config

    with pytest.raises(ValueError, match="run.padding_free"):
        load_config(None, [f"model.path={world['model']}", f"data.path={world['sft']}", "run.padding_free=maybe",
                           f"run.output_dir={tmp_path}"]).validate()
    with pytest.raises(ValueError, match="run.group_by_length: not available with datareg"):
        load_config(None, [f"model.path={world['model']}", f"data.path={world['sft']}", "run.group_by_length=true",
                           "datareg.update_rule=target_only", "datareg.target=file",
                           f"datareg.target_path={world['sft']}", f"run.output_dir={tmp_path}"]).validate()
    with pytest.raises(ValueError, match="run.share_prefix: .* set run.padding_free=true"):
        load_config(None, [f"model.path={world['model']}", f"data.path={world['sft']}", "run.share_prefix=true",
                           f"run.output_dir={tmp_path}"]).validate()
    both = {"run.padding_free": True, "run.share_prefix": True}
    monkeypatch.setattr(train, "use_packed_attention", lambda model: False)
    with pytest.raises(ValueError, match="run.share_prefix: needs ptlab's per-example attention.*'sdpa'"):
        _trainer(world, 1, tmp_path / "f", **both)
    monkeypatch.undo()
    monkeypatch.setattr(train, "packing_error", lambda model, shared=False: 0.5 if shared else 0.0)
    with pytest.raises(ValueError, match="run.share_prefix: .* does not keep packed rows apart"):
        _trainer(world, 1, tmp_path / "g", **both)
    monkeypatch.setattr(train, "packing_error", lambda model, shared=False: 0.5)
    with pytest.raises(ValueError, match="run.padding_free: .* does not keep packed rows apart"):
        _trainer(world, 1, tmp_path / "d", **{"run.padding_free": True})


@pytest.mark.parametrize("attention", ["sdpa", "per_row"])
def test_forward_only_paths_equal_padded(world, tmp_path, attention):
    """The reference model's and the old policy's token log-probs (DPO reference, PPO ratios) packed and grouped
    equal the padded ones."""
    tr = _trainer(world, 2, tmp_path / "e", **({"run.padding_free": True} if attention == "per_row" else {}))
    tr.cfg.run.padding_free = False
    _, units, _, _ = _cases(tr)[0]
    rows = [row for u in units for row in u]
    want = torch.cat(tr.reference.token_logps(rows))
    tr.fill_old_logps(rows)
    old = [list(r.old_logp) for r in rows]
    tr.cfg.run.padding_free = tr.cfg.run.group_by_length = True
    for share in [False] + [True] * (attention == "per_row"):
        tr.cfg.run.share_prefix = share
        got = torch.cat(tr.reference.token_logps(rows))
        tr.fill_old_logps(rows)
        assert want.abs().max() > 1 and float((got - want).abs().max()) <= 1e-12, share
        assert max(abs(a - b) for r, o in zip(rows, old) for a, b in zip(r.old_logp, o)) <= 1e-12, share


@pytest.mark.parametrize("config,data", [("tiny_sft.yaml", "sft"), ("tiny_dpo.yaml", "dpo"),
                                         ("tiny_grpo.yaml", "rl")])
def test_runs_through_cli_with_both_keys(world, tmp_path, config, data):
    """A whole run (sampling, reference, held-out DPO set, checkpoint) with both keys on: the first step's loss
    and gradient norm equal those of the run without them (the same rows: same seed and weights)."""
    import json
    from pathlib import Path

    from experiments.cli import main as cli
    from tests.scale.conftest import base_overrides, read_metrics

    configs = Path(__file__).resolve().parents[2] / "experiments" / "configs"
    sets = json.dumps([{"name": "h", "path": str(world["dpo"]), "kind": "dpo", "limit": 4}])
    firsts = []
    for flags in ({}, {"run.group_by_length": True, "run.padding_free": True}):
        out = tmp_path / f"run{len(firsts)}"
        ov = base_overrides(world, "", data, out, **{"run.grad_accum": 2, **flags})
        ov = [o for o in ov if not o.startswith(("method.name=", "eval.sets="))] + [f"eval.sets={sets}"]
        assert cli(["train", str(configs / config), *ov]) == 0
        rows = [r for r in read_metrics(out) if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2]
        firsts.append(rows[0])
    for k in ("loss", "grad_norm", "tokens"):
        assert firsts[1][k] == pytest.approx(firsts[0][k], rel=1e-5, abs=1e-7), k
