"""The trainer's side of data-regularised post-training: feeds the `DataReg` engine (scale/datareg.py,
which knows nothing of the trainer) the trainer's rows, its target data and its loss."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scale.config import DataRegConfig
from scale.data import prepare_data
from scale.datareg import DataReg, selection_stats


class _DetachedHead(nn.Module):
    """A linear output head with detached parameters (the merged target rows' log-probs)."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.weight = head.weight.detach()
        self.bias = None if head.bias is None else head.bias.detach()

    def forward(self, h):
        return F.linear(h, self.weight, self.bias)


class TrainerHook:
    """The ``datareg:`` section inside ``scale.train.Trainer``: target data (loaded before the model), the
    engine (built on first use), and ``backward(rows, norms)``, which replaces the ordinary backward.

    The target loss (``datareg.target_loss``), on ``target_batch_size`` target examples cycled in file order,
    the same on every process:
      nll         the SFT token-mean NLL of the examples' completions (prompt / completion), whatever the
                  method (SFT, DPO, RL): the target task's likelihood;
    and for RL methods, on ``generation.n`` rollouts of each target prompt (prompt / answer) drawn from the
    current policy with a seed of (run.seed, step), graded by method.rl.reward (docs/drpt.md 1.6, RLHF / RLVR):
      reward      -sum A_i log pi(y_i) / tokens with A the rewards normalised over the target batch
                  ((R - mean) / std; R - 0.5 when they are all equal), the released code's "reward" loss;
      pg          the same with the method's own advantages (GRPO: per group): "pre-clip-ppo", the policy
                  gradient before any clipping;
      train_loss  the method's whole training loss on the target rollouts ("full-ppo"), KL term included.
    Samples: a row, or a DPO pair (its two rows); weights: scored tokens under a global token mean, else 1
    (per-sequence means, DPO pairs).
    """

    def __init__(self, trainer, context: int):
        d = trainer.cfg.datareg
        self.tr, self.cfg = trainer, d
        self.engine: DataReg | None = None
        self.target: list[dict] = []
        self._stats: list[dict] = []   # this step's selection statistics, one dict per micro-batch
        self.rl_target = d.target_loss != "nll"
        if self.rl_target and not trainer.method.rollouts:
            raise ValueError(f"datareg.target_loss: {d.target_loss} needs a method that samples rollouts (the RL "
                             f"family), got method.name={trainer.cfg.method.name!r}; use nll")
        if d.target == "file":
            g = trainer.cfg.generation
            try:
                self.target = prepare_data(d.target_path, trainer.cfg, trainer.tok, "rl" if self.rl_target else "sft",
                                           context, max_new_tokens=g.max_new_tokens if self.rl_target else 0,
                                           other_columns=self.rl_target)
            except ValueError as e:
                raise ValueError(f"datareg.target_path: {e}") from None
            if not self.target:
                raise ValueError(f"datareg.target_path: the target set {d.target_path!r} is empty")
            if d.target_size:   # the released code's n_val examples, a different subset per seed
                if d.target_size > len(self.target):
                    raise ValueError(f"datareg.target_size: {d.target_size} is more than the {len(self.target)} "
                                     f"examples of {d.target_path}")
                pick = np.random.default_rng([trainer.cfg.run.seed, 0x7A]).permutation(len(self.target))
                self.target = [self.target[i] for i in pick[:d.target_size]]

    def metrics(self) -> dict[str, float]:
        """The step's selection statistics (`scale.datareg.selection_stats`) and target loss, as datareg/<name>,
        each the mean over the step's micro-batches that have it."""
        keys = sorted({k for st in self._stats for k in st})
        return {f"datareg/{k}": float(sum(st[k] for st in self._stats if k in st) /
                                      sum(1 for st in self._stats if k in st)) for k in keys}

    def _engine(self) -> DataReg:
        if self.engine is None:
            # the engine kind was checked before the model loaded (scale.train.check_engine)
            keys = [f.name for f in dataclasses.fields(DataRegConfig)]
            model = self.tr._model()
            head = model.get_output_embeddings()
            if self.cfg.merged_target and not isinstance(head, nn.Linear):
                raise ValueError("datareg.merged_target: the model's output head is not an nn.Linear")
            # the head sees flattened scored tokens (scale.logprobs); merged target rows use _DetachedHead
            self.engine = DataReg(model, DataRegConfig(**{k: getattr(self.cfg, k) for k in keys}),
                                  unsplit=(head,) if head is not None else ())
        return self.engine

    def _target_rows(self) -> list:
        from scale.loss import Row

        b, step = self.cfg.target_batch_size, self.tr.step
        exs = [self.target[(step * b + j) % len(self.target)] for j in range(b)]
        return [Row(list(e["completion"]["input_ids"]), e["completion"]["prompt_len"], "sft") for e in exs]

    def _rl_target_rows(self) -> list:
        """Rollouts of this step's target prompts with their advantages (class docstring); the same on every
        process (a seeded draw from the same parameters)."""
        from scale.loss import Row

        tr, b, n = self.tr, self.cfg.target_batch_size, self.tr.cfg.generation.n
        idx = [(tr.step * b + j) % len(self.target) for j in range(b)]
        exs = [self.target[i] for i in idx]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(tr.cfg.run.seed * 1_000_003 + tr.step)
            comps = tr.generate([e["prompt_ids"] for e in exs], n)
        texts = tr.tok.batch_decode(comps, skip_special_tokens=True)
        answers, which = [e["answer"] for e in exs for _ in range(n)], [i for i in idx for _ in range(n)]
        R = torch.tensor(tr.rewards(texts, answers, which, f"step {tr.step + 1} (datareg target)", completion_ids=comps,
                                    data=(self.target, self.cfg.target_path)), dtype=torch.float64)
        rows = [Row(e["prompt_ids"] + comps[q * n + k], len(e["prompt_ids"]), "rl",
                    meta={"group": q, "reward": float(R[q * n + k])}) for q, e in enumerate(exs) for k in range(n)]
        if self.cfg.target_loss == "reward":
            sd = R.std(unbiased=False)
            A = (R - R.mean()) / sd if sd > 0 else R - 0.5
        else:
            A = tr.terms.rl.advantages(R, group_size=n, lengths=torch.tensor([float(r.n_scored) for r in rows],
                                                                             dtype=torch.float64))
        for rw, a in zip(rows, A.tolist()):
            rw.advantage = a
        if self.cfg.target_loss == "train_loss" and tr.terms.rl.kl_coef and tr.terms.rl.kl_placement == "loss":
            for rw, lp in zip(rows, tr.reference.token_logps(rows)):
                rw.ref_token_logp = lp.tolist()
        self.target_reward, self.last_target_rows = float(R.mean()), rows
        return rows

    def _samples(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        terms = self.tr.terms
        token_mean = {"sft": terms.sft is not None and terms.sft.aggregation == "global_token_mean",
                      "rl": terms.rl is not None and terms.rl.aggregation == "global_token_mean"}
        sample_of_row, weights = [], []
        for i, rw in enumerate(rows):
            if rw.kind == "rejected" and i and rows[i - 1].kind == "chosen":
                sample_of_row.append(len(weights) - 1)
                continue
            kind = "rl" if rw.kind in ("rl", "demo") else rw.kind
            sample_of_row.append(len(weights))
            weights.append(float(max(rw.n_scored, 1)) if token_mean.get(kind) else 1.0)
        return torch.tensor(sample_of_row), torch.tensor(weights, dtype=torch.float64)

    def backward(self, rows, norms: dict, micro: int = 0, n_micro: int = 1) -> tuple[torch.Tensor, dict]:
        """Add the rule's gradients of micro-batch ``micro`` (of ``n_micro``) of this process's rows; the
        target is captured on the first micro-batch, the sum over processes done after the last. Returns
        (loss, statistics)."""
        from scale.logprobs import selected_logprobs
        from scale.loss import Terms, collate, local_counts, micro_loss, sft_estimator

        tr, eng = self.tr, self._engine()
        # target cycling and the random control follow the trainer's (checkpointed) step: resume is exact
        eng.step_count = tr.step * n_micro + micro
        dev, pad = tr.acc.device, tr.tok.pad_token_id
        seen: dict = {}

        def general_loss(sel):
            part = rows if sel is None else [rows[i] for i in sel.tolist()]
            mb = collate(part, pad, dev)
            lp, ent = tr.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"],
                                temperature=tr.cfg.generation.temperature, **tr.entropy_args())
            loss, st = micro_loss(lp, ent, mb, tr.terms, norms)
            seen.setdefault("out", (float(loss.detach()), st))  # statistics of the whole batch's pass
            return loss

        def target_nll(lp, ent, mb, trows):
            loss = micro_loss(lp, ent, mb, Terms(sft=sft_estimator("global_token_mean")), local_counts(trows))[0]
            seen.setdefault("target", float(loss.detach()))
            return loss

        def target_loss():
            trows = self._rl_target_rows() if self.rl_target else self._target_rows()
            mb = collate(trows, pad, dev)
            bonus = self.cfg.target_loss == "train_loss" and bool(tr.terms.entropy_coef)   # part of that loss
            temp = tr.cfg.generation.temperature if self.rl_target else 1.0
            lp, ent = tr.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"], with_entropy=bonus,
                                entropy_grad=bonus, temperature=temp)
            if not self.rl_target:
                return target_nll(lp, ent, mb, trows)
            if self.cfg.target_loss == "train_loss":
                loss = micro_loss(lp, ent, mb, tr.terms, local_counts(trows))[0]
            else:   # -sum A log pi / tokens (clipping is inactive on-policy, so no ratio is needed)
                A = torch.tensor([rw.advantage for rw in trows], dtype=lp.dtype, device=lp.device)
                M = mb["score_mask"].to(lp.dtype)
                loss = -(A[:, None] * lp * M).sum() / M.sum().clamp(min=1)
            seen.setdefault("target", float(loss.detach()))
            return loss

        def merged_loss(sel):
            """One decoder pass over the general rows then the target rows; the head is applied to each part
            (the target's at temperature 1 with detached weights, so only hooked layers see the target)."""
            trows, n = self._target_rows(), len(rows)
            mb = collate(list(rows) + trows, pad, dev)
            pol = tr.acc.unwrap_model(tr.policy)
            h, head = pol.hidden(mb["input_ids"], mb["attention_mask"]), pol.model.get_output_embeddings()
            part = [{k: None if v is None else v[sl] for k, v in mb.items()} for sl in (slice(0, n), slice(n, None))]
            lp, ent = selected_logprobs(h[:n], head, part[0]["input_ids"], part[0]["score_mask"],
                                        temperature=tr.cfg.generation.temperature, chunk=pol.chunk,
                                        memory_mb=pol.memory_mb, **tr.entropy_args())
            loss, st = micro_loss(lp, ent, part[0], tr.terms, norms)
            seen.setdefault("out", (float(loss.detach()), st))
            tlp, tent = selected_logprobs(h[n:], _DetachedHead(head), part[1]["input_ids"], part[1]["score_mask"],
                                          chunk=pol.chunk, memory_mb=pol.memory_mb, with_entropy=False)
            return loss + target_nll(tlp, tent, part[1], trows)

        sample_of_row, weights = self._samples(rows)
        merged = self.cfg.merged_target
        target = "batch" if self.cfg.target == "batch" else (None if merged else target_loss)
        info = eng.step(merged_loss if merged else general_loss, weights, target, sample_of_row=sample_of_row,
                        no_sync=lambda: tr.acc.no_sync(tr.policy), new_target=micro == 0,
                        sync=micro == n_micro - 1, merged=self.cfg.target_batch_size if merged else 0)
        self.last_info = info
        if micro == 0:
            self._stats = []
        tl = {"target_loss": seen["target"]} if "target" in seen else {}
        if self.rl_target and "target" in seen:
            tl["target_reward"] = self.target_reward
        self._stats.append({**selection_stats(info, eng.N), **tl})
        loss, st = seen.get("out", (0.0, {}))
        return torch.tensor(loss), st
