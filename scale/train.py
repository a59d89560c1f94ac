"""`ptlab train CONFIG.yaml [key=value ...]`: one trainer for every method, on `accelerate`.

The method (`scale/methods/`, found by `method.name` in its registry) says what the run needs and builds
each step's rows; the trainer does the rest. One training step:

1. rows: `method.rows(trainer, step, info)`, this process's share of the global batch as `scale.loss.Row`s
   (from the data, from sampled completions graded by the reward, or both);
2. update: `method.update(trainer, rows, info)`, normally one `Trainer.update`: global counts are summed
   over processes; the rows are split into `grad_accum` micro-batches; each micro-batch's loss is its
   share of the global loss (`scale.loss.micro_loss`), scaled by grad_accum x processes; clip, step;
3. log, evaluate (the `eval:` section, `scale/heldout.py`), checkpoint (`scale/checkpoint.py`).

Run on one CPU/GPU with `ptlab train cfg.yaml`, on several with `accelerate launch --config_file
scale/accelerate_configs/ddp.yaml -m experiments.cli train cfg.yaml`, or on CPU processes with
`torchrun --nproc_per_node 2 -m experiments.cli train cfg.yaml run.cpu=true`.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from scale import checkpoint as ckpt
from scale import rundir
from scale.checks import check_model_path, check_output_dir, loaded
from scale.config import Config, load_config
from scale.data import prepare_data
from scale.generation import Generator
from scale.logprobs import PACKED_ATTENTION, Policy, packing_error, policy_logps, use_packed_attention
from scale.loss import Row, collate, local_counts, micro_loss, split_rows
from scale.methods import get_method
from scale.mlp import fuse_gated_mlps
from scale.reference import Reference
from scale.runlog import Logger, peak_rss_mb, progress

STAT_KEYS = ("rl_loss", "sft_loss", "dpo_loss", "clip_sum", "ratio_sum", "kl_sum", "sft_nll_sum", "dpo_loss_sum",
             "dpo_acc_sum", "dpo_margin_sum", "entropy_sum")


class Trainer:
    def __init__(self, cfg: Config, accelerator=None):
        from accelerate import Accelerator
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg.validate()
        self.method = method = get_method(cfg.method.name)(cfg)
        r, g = cfg.run, cfg.generation
        if r.threads:   # on a shared CPU, fewer threads than cores avoids oversubscription (README, Threads)
            torch.set_num_threads(r.threads)
        # 1. everything that can fail on bad input, before any model weights load
        check_model_path(cfg.model.path)
        if cfg.model.ref_path:
            check_model_path(cfg.model.ref_path, "model.ref_path")
        check_output_dir(r.output_dir)
        if method.rollouts:
            from scale.rewards import load_rewards

            self.reward_fn = load_rewards(cfg.method.rl.reward, cfg.method.rl.reward_weights, "method.rl.reward")
        self.tok = loaded("the tokenizer", cfg.model.path, AutoTokenizer.from_pretrained)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        mcfg = loaded("the model config", cfg.model.path, AutoConfig.from_pretrained)
        context = getattr(mcfg, "max_position_embeddings", None) or cfg.data.max_length
        self.data = prepare_data(cfg.data.path, cfg, self.tok, method.data, context, who=cfg.method.name,
                                 max_new_tokens=g.max_new_tokens if method.rollouts else 0,
                                 other_columns=method.rollouts)   # the reward functions get them
        self.pref = self.data
        if method.pref_data:
            self.pref = prepare_data(cfg.data.pref_path or cfg.data.path, cfg, self.tok, "dpo", context,
                                     limit=cfg.data.pref_limit or cfg.data.limit,
                                     columns=cfg.data.pref_columns if cfg.data.pref_path else None)
        if method.rollouts:
            self._trial_reward()
        self.terms = method.terms(self)
        if r.skip_zero_advantage:
            self._check_skip(method)
        self.schedule = method.schedule()
        self.datareg = None  # Dr. Post-Training update rules (scale/datareg.py); target data checked here
        if cfg.datareg.update_rule != "full":
            from scale.datareg_hook import TrainerHook

            self.datareg = TrainerHook(self, context)
        from scale.heldout import HeldOut

        self.heldout = HeldOut(self, context)  # the eval: section's sets, loaded and checked before the model
        self.resuming = rundir.decide(cfg)  # one run per folder: resume only the same config, never mix runs

        # 2. accelerate and the model
        trackers = check_trackers(r.report_to)
        self.acc = accelerator or Accelerator(cpu=r.cpu, mixed_precision=r.mixed_precision, log_with=trackers or None,
                                              project_dir=r.output_dir,
                                              gradient_accumulation_steps=r.grad_accum)
        self.P = self.acc.num_processes
        if r.batch_size % self.P:
            raise ValueError(f"run.batch_size: {r.batch_size} is not divisible by the {self.P} processes")
        if (r.batch_size // self.P) % cfg.method.rl.mini_batches:
            raise ValueError(f"method.rl.mini_batches: must divide the per-process batch {r.batch_size // self.P}")
        check_engine(self.acc, cfg)
        self._deepspeed_fixups()
        self._fsdp2_fixups()
        if cfg.model.dtype in ("bfloat16", "float16") and not cfg.model.lora.enabled and self.acc.is_main_process:
            print(f"ptlab train: warning: model.dtype={cfg.model.dtype} trains half-precision weights with no float32 "
                  "copy: small updates round away (README, 'Precision'); use model.dtype=float32 with "
                  "run.mixed_precision=bf16", file=sys.stderr, flush=True)
        model = self._load_model(cfg.model.path)
        if r.padding_free:
            self._check_packing(model)
        ref = None
        needs_ref = method.needs_reference() or any(s.kind == "dpo" for s in cfg.eval.sets)
        if needs_ref and (cfg.model.ref_path or not cfg.model.lora.enabled):  # LoRA: the adapter-free base
            ref = self._make_reference(model)
        if cfg.model.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lc = cfg.model.lora
            # lora_A starts random: draw it from run.seed, so every process (and a one-process run of the same
            # config) starts from the same adapter. Unseeded, the draw depended on what had used torch's
            # generator before (the launcher, the engine set-up): 2 processes started elsewhere than one.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(r.seed)
                model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                         target_modules=lc.target_modules, task_type="CAUSAL_LM"))
        if cfg.model.gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):   # transformers >= 5.2x; the old name warns
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        if r.fused_mlp:   # after LoRA, so that an adapted down_proj is seen as one
            self._fuse_mlps(model)
        policy = Policy(model, chunk=r.logprob_chunk, memory_mb=r.logprob_memory_mb)
        params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay,
                                     fused=_fused_adamw(self.acc, params))
        self.updates_per_step = method.updates_per_step()
        self.sched = _lr_schedule(self.opt, r, r.max_steps * self.updates_per_step)
        self.policy, self.opt = self.acc.prepare(policy, self.opt)
        self.acc.register_for_checkpointing(self.sched)  # stepped by us: once per update, any process count
        if ref is not None:
            ref = self._frozen_engine(ref) if self._zero3() else ref.to(self.acc.device)
        self.reference = Reference(self, ref)
        if method.uses_pairs and cfg.method.dpo.precompute_ref:
            self.reference.precompute(self.pref)
        corrected = self.terms.rl is not None and self.terms.rl.rollout_correction != "none"
        self.generator = Generator(cfg, self.tok, self.acc, self._model, rollouts=method.rollouts,
                                   root_fn=lambda: self.policy, logprobs=corrected)
        self.step, self.stopped_by = 0, 0
        self.out = Path(r.output_dir)
        self._perms: dict = {}

    # ------------------------------------------------------------------ pieces
    def _dtype(self):
        name = self.cfg.model.dtype
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return getattr(torch, name)

    def _load_model(self, path, key="model.path"):
        from transformers import AutoModelForCausalLM

        model = loaded("the model", path, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=self._dtype()), key)
        if self.cfg.run.padding_free:   # packed rows attend one example at a time (scale.logprobs)
            use_packed_attention(model)
        return model

    def _check_skip(self, method) -> None:
        """run.skip_zero_advantage is exact only where a sample's loss is its advantage times a factor: refused
        (naming the key) for a method with no RL samples, a KL term in the loss or an entropy bonus, which act
        on a sample whatever its advantage."""
        rl, why = self.terms.rl, None
        if not method.rollouts or rl is None:
            why = f"method {self.cfg.method.name!r} samples no RL completions"
        elif rl.kl_coef and rl.kl_placement == "loss":
            why = "the KL term in the loss (method.rl.kl_coef with kl_placement loss) acts on every sample"
        elif self.terms.entropy_coef:
            why = "the entropy bonus (method.rl.entropy_coef) acts on every sample"
        if why:
            raise ValueError(f"run.skip_zero_advantage: {why}, so no sample's gradient is known to be zero; set it "
                             "to false")

    def _zero_gradient_rows(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """(rows to train on, rows left out): with run.skip_zero_advantage, the RL samples whose advantage times
        weight is exactly 0. Each of their tokens adds A x (a factor) = 0 to the loss, so their gradient is exactly
        0 and the step's is the same without them (up to the summation order), provided their tokens still count
        in the normalisers (`update` takes those from every row first). A group whose rewards are all equal has
        only such samples (GRPO, RLOO, Dr. GRPO): on a real RLVR batch, every prompt that is always or never
        solved."""
        if not self.cfg.run.skip_zero_advantage:
            return rows, []
        out = [rw.kind == "rl" and rw.advantage * rw.weight == 0.0 for rw in rows]
        return [rw for rw, o in zip(rows, out) if not o], [rw for rw, o in zip(rows, out) if o]

    def _left_out_stats(self, rows: list[Row], norms: dict, stats: dict) -> int:
        """The statistics of the rows `_zero_gradient_rows` left out, added to `stats` so that the logged values
        are those of the whole batch; returns their tokens. Their clip and ratio statistics need their log-probs
        only off-policy (several updates per batch, old log-probs) or under a rollout correction, and their
        entropy only on the steps that log it; otherwise (their ratio is exactly 1 and nothing is clipped) zeros
        stand in for the log-probs and no forward runs. The choice is the same on every process, and a forward
        runs in run.grad_accum micro-batches there (collectives under FSDP / ZeRO-3)."""
        r = self.cfg.run
        if not r.skip_zero_advantage:
            return 0
        ent = self.entropy_args()["with_entropy"]
        forward = ent or self.updates_per_step > 1 or self.terms.rl.rollout_correction != "none"
        if not (rows or forward):
            return 0
        for mb_rows in split_rows(rows, r.grad_accum if forward else 1):
            mb = self.collate(mb_rows)
            with torch.no_grad():
                if forward:
                    lp, e = self._logps(mb, with_entropy=ent, entropy_grad=False)
                else:
                    lp, e = torch.zeros(mb["score_mask"].shape, dtype=torch.float64, device=self.acc.device), None
                _, st = micro_loss(lp, e, mb, self.terms, norms)
            for k, v in st.items():
                stats[k] += v
        return sum(len(rw.input_ids) for rw in rows)

    def _check_packing(self, model) -> None:
        """run.padding_free: the model's hidden states on packed rows equal those of the rows alone (a model
        whose attention ignores the position ids would let rows attend to each other); with run.share_prefix,
        also those of a row that continues a shared prefix. Skipped where the weights are not all here yet
        (ZeRO-3 partitions, FSDP's meta-device loading)."""
        impl = getattr(model.config, "_attn_implementation", None)
        share = self.cfg.run.share_prefix
        if share and impl != PACKED_ATTENTION:
            raise ValueError(f"run.share_prefix: needs ptlab's per-example attention, which replaces sdpa only; "
                             f"this model's attention is {impl!r} (README, 'Padding')")
        if not str(impl).startswith("flash") and impl != PACKED_ATTENTION and _is_main():
            print(f"ptlab train: note: run.padding_free with attention {impl!r} builds a block-diagonal mask over "
                  "each packed micro-batch, so attention costs grow with the square of its total tokens (on CPU "
                  "it measured slower than run.group_by_length: README, 'Padding'); flash-attention runs each "
                  "row on its own", file=sys.stderr, flush=True)
        if self._zero3() or any(p.device.type == "meta" for p in model.parameters()):
            return
        tol = 1e-2 if self._dtype() in (torch.bfloat16, torch.float16) else 1e-4
        checks = (("run.padding_free", False, "run.group_by_length"),
                  ("run.share_prefix", True, "run.padding_free alone"))
        for key, shared, instead in checks[:1 + share]:
            err = packing_error(model, shared=shared)
            if not err <= tol:
                raise ValueError(f"{key}: {type(model).__name__} (attention {impl!r}) does not keep packed rows "
                                 f"apart: hidden states differ from unpacked ones by {err:.3g} (relative); use "
                                 f"{instead} instead")

    def _fuse_mlps(self, model) -> None:
        """run.fused_mlp (scale.mlp): down_proj is taken over unless an engine shards its weight (FSDP, ZeRO-3:
        the weight must stay with the engine) or it is not a plain Linear without bias (a LoRA layer)."""
        sharded = self._zero3() or getattr(self.acc.state, "fsdp_plugin", None) is not None
        counts = fuse_gated_mlps(model, take_down_proj=not sharded)
        if not sum(counts.values()):
            raise ValueError(f"run.fused_mlp: {type(model).__name__} has no gated SiLU MLP (gate_proj, up_proj, "
                             "down_proj and a SiLU act_fn) to switch; set run.fused_mlp=false")

    def _make_reference(self, model):
        m = self.cfg.model
        if m.ref_path or self._zero3():   # ZeRO-3 loads partitioned weights: a copy would copy empty shards
            ref = self._load_model(m.ref_path or m.path, "model.ref_path" if m.ref_path else "model.path")
        else:
            ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        return Policy(ref.eval(), chunk=self.cfg.run.logprob_chunk, memory_mb=self.cfg.run.logprob_memory_mb)

    def _zero3(self) -> bool:
        plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3

    def _frozen_engine(self, ref):
        """Under ZeRO-3 the reference gets its own DeepSpeed engine without an optimizer (as TRL and verl do):
        its parameters stay partitioned and its forward gathers them as the policy's does."""
        import deepspeed

        ds = copy.deepcopy(self.acc.state.deepspeed_plugin.deepspeed_config)
        engine, *_ = deepspeed.initialize(model=ref, config=ds)
        engine.eval()   # DeepSpeedEngine.eval returns None, not the module
        return engine

    def _fsdp2_fixups(self):
        """accelerate's FSDP2 mixed-precision policy casts the wrapped module's outputs, our log-probs, to the
        compute dtype (bf16), so PPO ratios and DPO margins would lose their low bits; and it reduces gradients
        in bf16. Keep the bf16 compute, leave outputs as computed (the head promotes the logits to float32
        itself, scale.logprobs) and reduce in float32. (output_dtype=float32 would also cast every inner
        block's output, and the next block's bf16 weights would meet float32 inputs.)"""
        plugin = getattr(self.acc.state, "fsdp_plugin", None)
        mp = getattr(plugin, "mixed_precision_policy", None)
        if plugin is None or getattr(plugin, "fsdp_version", 1) != 2 or getattr(mp, "param_dtype", None) is None:
            return   # not FSDP2, or no mixed precision: parameters, outputs and reductions keep the model's dtype
        from torch.distributed.fsdp import MixedPrecisionPolicy

        plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=mp.param_dtype, reduce_dtype=torch.float32,
                                                             output_dtype=None,
                                                             cast_forward_inputs=mp.cast_forward_inputs)

    def _deepspeed_fixups(self):
        plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        # Our micro-batches vary in size; DeepSpeed only needs consistent numbers for its bookkeeping.
        ds, r = plugin.deepspeed_config, self.cfg.run
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_accumulation_steps"] = r.grad_accum
        ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * r.grad_accum * self.P
        # DeepSpeed clips inside its own step (accelerate's clip_grad_norm_ does nothing there): run.max_grad_norm
        # goes into its config, 0 = no clipping as in ptlab
        ds["gradient_clipping"] = float(r.max_grad_norm)

    def _model(self):
        return self.acc.unwrap_model(self.policy).model

    def collate(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        return collate(rows, self.tok.pad_token_id, self.acc.device)

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int = 0,
                 greedy: bool = False) -> list[list[int]]:
        """n sampled completions per prompt (`scale.generation.Generator`), or greedy ones."""
        return self.generator.generate(prompts, n, max_new_tokens, greedy)

    # ------------------------------------------------------------------ data order
    def local_indices(self, step: int, n_items: int, size: int) -> list[int]:
        """This process's share of the global batch of `size` items at `step`: epoch-wise seeded
        permutations, a pure function of (seed, step), so resuming needs only the step."""
        per = size // self.P
        start = step * size + self.acc.process_index * per
        out = []
        for k in range(start, start + per):
            epoch, pos = divmod(k, n_items)
            if self.cfg.data.shuffle:
                key = (n_items, epoch)
                if key not in self._perms:
                    self._perms[key] = np.random.default_rng([self.cfg.run.seed, epoch]).permutation(n_items)
                out.append(int(self._perms[key][pos]))
            else:
                out.append(pos)
        return out

    # ------------------------------------------------------------------ rewards
    def rewards(self, texts, answers, examples, when: str, completion_ids=None,
                parts: dict | None = None, data: tuple[list, str] | None = None) -> list[float]:
        """The reward functions (`scale.rewards.Rewards`) on completions `texts` of the data examples `examples`
        (indices into data.path, or into `data` = (examples, their file), one per completion), called with the
        examples' prompts and other columns, `completion_ids` and the step: the weighted total per completion
        (each function's values go into `parts` when given). A failure also names the data example of the
        completion to blame, and when."""
        from types import SimpleNamespace

        from scale.rewards import RewardError

        rows, path = data or (self.data, self.cfg.data.path)
        exs = [rows[i] for i in examples]
        names = list(exs[0].get("columns", {})) if exs else []
        state = SimpleNamespace(global_step=getattr(self, "step", 0), max_steps=self.cfg.run.max_steps)
        try:
            totals, per = self.reward_fn.score(texts, answers, prompts=[e["prompt"] for e in exs],
                                               completion_ids=completion_ids, trainer_state=state,
                                               columns={k: [e.get("columns", {}).get(k) for e in exs] for k in names})
        except RewardError as e:
            where = f"example {examples[e.index]} of {path}, " if e.index is not None else ""
            raise ValueError(f"{e} [{where}{when}]") from e
        if parts is not None:
            parts.update(per)
        return totals

    def _trial_reward(self) -> None:
        """Before the model loads: each reward function's signature against the keywords it will get (the data's
        columns), then one call of each on the first example with its answer, boxed, as the completion. A
        function that fails on any input (a wrong signature, a None or NaN return) is named now, not after the
        model has loaded and the first batch has been generated."""
        e = self.data[0]
        self.reward_fn.check(e.get("columns", {}))
        text = f"\\boxed{{{e['answer']}}}"
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        self.rewards([text], [e["answer"]], [0], "a trial call before the model loads", completion_ids=[ids])

    # ------------------------------------------------------------------ the update
    def global_counts(self, rows: list[Row]) -> dict[str, float]:
        c = local_counts(rows)
        keys = sorted(c)
        v = self.acc.reduce(torch.tensor([c[k] for k in keys], dtype=torch.float64, device=self.acc.device), "sum")
        return dict(zip(keys, v.tolist()))

    def _logps(self, mb: dict, **kw):
        """The policy's (logp, entropy or None) of a collated micro-batch, in this run's layout and at the sampling
        temperature (`scale.logprobs.policy_logps`)."""
        return policy_logps(self.policy, mb, self.cfg.run.packing, temperature=self.cfg.generation.temperature, **kw)

    def entropy_args(self) -> dict:
        """Whether this step's forward computes the token entropy, and with its graph: an entropy bonus needs
        it (with gradients) every step; otherwise it is a statistic, computed on the steps that log it (every
        `run.entropy_every`-th, as numbered in metrics.jsonl) and skipped on the others."""
        bonus = bool(self.terms.entropy_coef)
        logged = (self.step + 1) % self.cfg.run.entropy_every == 0
        return {"with_entropy": bonus or logged, "entropy_grad": bonus}

    def update(self, rows: list[Row], extra_norms: dict | None = None) -> dict:
        """One optimizer step on this process's rows of a global batch; returns global statistics."""
        r = self.cfg.run
        norms = {**self.global_counts(rows), **(extra_norms or {})}
        stats = dict.fromkeys(STAT_KEYS, 0.0)
        total = 0.0
        tokens = 0
        scale = r.grad_accum * self.P
        trained, left_out = self._zero_gradient_rows(rows)   # after the counts: their tokens still normalise
        for j, mb_rows in enumerate(split_rows(trained, r.grad_accum, r.group_by_length)):
            mb = self.collate(mb_rows)
            tokens += int(mb["attention_mask"].sum())
            if getattr(self, "datareg", None) is not None:  # the rule's own backward (scale/datareg.py)
                loss, st = self.datareg.backward(mb_rows, norms, j, r.grad_accum)
            else:
                with self.acc.accumulate(self.policy):
                    lp, ent = self._logps(mb, **self.entropy_args())
                    loss, st = micro_loss(lp, ent, mb, self.terms, norms)
                    self.acc.backward(loss * scale)
            total += float(loss.detach())
            for k, v in st.items():
                stats[k] += v
        tokens += self._left_out_stats(left_out, norms, stats)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if r.max_grad_norm > 0:
            gn = float(self.acc.clip_grad_norm_(params, r.max_grad_norm))
        else:
            gn = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        skipped = not math.isfinite(gn) or (r.skip_grad_norm > 0 and gn > r.skip_grad_norm)
        if not skipped:
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        n_off = sum(1.0 for rw in rows if rw.meta.get("offline"))   # demonstrations in an on-policy batch
        # one float64 all-reduce for every sum (the offline count once went alone, and an int 0 on one rank met a
        # float on the other: gloo aborted, HPT on 2 processes)
        vec = torch.tensor([total, tokens, n_off] + [stats[k] for k in STAT_KEYS], dtype=torch.float64,
                           device=self.acc.device)
        vec = self.acc.reduce(vec, "sum").tolist()
        g = dict(zip(["loss", "tokens", "offline_rows", *STAT_KEYS], vec))
        out = {"loss": g["loss"], "grad_norm": gn, "skipped": float(skipped), "lr": self.sched.get_last_lr()[0],
               "tokens": g["tokens"]}
        if self.entropy_args()["with_entropy"]:   # other steps log no entropy rather than a made-up 0
            out["entropy"] = g["entropy_sum"] / max(norms["all_tokens"], 1.0)
        for k in ("rl_loss", "sft_loss", "dpo_loss"):
            if self.method.rollouts and k == "rl_loss" or norms["sft_rows"] and k == "sft_loss" \
                    or norms["pairs"] and k == "dpo_loss":
                out[k] = g[k]
        if norms["rl_tokens"]:
            out["clip_fraction"] = g["clip_sum"] / norms["rl_tokens"]
            out["kl"] = g["kl_sum"] / norms["rl_tokens"]
        if norms["pairs"]:
            out["dpo_accuracy"] = g["dpo_acc_sum"] / norms["pairs"]
            out["dpo_margin"] = g["dpo_margin_sum"] / norms["pairs"]
            out["kl"] = g["kl_sum"] / (2 * norms["pairs"])
        rows_all = norms["rl_rows"] + norms["sft_rows"] + 2 * norms["pairs"]
        out["offline_ratio"] = g["offline_rows"] / max(rows_all, 1.0) if self.method.rollouts else 0.0
        if getattr(self, "datareg", None) is not None:   # what the rule selected (equal on every process)
            out.update(self.datareg.metrics())
        return out

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        info: dict = {}
        rows = self.method.rows(self, step, info)
        t_gen = time.perf_counter() - t0
        metrics = self.method.update(self, rows, info)
        dt = time.perf_counter() - t0
        metrics.update(info, step=step + 1, step_time=dt, tokens_per_s=metrics["tokens"] / dt,
                       peak_rss_mb=peak_rss_mb())
        if self.method.rollouts:
            metrics["generation_time"] = t_gen
        else:   # no demonstrations-versus-samples ratio without samples
            metrics.pop("offline_ratio", None)
        return metrics

    @torch.no_grad()
    def fill_old_logps(self, rows: list[Row]) -> None:
        """The current policy's token log-probs of the scored tokens, kept for several updates on one batch."""
        r = self.cfg.run
        for mb_rows in split_rows(rows, max(1, len(rows) // 8), r.group_by_length):
            mb = self.collate(mb_rows)
            lp, _ = self._logps(mb, with_entropy=False)
            for i, rw in enumerate(mb_rows):
                rw.old_logp = lp[i, rw.prompt_len:len(rw.input_ids)].double().tolist()

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        r = self.cfg.run
        torch.manual_seed(r.seed + self.acc.process_index)
        np.random.seed(r.seed + self.acc.process_index)
        if self.resuming:
            self._resume()
        elif self.acc.is_main_process:
            rundir.clear(self.out)  # run.overwrite: the previous run's files go before anything is written
        self.acc.wait_for_everyone()
        if r.report_to:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v)   # what trackers take
                       for k, v in rundir.flat(self.cfg.to_dict()).items()}
            self.acc.init_trackers("ptlab", config=hparams)
        logger = Logger(self.out, self.acc.is_main_process, r.tensorboard, self.step, self.acc if r.report_to else None)
        if self.acc.is_main_process:
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        bar = progress(r.max_steps, self.step, self.acc.is_main_process and r.progress)
        last, t0, first = {}, time.perf_counter(), self.step
        self.heldout.trim(self.step)  # a resumed run drops the records past its checkpoint
        if self.step == 0 and self.heldout.due(0, r.max_steps):  # the initial model
            logger.log({"step": 0, **self.evaluate(0)})
        with StopSignals() as signals:
            while self.step < r.max_steps:
                last = self.train_step(self.step)                                      # rows -> update
                self.step += 1
                if self.heldout.due(self.step, r.max_steps):                           # evaluate
                    last.update(self.evaluate(self.step))
                if self.step % r.log_every == 0 or self.step == r.max_steps or any(k.startswith("eval/") for k in last):
                    logger.log(last)                                                   # log
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "reward", "grad_norm") if k in last})
                self.stopped_by = signals.received(self.acc)
                stop = self.stopped_by or (r.stop_after and self.step >= r.stop_after)
                if (r.save_every and self.step % r.save_every == 0) or self.step == r.max_steps or stop:
                    self.save_checkpoint()                                             # checkpoint
                if stop and self.step < r.max_steps:
                    break
        if bar is not None:
            bar.close()
        logger.close()
        if r.report_to:
            self.acc.end_training()
        if self.step == r.max_steps and r.save_model:
            self.save_model(self.out / "final")
        if self.acc.is_main_process:
            print(summary(last, self.step, self.step - first, time.perf_counter() - t0, self.out, r.max_steps,
                          self.stopped_by), flush=True)
        return last

    def evaluate(self, step: int) -> dict:
        """The eval: section's metrics at the current parameters; per-prompt records appended to
        eval_records.jsonl."""
        metrics, records = self.heldout.run(step, self.cfg.run.max_steps)
        self.heldout.write_records(records)
        return metrics

    def save_checkpoint(self, _fail: bool = False):
        extra = {"schedule": self.schedule}
        state = {"step": self.step, "config": self.cfg.to_dict()}   # the config: resuming checks it (rundir)
        ckpt.save(self.acc, self.out, self.step, state, extra, _fail_after_state=_fail)

    def _resume(self):
        path = ckpt.latest(self.out)
        if path is None:
            raise ValueError(f"run.resume: no checkpoint under {self.out / 'checkpoints'}")
        state, extra = ckpt.load(self.acc, path)
        self.step = int(state["step"])
        if extra.get("schedule") is not None:
            self.schedule = extra["schedule"]

    def save_model(self, path: Path):
        """The final model as a Hugging Face folder (an adapter under LoRA), written then renamed."""
        ckpt.save_final(self.acc, self.policy, self._model(), self.tok, path)


def _is_main() -> bool:
    """Rank 0 of a launch (or a single process), before accelerate is set up."""
    import os

    return os.environ.get("RANK", "0") == "0"


def check_engine(acc, cfg) -> None:
    """The engine accelerate built is the one asked for, and supports what the config uses (ValueError naming
    the key), before the model loads. accelerate falls back to DDP without a word when its FSDP / DeepSpeed
    config meets CPU processes, and a launch whose processes found no common backend trains each rank alone."""
    import os

    kind = acc.distributed_type.name
    for var, want in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DEEPSPEED")):
        if os.environ.get(var, "false").lower() == "true" and kind != want:
            raise ValueError(f"run.cpu: the accelerate config asks for {want} but accelerate built {kind}, as it does "
                             "for CPU processes (run.cpu=true); FSDP and DeepSpeed need GPUs (README, multi-GPU)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and acc.num_processes != world:
        raise ValueError(f"run.cpu: {world} processes were launched but accelerate sees {acc.num_processes}: on a "
                         "machine without GPUs use run.cpu=true (gloo), or launch on GPUs")
    if kind == "DEEPSPEED" and cfg.run.skip_grad_norm > 0:
        raise ValueError("run.skip_grad_norm: not available under DeepSpeed, whose optimizer step runs inside its "
                         "backward; use run.max_grad_norm (clipping) or another engine")
    if cfg.datareg.update_rule != "full" and kind not in DATAREG_ENGINES:
        raise ValueError(f"datareg.update_rule: supported under DDP or one process, not {kind}")


DATAREG_ENGINES = ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU")


def _fused_adamw(acc, params) -> bool | None:
    """AdamW's one-kernel update (what transformers' Trainer uses by default) for plain floating parameters
    on one process or DDP; the default per-tensor loop elsewhere (FSDP / DeepSpeed shard or replace it)."""
    from accelerate.utils import DistributedType

    plain = acc.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return True if plain and ok and params else None


def _lr_schedule(opt, r, total):
    from transformers import get_scheduler

    warm = int(round(r.warmup_ratio * total))
    name = {"constant": "constant_with_warmup"}.get(r.lr_scheduler, r.lr_scheduler)
    return get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=max(total, 1))


TRACKERS = ("aim", "clearml", "comet_ml", "dvclive", "mlflow", "swanlab", "tensorboard", "trackio", "wandb")


def check_trackers(names: list[str]) -> list[str]:
    """The `run.report_to` trackers: each one of accelerate's and installed (ValueError naming the key)."""
    import accelerate.utils as au

    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"run.report_to: unknown tracker {name!r}; accelerate's trackers: {list(TRACKERS)}")
        if not getattr(au, f"is_{name}_available")():
            raise ValueError(f"run.report_to: {name!r} is not installed (pip install {name.replace('_', '-')})")
    return list(names)


class StopSignals:
    """SIGTERM (pre-emption, `kill`, torchrun passing one on) and SIGINT (Ctrl-C) ask the run to stop at the
    next step boundary, after a checkpoint; a second SIGINT aborts at once. Every process stops at the same
    step: the request is summed over processes at each step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __enter__(self):
        self.got, self.old = 0, {}
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.got == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.got = signum
        print(f"ptlab train: {signal.Signals(signum).name} received; stopping after this step with a checkpoint"
              + (" (Ctrl-C again aborts)" if signum == signal.SIGINT else ""), file=sys.stderr, flush=True)

    def received(self, acc) -> int:
        """The signal number when any process received one, else 0."""
        if acc.num_processes == 1:
            return self.got
        flag = torch.tensor([float(self.got > 0)], dtype=torch.float64, device=acc.device)
        anyone = acc.reduce(flag, "sum").item() > 0
        return (self.got or int(signal.SIGTERM)) if anyone else 0

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
        return False


def summary(last: dict, step: int, steps: int, seconds: float, out: Path, max_steps: int, stopped_by: int) -> str:
    """The end-of-run line: how far it got, the last step's main metrics, and where the outputs are."""
    how = f"stopped by {signal.Signals(stopped_by).name} at step" if stopped_by else "step"
    keys = [k for k in ("loss", "reward", "sft_loss", "dpo_loss") if k in last]
    keys += sorted(k for k in last if k.startswith("eval/") and k.count("/") == 2)[:4]
    shown = ", ".join(f"{k}={last[k]:.4g}" for k in keys)
    return (f"ptlab train: {how} {step}/{max_steps} ({steps} steps in {seconds:.0f} s)"
            f"{'; ' + shown if shown else ''}; outputs in {out}")


def main(config_path: str, overrides: list[str]) -> dict:
    """One run, or the stages of a pipeline file (scale/stages.py) one after the other."""
    from scale import stages

    pipeline = stages.is_pipeline(config_path)
    runs = stages.load_pipeline(config_path, overrides) if pipeline else [("", load_config(config_path, overrides))]
    last: dict = {}
    try:
        for _, cfg in runs:
            trainer = Trainer(cfg)
            last = trainer.train()
            if pipeline and trainer.acc.is_main_process:
                stages.merge_metrics(Path(cfg.run.output_dir).parent, runs)
            if trainer.stopped_by:   # the shell's convention for a process ended by a signal: not finished
                sys.exit(128 + trainer.stopped_by)
            if trainer.step < cfg.run.max_steps:   # stopped early (run.stop_after): the next stage has no model
                break
    finally:
        _end_distributed()
    return last


def _end_distributed() -> None:
    """Tear the process group down before exit: gloo's threads otherwise abort the interpreter
    ("terminate called without an active exception") on some exits."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
