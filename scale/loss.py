"""Rows and the loss of one micro-batch, written on plain tensors (the methods in `scale/methods/` build the rows).

A training batch is a list of `Row`s (one sequence each: prompt + completion token ids, the part that is
scored, a kind, an advantage and a weight). Methods differ only in which rows they build and which loss
terms those rows enter:

| kind      | term | estimator                                                    | weight                  |
|-----------|------|--------------------------------------------------------------|-------------------------|
| `rl`      | rl   | the method's `theory.estimator` preset (`is_demo` False)     | advantage * weight      |
| `demo`    | rl   | the same preset with `is_demo` True (LUFFY, SRFT)            | advantage               |
| `sft`     | sft  | preset `sft` (global token mean, or per-sequence mean)       | weight (HPT's beta)     |
| `chosen`, `rejected` | dpo | -log sigmoid(beta * margin) over pairs (rows 2k, 2k+1) | weight                |

Every term is normalised by GLOBAL counts (all micro-batches of the optimizer step, all processes),
passed to the estimator as `num_items` / `num_seqs`. The micro-batch loss is the micro-batch's share of
the global loss, so the sum over micro-batches and processes is the global loss whatever the split; the
trainer multiplies it by (accumulation steps x processes) to cancel accelerate's division by the
accumulation steps and DDP's mean over processes (docs/ecosystem.md section 7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from theory.estimator import UPGE, preset

KINDS = ("rl", "demo", "sft", "chosen", "rejected")


@dataclass
class Row:
    input_ids: list[int]
    prompt_len: int
    kind: str
    advantage: float = 0.0
    weight: float = 1.0
    ref_logp: float = 0.0                 # DPO: sequence log-prob under the reference model
    old_logp: list[float] | None = None   # RL with several updates per batch: per completion token
    ref_token_logp: list[float] | None = None  # KL to the reference: per completion token
    rollout_logp: list[float] | None = None    # RL rollouts: the sampler's log-prob per completion token
    meta: dict = field(default_factory=dict)

    @property
    def n_scored(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class Terms:
    """The loss terms of a method; None / 0 disables a term."""

    rl: UPGE | None = None
    sft: UPGE | None = None
    dpo_beta: float | None = None
    entropy_coef: float = 0.0   # the KL term is the rl estimator's own (its kl_* options)


def rl_estimator(name: str, options: dict | None = None, max_new_tokens: int | None = None) -> UPGE:
    """A preset for the trainer: the local `token_mean` becomes `global_token_mean` with a global count,
    the same value on one micro-batch and process, and invariant to the split otherwise. A constant-length
    aggregation (`*_norm`: Dr. GRPO; `hpt_code`, whose released code divides by its response budget, 8192
    there) divides by `max_new_tokens`, this run's completion budget (TRL's max_completion_length), unless
    the options set `max_length`. Left at the padded width of the log-prob tensors (prompt + completion),
    the loss would depend on prompt length and on the micro-batch split."""
    options = dict(options or {})
    est = preset(name, **options)
    if est.aggregation == "token_mean":
        est = est.replace(aggregation="global_token_mean")
    if est.aggregation.endswith("_norm") and "max_length" not in options and max_new_tokens is not None:
        est = est.replace(max_length=max_new_tokens)
    return est


def sft_estimator(aggregation: str = "global_token_mean") -> UPGE:
    return preset("sft", aggregation=aggregation)


def rollout_logps(mb: dict, rows: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """The sampler's log-probs of `rows` for the rollout correction; rows the sampler did not write
    (demonstrations) take `old`, so their correction weight is exactly 1."""
    if mb.get("rollout_logp") is None:
        raise ValueError("method.rl.estimator_options: rollout_correction needs the sampler's log-probs, which "
                         "this batch lacks (generation.backend ptlab or vllm records them)")
    has = mb["has_rollout"][rows].to(old.device)[:, None]
    return torch.where(has, mb["rollout_logp"][rows].to(old.dtype), old)


def collate(rows: list[Row], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-padded tensors [n, T]: input_ids, attention_mask, score_mask (the completion tokens), and per
    row advantage, weight, is_demo, ref_logp, has_rollout, and old_logp / ref_token_logp / rollout_logp [n, T]
    (0 where not scored; None when no row has them)."""
    n, T = len(rows), max(len(r.input_ids) for r in rows)
    # one tensor from padded lists and masks from the lengths: no per-row tensor copies
    ids = torch.tensor([list(r.input_ids) + [pad_id] * (T - len(r.input_ids)) for r in rows], dtype=torch.long)
    pos = torch.arange(T)
    length = torch.tensor([len(r.input_ids) for r in rows])[:, None]
    att = (pos < length).long()
    score = (pos >= torch.tensor([r.prompt_len for r in rows])[:, None]) & (pos < length)
    per_token = {k: torch.zeros((n, T), dtype=torch.float64) if any(getattr(r, k) is not None for r in rows)
                 else None for k in ("old_logp", "ref_token_logp", "rollout_logp")}
    for i, r in enumerate(rows):
        for k, t in per_token.items():
            if t is not None and getattr(r, k) is not None:
                t[i, r.prompt_len:len(r.input_ids)] = torch.tensor(getattr(r, k), dtype=torch.float64)
    out = {
        "input_ids": ids, "attention_mask": att, "score_mask": score,
        "advantage": torch.tensor([r.advantage for r in rows], dtype=torch.float64),
        "weight": torch.tensor([r.weight for r in rows], dtype=torch.float64),
        "ref_logp": torch.tensor([r.ref_logp for r in rows], dtype=torch.float64),
        "kind": [r.kind for r in rows],
        **per_token,
        "has_rollout": torch.tensor([r.rollout_logp is not None for r in rows]),
    }
    if device is not None:
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def local_counts(rows: list[Row]) -> dict[str, float]:
    """Counts that the global normalisers sum over micro-batches and processes."""
    c = {"rl_rows": 0.0, "rl_nonempty_rows": 0.0, "rl_tokens": 0.0, "sft_rows": 0.0, "sft_tokens": 0.0,
         "pairs": 0.0, "all_tokens": 0.0}
    for r in rows:
        c["all_tokens"] += r.n_scored
        if r.kind in ("rl", "demo"):
            c["rl_rows"] += 1
            c["rl_nonempty_rows"] += r.n_scored > 0
            c["rl_tokens"] += r.n_scored
        elif r.kind == "sft":
            c["sft_rows"] += 1
            c["sft_tokens"] += r.n_scored
        elif r.kind == "chosen":
            c["pairs"] += 1
    return c


def micro_loss(logp: torch.Tensor, entropy: torch.Tensor | None, mb: dict, terms: Terms, norms: dict[str, float]):
    """The micro-batch's share of the global loss, and its (un-normalised) statistics.

    logp, entropy [n, T] from `Policy` (entropy None when it was not computed); mb from `collate`; norms:
    global counts (`local_counts` summed), optionally with `rl_seqs` / `sft_seqs` overriding the number of
    sequences of a term (HPT paper: Q*n and Q).
    An RL estimator with `count_empty_rows=False` (verl's agg_loss) counts only the rows with a scored token.
    """
    M = mb["score_mask"]
    kinds = mb["kind"]
    dev = logp.device
    loss = logp.new_zeros(())
    stats: dict[str, float] = {}

    def idx(*names):
        return torch.tensor([i for i, k in enumerate(kinds) if k in names], dtype=torch.long, device=dev)

    rl_i = idx("rl", "demo")
    if terms.rl is not None and len(rl_i):
        lp, m = logp[rl_i], M[rl_i]
        demo = torch.tensor([kinds[i] == "demo" for i in rl_i.tolist()], device=dev)
        A = (mb["advantage"][rl_i] * mb["weight"][rl_i]).to(lp.dtype)
        old = mb["old_logp"][rl_i].to(lp.dtype) if mb["old_logp"] is not None else None
        rows_key = "rl_rows" if terms.rl.count_empty_rows else "rl_nonempty_rows"
        kw = dict(old_logp=old, advantages=A, mask=m, num_items=max(norms["rl_tokens"], 1.0),
                  num_seqs=max(norms.get("rl_seqs", norms[rows_key]), 1.0))
        if bool(demo.any()):
            kw["is_demo"] = demo
        ref = mb["ref_token_logp"]
        if terms.rl.kl_coef and terms.rl.kl_placement == "loss" and ref is not None:
            kw["ref_logp"] = ref = ref[rl_i].to(lp.dtype)   # the estimator adds beta * KL (its kl_* options)
        if terms.rl.rollout_correction != "none":
            kw["rollout_logp"] = rollout_logps(mb, rl_i, old if old is not None else lp.detach())
        term = terms.rl.loss(lp, **kw)
        loss = loss + term
        d = terms.rl.diagnostics(lp.detach(), **{**kw, "old_logp": old})
        n_tok = float(m.sum())
        stats["rl_loss"] = float(term.detach())
        stats["clip_sum"] = d["clip_fraction"] * n_tok
        stats["ratio_sum"] = d["ratio_mean"] * n_tok
        if "ref_logp" in kw:  # the logged KL: the estimate per token, summed (the trainer divides by tokens)
            v, _ = terms.rl.kl_per_token(torch.where(m, lp.detach(), torch.zeros_like(lp)), ref)
            stats["kl_sum"] = float(torch.where(m, v, torch.zeros_like(v)).sum())
    sft_i = idx("sft")
    if terms.sft is not None and len(sft_i):
        lp, m = logp[sft_i], M[sft_i]
        term = terms.sft.loss(lp, advantages=mb["weight"][sft_i].to(lp.dtype), mask=m,
                              num_items=max(norms["sft_tokens"], 1.0),
                              num_seqs=max(norms.get("sft_seqs", norms["sft_rows"]), 1.0))
        loss = loss + term
        stats["sft_loss"] = float(term.detach())
        stats["sft_nll_sum"] = float(-(lp.detach() * m).sum())
    pair_c, pair_r = idx("chosen"), idx("rejected")
    if terms.dpo_beta is not None and len(pair_c):
        seq = (logp * M).sum(-1)
        ref = mb["ref_logp"].to(seq.dtype)
        margin = (seq[pair_c] - ref[pair_c]) - (seq[pair_r] - ref[pair_r])
        md = margin.detach()
        w = mb["weight"][pair_c].to(seq.dtype)
        per_pair = -F.logsigmoid(terms.dpo_beta * margin)
        term = (w * per_pair).sum() / max(norms["pairs"], 1.0)
        loss = loss + term
        stats["dpo_loss"] = float(term.detach())
        stats["dpo_loss_sum"] = float(per_pair.detach().sum())
        stats["dpo_acc_sum"] = float((md > 0).sum())
        stats["dpo_margin_sum"] = float(md.sum())
        stats["kl_sum"] = stats.get("kl_sum", 0.0) + float((seq - ref).detach()[torch.cat([pair_c, pair_r])].sum())
    if entropy is not None:
        ent_sum = (entropy * M).sum()
        if terms.entropy_coef:
            loss = loss - terms.entropy_coef * ent_sum / max(norms["all_tokens"], 1.0)
        stats["entropy_sum"] = float(ent_sum.detach())
    elif terms.entropy_coef:
        raise ValueError("entropy: the loss has an entropy bonus (entropy_coef) but no entropy was computed "
                         "(call the policy with with_entropy=True)")
    if not loss.requires_grad and logp.requires_grad:
        # no term has a row here (the placeholder row of an empty micro-batch): a zero on the graph, so
        # the backward still runs, with zero gradients
        loss = loss + (logp * M).sum() * 0.0
    return loss, stats


def split_rows(rows: list[Row], k: int, by_length: bool = False) -> list[list[Row]]:
    """k contiguous micro-batches of near-equal size; DPO pairs stay together; an empty one gets a dummy
    row with nothing scored (so every process runs the same number of backward passes).

    `by_length` (run.group_by_length): the rows (pairs as one unit, by their longer row) are first sorted by
    length, longest first (ties keep their order), so each micro-batch holds rows of similar length and pads
    less. Every loss term is normalised by counts over the whole step (module doc), so the sum over
    micro-batches, and its gradient, do not depend on which rows share a micro-batch."""
    units, i = [], 0
    while i < len(rows):
        step = 2 if rows[i].kind == "chosen" else 1
        units.append(rows[i:i + step])
        i += step
    if by_length:
        units.sort(key=lambda u: -max(len(r.input_ids) for r in u))
    out = []
    for j in range(k):
        part = [rw for u in units[j * len(units) // k:(j + 1) * len(units) // k] for rw in u]
        if not part:
            ids = rows[0].input_ids[:2] if rows else [0, 0]
            part = [Row(list(ids), len(ids), "sft", weight=0.0)]
        out.append(part)
    return out
