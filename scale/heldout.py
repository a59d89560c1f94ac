"""Evaluation inside the trainer: the `eval:` config section, run every `eval.every` steps and at the end.
A set may keep its own interval (`eval.sets[i].every`; 0 = only at the end), e.g. a small probe set
evaluated often beside a full test set evaluated rarely.

Three kinds of held-out set (`eval.sets[i].kind`):

    generate   prompt, answer (optional id, level): n completions per prompt sampled with the trainer's own
               rollout settings (generation.temperature / top_p / top_k, the same function as the rollouts),
               graded by the reward; metrics avg@n, pass@k (unbiased, k <= n), greedy accuracy (one greedy
               decode per prompt), each overall, per level ("L3/avg@8") and per role ("middle/avg@8") when
               the set has `level` / `role` columns
    sft        prompt, completion: f_sft = the SFT loss on the set (mean token negative log-likelihood)
    dpo        prompt, chosen, rejected: f_dpo = the DPO loss against the reference model (mean over pairs,
               beta = method.dpo.beta) and pref_accuracy = fraction of pairs with a positive implicit margin

Metrics are logged as "eval/<set>/<metric>" on the step's line of metrics.jsonl (and TensorBoard); with
`eval.at_start` the initial model is evaluated as step 0. Per-prompt correct counts of the generate sets go
to eval_records.jsonl: {"step", "set", "id", "level", "n", "correct", "greedy"}.

Sampling during evaluation uses its own seeded random stream (seed, step), restored afterwards, so turning
evaluation on or off does not change the training run. Under several processes each process evaluates
its share of the prompts and the counts are gathered.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from scale.logprobs import policy_logps
from scale.loss import Row, collate
from scale.methods.dpo import pair_rows


class HeldOut:
    def __init__(self, trainer, context: int):
        from scale.data import prepare_data
        from scale.evaluate import GROUPS

        self.t, self.cfg = trainer, trainer.cfg.eval
        self.sets = []
        for s in self.cfg.sets:
            kind = {"generate": "rl", "sft": "sft", "dpo": "dpo"}[s.kind]
            max_new = self.cfg.max_new_tokens or trainer.cfg.generation.max_new_tokens
            data = prepare_data(s.path, trainer.cfg, trainer.tok, kind, context, limit=s.limit, columns={},
                                keep=("id", *GROUPS), max_new_tokens=max_new if s.kind == "generate" else 0,
                                other_columns=s.kind == "generate")   # the reward functions get them
            self.sets.append((s, data))
        self.rewards = {}   # set name -> its reward (the set's own, else eval.reward, else the method's)
        if any(s.kind == "generate" for s in self.cfg.sets):
            from scale.rewards import load_rewards

            rl = trainer.cfg.method.rl
            default = load_rewards(self.cfg.reward, key="eval.reward") if self.cfg.reward else \
                load_rewards(rl.reward, rl.reward_weights, "method.rl.reward")
            for i, (s, data) in enumerate(self.sets):  # each signature against the set's columns, before the model
                if s.kind == "generate":
                    fn = load_rewards(s.reward, key=f"eval.sets[{i}].reward") if s.reward else default
                    fn.check(data[0].get("columns", {}))
                    self.rewards[s.name] = fn

    def due(self, step: int, last: int) -> bool:
        return any(self._set_due(s, step, last) for s, _ in self.sets)

    def _set_due(self, s, step: int, last: int) -> bool:
        if step == 0:
            return self.cfg.at_start
        every = self.cfg.every if s.every < 0 else s.every
        return step == last or bool(every and step % every == 0)

    def run(self, step: int, last: int) -> tuple[dict[str, float], list[dict]]:
        """(metrics, per-prompt records) of every set due at `step` (of `last`), at the current parameters."""
        metrics, records = {}, []
        model = self.t._model()
        was_training = model.training
        model.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed((self.t.cfg.run.seed * 1_000_003 + step) * 1024 + self.t.acc.process_index)
            for s, data in self.sets:
                if not self._set_due(s, step, last):
                    continue
                if s.kind == "generate":
                    m, rec = self._generate(s, data, step)
                    records += rec
                else:
                    m = self._objective(s, data)
                metrics.update({f"eval/{s.name}/{k}": v for k, v in m.items()})
        model.train(was_training)
        return metrics, records

    # ------------------------------------------------------------------ generate sets
    def _generate(self, s, data, step):
        from scale.evaluate import GROUPS, grade, metrics_of

        t, c = self.t, self.cfg
        mine = list(range(t.acc.process_index, len(data), t.P))
        max_new = c.max_new_tokens or t.cfg.generation.max_new_tokens
        local = []
        for lo in range(0, len(mine), c.batch_size):
            chunk = [data[i] for i in mine[lo:lo + c.batch_size]]
            prompts = [e["prompt_ids"] for e in chunk]
            sampled = t.generate(prompts, c.n, max_new_tokens=max_new)
            greedy = t.generate(prompts, 1, max_new_tokens=max_new, greedy=True) if c.greedy else None
            texts = t.tok.batch_decode(sampled, skip_special_tokens=True)
            rows = [{"id": e.get("id", i), "answer": e["answer"], "prompt": e["prompt"],
                     "columns": e.get("columns", {}), **{k: e[k] for k in GROUPS if k in e}}
                    for i, e in zip(mine[lo:lo + c.batch_size], chunk)]
            state = SimpleNamespace(global_step=step, max_steps=t.cfg.run.max_steps)
            per = grade(rows, [texts[j * c.n:(j + 1) * c.n] for j in range(len(chunk))], self.rewards[s.name], c.n,
                        completion_ids=[sampled[j * c.n:(j + 1) * c.n] for j in range(len(chunk))],
                        trainer_state=state)
            if greedy is not None:
                g_texts = t.tok.batch_decode(greedy, skip_special_tokens=True)
                g_per = grade(rows, [[x] for x in g_texts], self.rewards[s.name], 1,
                              completion_ids=[[x] for x in greedy], trainer_state=state)
                for p, g in zip(per, g_per):
                    p["greedy"] = g["correct"]
            for p in per:
                del p["rewards"]
            local += per
        per_prompt = [p for part in _gather(t.acc, local) for p in part]
        return metrics_of(per_prompt, c.n, self.ks), \
            [{"step": step, "set": s.name, **p} for p in per_prompt]

    @property
    def ks(self) -> list[int]:
        n = self.cfg.n
        return sorted(set(self.cfg.ks or [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]))

    # ------------------------------------------------------------------ objective sets
    def _objective(self, s, data) -> dict[str, float]:
        """f_sft or f_dpo (and the preference accuracy) on this process's share, summed over processes."""
        t = self.t
        mine = list(range(t.acc.process_index, len(data), t.P))
        if s.kind == "sft":
            rows = [Row(list(data[i]["completion"]["input_ids"]), data[i]["completion"]["prompt_len"], "sft")
                    for i in mine]
            sums = self._row_logps(rows)
            nll = -sum(lp for lp, _ in sums)
            tokens = sum(n for _, n in sums)
            nll, tokens = _reduce(t.acc, [nll, float(tokens)])
            return {"f_sft": nll / tokens}
        rows = pair_rows(t, mine, data=data)
        sums = self._row_logps(rows)
        beta = t.cfg.method.dpo.beta
        loss = wins = 0.0
        for k in range(0, len(rows), 2):
            margin = beta * ((sums[k][0] - rows[k].ref_logp) - (sums[k + 1][0] - rows[k + 1].ref_logp))
            loss += float(-F.logsigmoid(torch.tensor(margin, dtype=torch.float64)))
            wins += float(margin > 0)
        loss, wins, pairs = _reduce(t.acc, [loss, wins, float(len(rows) // 2)])
        return {"f_dpo": loss / pairs, "pref_accuracy": wins / pairs}

    def _row_logps(self, rows: list[Row]) -> list[tuple[float, int]]:
        """(summed log-prob of the scored tokens, their number) per row, at temperature 1."""
        t, out = self.t, []
        B = self.cfg.batch_size
        for lo in range(0, len(rows), B):
            chunk = rows[lo:lo + B]
            mb = collate(chunk, t.tok.pad_token_id, t.acc.device)
            lp, _ = policy_logps(t.acc.unwrap_model(t.policy), mb, t.cfg.run.packing, with_entropy=False)
            out += [(float(lp[i].double().sum()), rw.n_scored) for i, rw in enumerate(chunk)]
        return out

    def trim(self, step: int) -> None:
        path = self.t.out / "eval_records.jsonl"
        if self.t.acc.is_main_process and path.exists():
            keep = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            path.write_text("".join(ln + "\n" for ln in keep))

    def write_records(self, records: list[dict]) -> None:
        if records and self.t.acc.is_main_process and self.cfg.records:
            with open(self.t.out / "eval_records.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)


def _gather(acc, obj: list) -> list[list]:
    if acc.num_processes == 1:
        return [obj]
    from accelerate.utils import gather_object

    return gather_object([obj])


def _reduce(acc, values: list[float]) -> list[float]:
    v = torch.tensor(values, dtype=torch.float64, device=acc.device)
    v = acc.reduce(v, "sum") if acc.num_processes > 1 else v
    out = v.tolist()
    if not all(math.isfinite(x) for x in out):
        raise ValueError(f"eval: a held-out objective is not finite ({out}); the model may have diverged")
    return out
