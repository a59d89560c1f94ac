"""`ptlab train CONFIG.yaml [key=value ...]`: one trainer for every method, on `accelerate`.

One optimizer step (RL family: one generation batch, possibly several updates):

1. `build_rows(step)`: this process's share of the global batch as `methods.Row`s. SFT / DPO rows come
   from the data; RL rows from `model.generate` (n per prompt) graded by the reward function, with
   advantages from the estimator over the gathered rewards; HPT gates each prompt on its rollout accuracy
   (`theory.schedules.HptGate`) and keeps its rollouts (RL) or its demonstration (SFT); LUFFY / SRFT put the
   demonstration in the group (`is_demo`); the joint SFT+DPO schedules pick the objectives' weights
   (`theory.schedules`).
2. `update(rows)`: global counts are summed over processes; the rows are split into `grad_accum`
   micro-batches; each micro-batch's loss is its share of the global loss (`methods.micro_loss`), scaled by
   grad_accum x processes; clip, step, log.

Run on one CPU/GPU with `ptlab train cfg.yaml`, on several with `accelerate launch --config_file
scale/accelerate_configs/ddp.yaml -m experiments.cli train cfg.yaml`, or on CPU processes with
`torchrun --nproc_per_node 2 -m experiments.cli train cfg.yaml run.cpu=true`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from scale import checkpoint as ckpt
from scale.config import Config, load_config
from scale.logprobs import Policy
from scale.methods import Row, Terms, collate, local_counts, micro_loss, rl_estimator, sft_estimator

STAT_KEYS = ("rl_loss", "sft_loss", "dpo_loss", "clip_sum", "ratio_sum", "kl_sum", "sft_nll_sum", "dpo_loss_sum",
             "dpo_acc_sum", "dpo_margin_sum", "entropy_sum")
RL_FAMILY = ("rl", "hpt", "luffy", "srft")


# ---------------------------------------------------------------------------------------------- set-up
def check_model_path(path: str, key: str = "model.path") -> None:
    """A local-looking path must exist and its files be readable (`check_model_files`); a hub name must
    resolve (offline: be in the cache)."""
    p = Path(path).expanduser()
    if p.exists():
        if p.is_dir() and not (p / "config.json").is_file():
            raise ValueError(f"{key}: {path!r} is a folder without config.json (not a Hugging Face model)")
        if p.is_dir():
            check_model_files(p, key)
        return
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") != 1
    if looks_local:
        raise ValueError(f"{key}: {path!r} does not exist")
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"{key}: {path!r} is not a local folder and could not be loaded from the hub "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def check_model_files(folder: Path, key: str) -> None:
    """The files of a local model folder, before anything loads: the JSON ones parse (a corrupt
    tokenizer.json otherwise fails with a bare JSON error), each safetensors file is as long as its header
    says (a truncated one otherwise fails after the model is built, naming no file), shards are present."""
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "model.safetensors.index.json"):
        f = folder / name
        if f.is_file():
            try:
                json.loads(f.read_bytes())
            except ValueError as e:  # JSONDecodeError (names line and column) or UnicodeDecodeError
                raise ValueError(f"{key}: {f} is corrupt: not valid JSON ({e})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text()).get("weight_map", {}).values())):
            if not (folder / shard).is_file():
                raise ValueError(f"{key}: {folder / shard} is missing (listed in {index.name})")
    for f in sorted(folder.glob("*.safetensors")):
        _check_safetensors(f, key)


def _check_safetensors(f: Path, key: str) -> None:
    """The layout: 8 bytes of header length n (at most 100 MB, safetensors' own limit), n bytes of JSON
    header, then the tensors, whose largest end offset is the data size; the file must be exactly that long."""
    size = f.stat().st_size
    try:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n)) if 8 + n <= size and n <= 100_000_000 else None
        ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"] if header else []
        complete = header is not None and 8 + n + max(ends, default=0) == size
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        complete = False
    if not complete:
        raise ValueError(f"{key}: {f} is truncated or corrupt (its header does not describe its {size} bytes); "
                         "copy or download it again")


def check_output_dir(path: str) -> None:
    """The run can create and write its folder. Checked before the model loads by creating (and at once
    removing) an anonymous file in the nearest existing folder: os.access says yes to root, or on a
    read-only mount. Nothing that exists is touched."""
    p = Path(path).expanduser()
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        where = "is a file" if probe == p else f"lies under {str(probe)!r}, which is a file"
        raise ValueError(f"run.output_dir: {path!r} {where}, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise ValueError(f"run.output_dir: cannot write into {str(probe)!r} ({e.strerror or e})") from None


def _dotted(ex: dict, key: str):
    v = ex
    for part in key.split("."):
        if not isinstance(v, dict) or part not in v:
            raise ValueError(f"data.columns: source column {key!r} not found in the data")
        v = v[part]
    return v


def prepare_data(path: str, cfg: Config, tokenizer, need: str, context: int, limit: int | None = None,
                 columns: dict | None = None, keep: tuple[str, ...] = (), max_new_tokens: int | None = None
                 ) -> list[dict]:
    """Load, map columns, check columns / emptiness / lengths, tokenise. Returns one dict per example
    (with the columns named in `keep` copied where present, e.g. an evaluation set's id and level)."""
    from scale.data import check_text_columns, load_data, require_columns, to_prompt_completion, tokenize_pairs

    d = cfg.data
    ds = load_data(path, d.split if d.split else None)
    columns = d.columns if columns is None else columns
    if columns:
        first = ds[0]
        for src in columns.values():
            _dotted(first, src)
        ds = ds.map(lambda ex: {dst: _dotted(ex, src) for dst, src in columns.items()})
    limit = d.limit if limit is None else limit
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    require_columns(ds, need, source=str(path))
    check_text_columns(ds, str(path))
    ds = to_prompt_completion(ds, tokenizer)
    rows = ds.to_list()

    def fmt(p):
        if d.chat_template:
            return tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True)
        return d.prompt_template.format(prompt=p)

    prompts = [fmt(r["prompt"]) for r in rows]
    max_len = min(d.max_length, context)
    out = [{"prompt": p, "answer": str(r.get("answer", "")), **{k: r[k] for k in keep if r.get(k) is not None}}
           for p, r in zip(prompts, rows)]
    cols = {"sft": ["completion"], "dpo": ["chosen", "rejected"], "rl": [],
            "demo": ["completion"]}[{"hpt": "demo", "luffy": "demo", "srft": "demo"}.get(need, need)]
    if need in ("sequential", "mix", "alright", "maxright"):
        cols = ["completion", "chosen", "rejected"]
    try:
        if not cols:
            p_ids = tokenize_pairs(prompts, [""] * len(prompts), tokenizer, max_len, d.max_prompt_length, add_eos=False)
        for c in cols:
            toks = tokenize_pairs(prompts, [str(r[c]) for r in rows], tokenizer, max_len, d.max_prompt_length)
            for o, t in zip(out, toks):
                o[c] = t
            p_ids = toks
    except ValueError as e:
        raise ValueError(f"data: {path}: {e}") from None
    max_new = max_new_tokens or cfg.generation.max_new_tokens
    for i, (o, t) in enumerate(zip(out, p_ids)):
        o["prompt_ids"] = t["input_ids"][: t["prompt_len"]]
        if need in RL_FAMILY and len(o["prompt_ids"]) + max_new > context:
            raise ValueError(f"data: {path}: example {i}: prompt has {len(o['prompt_ids'])} tokens; with "
                             f"max_new_tokens={max_new} it exceeds the context of {context} tokens")
        for k in ("ref_chosen_logp", "ref_rejected_logp"):
            if k in rows[i]:
                o[k] = float(rows[i][k])
    return out


def _data_need(cfg: Config) -> str:
    return cfg.method.joint.schedule if cfg.method.name == "sft_dpo" else cfg.method.name


# ---------------------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: Config, accelerator=None):
        from accelerate import Accelerator
        from transformers import AutoConfig, AutoTokenizer

        self.cfg = cfg.validate()
        m, r = cfg.method, cfg.run
        # 1. everything that can fail on bad input, before any model weights load
        check_model_path(cfg.model.path)
        if cfg.model.ref_path:
            check_model_path(cfg.model.ref_path, "model.ref_path")
        check_output_dir(r.output_dir)
        if r.resume and ckpt.latest(r.output_dir) is None:  # also raises for a pointer to a broken checkpoint
            raise ValueError(f"run.resume: no checkpoint under {Path(r.output_dir) / 'checkpoints'}")
        if m.name in RL_FAMILY:
            from scale.rewards import load_reward

            self.reward_fn = load_reward(m.rl.reward)
        self.tok = _loaded("the tokenizer", cfg.model.path, AutoTokenizer.from_pretrained)
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        mcfg = _loaded("the model config", cfg.model.path, AutoConfig.from_pretrained)
        context = getattr(mcfg, "max_position_embeddings", None) or cfg.data.max_length
        need = _data_need(cfg)
        if m.name == "sft_dpo":
            self.data = prepare_data(cfg.data.path, cfg, self.tok, "sft", context)
            self.pref = prepare_data(cfg.data.pref_path or cfg.data.path, cfg, self.tok, "dpo", context,
                                     limit=cfg.data.pref_limit or cfg.data.limit,
                                     columns=cfg.data.pref_columns if cfg.data.pref_path else None)
        else:
            self.data = prepare_data(cfg.data.path, cfg, self.tok, need, context)
            self.pref = self.data
        if m.name in RL_FAMILY:
            self._trial_reward()
        self.estimators()
        self.schedule = self._make_schedule()
        self.datareg = None  # Dr. Post-Training update rules (scale/datareg.py); target data checked here
        if cfg.datareg.update_rule != "full":
            from scale.datareg import TrainerHook

            self.datareg = TrainerHook(self, context)
        from scale.heldout import HeldOut

        self.heldout = HeldOut(self, context)  # the eval: section's sets, loaded and checked before the model

        # 2. accelerate and the model
        self.acc = accelerator or Accelerator(cpu=r.cpu, mixed_precision=r.mixed_precision,
                                              gradient_accumulation_steps=r.grad_accum)
        self.P = self.acc.num_processes
        if r.batch_size % self.P:
            raise ValueError(f"run.batch_size: {r.batch_size} is not divisible by the {self.P} processes")
        if (r.batch_size // self.P) % m.rl.mini_batches:
            raise ValueError(f"method.rl.mini_batches: must divide the per-process batch {r.batch_size // self.P}")
        self._deepspeed_fixups()
        model = self._load_model(cfg.model.path)
        self.ref = None
        needs_ref = m.name in ("dpo", "sft_dpo") or (m.name in RL_FAMILY and m.rl.kl_coef > 0) or \
            any(s.kind == "dpo" for s in cfg.eval.sets)
        if needs_ref and (cfg.model.ref_path or not cfg.model.lora.enabled):  # LoRA: the adapter-free base
            self.ref = self._make_reference(model)
        if cfg.model.lora.enabled:
            from peft import LoraConfig, get_peft_model

            lc = cfg.model.lora
            model = get_peft_model(model, LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                                                     target_modules=lc.target_modules, task_type="CAUSAL_LM"))
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        policy = Policy(model, chunk=r.logprob_chunk)
        params = [p for p in policy.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=r.lr, betas=tuple(r.betas), weight_decay=r.weight_decay,
                                     fused=_fused_adamw(self.acc, params))
        self.updates_per_step = m.rl.mini_batches * m.rl.epochs if m.name in RL_FAMILY else 1
        self.sched = _lr_schedule(self.opt, r, r.max_steps * self.updates_per_step)
        self.policy, self.opt = self.acc.prepare(policy, self.opt)
        self.acc.register_for_checkpointing(self.sched)  # stepped by us: once per update, any process count
        if self.ref is not None:
            self.ref = self.ref.to(self.acc.device)
        if m.name in ("dpo", "sft_dpo") and m.dpo.precompute_ref:
            self._precompute_reference()
        self.generator = None
        if m.name in RL_FAMILY:
            self.generator = _VllmGenerator(cfg) if cfg.generation.backend == "vllm" else None
        self.step = 0
        self.out = Path(r.output_dir)
        self._perms: dict = {}

    # ------------------------------------------------------------------ pieces
    def estimators(self):
        m = self.cfg.method
        self.terms = Terms()
        if m.name == "sft":
            self.terms.sft = sft_estimator(m.sft.aggregation)
        elif m.name == "dpo":
            self.terms.dpo_beta = m.dpo.beta
        elif m.name == "sft_dpo":
            self.terms.sft, self.terms.dpo_beta = sft_estimator(m.sft.aggregation), m.dpo.beta
        elif m.name == "hpt":
            self.terms.rl = self._rl_preset("hpt_paper" if m.hpt.variant == "paper" else "hpt_code")
            self.terms.sft = sft_estimator("seq_mean_token_mean" if m.hpt.variant == "paper" else "global_token_mean")
        elif m.name in ("luffy", "srft"):
            self.terms.rl = self._rl_preset(m.name)
        else:
            self.terms.rl = self._rl_preset(m.rl.estimator)
        self.terms.entropy_coef = m.rl.entropy_coef if m.name in RL_FAMILY else 0.0
        self.terms.kl_coef = m.rl.kl_coef if m.name in RL_FAMILY else 0.0

    def _rl_preset(self, name: str):
        """The method's estimator preset with method.rl.estimator_options; errors name the key."""
        from theory.estimator import PRESETS

        if name not in PRESETS:
            raise ValueError(f"method.rl.estimator: unknown preset {name!r}; valid: {sorted(PRESETS)}")
        try:
            return rl_estimator(name, self.cfg.method.rl.estimator_options, self.cfg.generation.max_new_tokens)
        except (ValueError, TypeError) as e:
            raise ValueError(f"method.rl.estimator_options (preset {name!r}): {e}") from None

    def _make_schedule(self):
        try:
            return self._schedule()
        except ValueError as e:  # theory.schedules names its argument, not the config key
            raise ValueError(f"method.{'hpt' if self.cfg.method.name == 'hpt' else 'joint'}: {e}") from None

    def _schedule(self):
        from theory import schedules

        m = self.cfg.method
        if m.name == "hpt":
            h, n = m.hpt, self.cfg.generation.n
            if h.variant == "code":
                gate = h.switch_gate if h.switch_gate >= 0 else int(round(h.gamma * n))
                return schedules.HptGate.from_code(gate, n)
            return schedules.HptGate(h.gamma, mode=h.gate_mode, temperature=h.gate_temperature)
        if m.name != "sft_dpo":
            return None
        j = m.joint
        if j.schedule == "sequential":
            return schedules.Sequential(order=tuple(j.order), split=j.split, total_steps=self.cfg.run.max_steps)
        if j.schedule == "mix":
            return schedules.Mix(j.lam)
        if j.schedule == "alright":
            return schedules.Alright(j.lam, seed=j.seed)
        return schedules.Maxright(j.lam, {"sft": j.f_star_sft, "dpo": j.f_star_dpo}, k=j.k)

    def _dtype(self):
        name = self.cfg.model.dtype
        if name == "auto":
            return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        return getattr(torch, name)

    def _load_model(self, path, key="model.path"):
        from transformers import AutoModelForCausalLM

        return _loaded("the model", path, lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=self._dtype()), key)

    def _make_reference(self, model):
        ref = self._load_model(self.cfg.model.ref_path, "model.ref_path") if self.cfg.model.ref_path else \
            copy.deepcopy(model)
        ref.requires_grad_(False)
        return Policy(ref.eval(), chunk=self.cfg.run.logprob_chunk)

    def _deepspeed_fixups(self):
        plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        # Untested here (no GPU): our micro-batches vary in size, DeepSpeed only needs a number.
        ds = plugin.deepspeed_config
        if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            ds["train_micro_batch_size_per_gpu"] = 1
        ds["gradient_accumulation_steps"] = self.cfg.run.grad_accum

    def _model(self):
        return self.acc.unwrap_model(self.policy).model

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

    # ------------------------------------------------------------------ rows
    def sft_rows(self, idx, weight=1.0):
        return [Row(list(self.data[i]["completion"]["input_ids"]), self.data[i]["completion"]["prompt_len"], "sft",
                    weight=weight) for i in idx]

    def dpo_rows(self, idx, weight=1.0, data=None):
        data = self.pref if data is None else data
        rows = []
        for i in idx:
            ex = data[i]
            for kind in ("chosen", "rejected"):
                t = ex[kind]
                rows.append(Row(list(t["input_ids"]), t["prompt_len"], kind, weight=weight,
                                ref_logp=ex.get(f"ref_{kind}_logp", 0.0), meta={"ex": i}))
        if idx and "ref_chosen_logp" not in data[idx[0]]:
            self._fill_ref_logp(rows)
        return rows

    @torch.no_grad()
    def _ref_logp(self, rows) -> list[torch.Tensor]:
        """Per-row token log-probs [T_i] under the reference (frozen copy, ref_path, or LoRA disabled)."""
        out = []
        B = max(1, self.cfg.run.batch_size // self.P // self.cfg.run.grad_accum) * 2
        temp = self.cfg.generation.temperature if self.cfg.method.name in RL_FAMILY else 1.0
        for s in range(0, len(rows), B):
            chunk = rows[s:s + B]
            mb = collate(chunk, self.tok.pad_token_id, self.acc.device)
            args = (mb["input_ids"], mb["attention_mask"], mb["score_mask"], temp, False)
            if self.ref is None:
                with self._model().disable_adapter():
                    lp, _ = self.acc.unwrap_model(self.policy)(*args)
            else:
                lp, _ = self.ref(*args)
            out += [lp[i, rw.prompt_len:len(rw.input_ids)].double().cpu() for i, rw in enumerate(chunk)]
        return out

    def _fill_ref_logp(self, rows):
        for rw, lp in zip(rows, self._ref_logp(rows)):
            rw.ref_logp = float(lp.sum())

    def _precompute_reference(self):
        for i in range(len(self.pref)):
            rows = self.dpo_rows([i])
            self.pref[i]["ref_chosen_logp"], self.pref[i]["ref_rejected_logp"] = rows[0].ref_logp, rows[1].ref_logp
        self.ref = None

    def build_rows(self, step: int) -> tuple[list[Row], dict]:
        """This process's rows for `step` and the step's data statistics (global where it matters)."""
        m, r = self.cfg.method, self.cfg.run
        info: dict = {}
        if m.name == "sft":
            return self.sft_rows(self.local_indices(step, len(self.data), r.batch_size)), info
        if m.name == "dpo":
            return self.dpo_rows(self.local_indices(step, len(self.pref), r.batch_size)), info
        if m.name == "sft_dpo":
            return self.joint_rows(step, info), info
        return self.rl_rows(step, info), info

    def joint_rows(self, step, info):
        r = self.cfg.run
        i_sft = self.local_indices(step, len(self.data), r.batch_size)
        i_dpo = self.local_indices(step, len(self.pref), self.cfg.method.joint.dpo_batch_size or r.batch_size)
        stats = None
        if getattr(self.schedule, "needs_values", None) and self.schedule.needs_values(step):
            stats = self.objective_values(i_sft, i_dpo)
        w = self.schedule.weights(step, stats)
        info.update(w_sft=w["sft"], w_dpo=w["dpo"])
        if isinstance(self.schedule, _sequential()) and self.schedule.stage_start(step) and step > 0 \
                and self.cfg.method.joint.reset_optimizer:
            self.opt.optimizer.state.clear()
        rows = []
        if w["sft"]:
            rows += self.sft_rows(i_sft, w["sft"])
        if w["dpo"]:
            rows += self.dpo_rows(i_dpo, w["dpo"])
        return rows

    @torch.no_grad()
    def objective_values(self, i_sft, i_dpo) -> dict:
        """Global f_sft and f_dpo on this step's batches at the current parameters (MAXRIGHT's refresh)."""
        vals = {}
        for key, rows, terms in (("f_sft", self.sft_rows(i_sft), Terms(sft=self.terms.sft)),
                                 ("f_dpo", self.dpo_rows(i_dpo), Terms(dpo_beta=self.terms.dpo_beta))):
            norms = self._global_counts(rows)
            total = 0.0
            for mb_rows in _split(rows, self.cfg.run.grad_accum):
                mb = collate(mb_rows, self.tok.pad_token_id, self.acc.device)
                lp, ent = self.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"], with_entropy=False)
                total += float(micro_loss(lp, ent, mb, terms, norms)[0])
            vals[key] = float(self.acc.reduce(torch.tensor(total, device=self.acc.device), "sum"))
        return vals

    def rl_rows(self, step, info):
        m, g = self.cfg.method, self.cfg.generation
        idx = self.local_indices(step, len(self.data), self.cfg.run.batch_size)
        exs = [self.data[i] for i in idx]
        with_demo = m.name in ("luffy", "srft")
        n_gen = g.n - 1 if with_demo else g.n
        comps = self.generate([e["prompt_ids"] for e in exs], n_gen)
        texts = self.tok.batch_decode(comps, skip_special_tokens=True)
        answers = [e["answer"] for e in exs for _ in range(n_gen)]
        rewards = self._rewards(texts, answers, [i for i in idx for _ in range(n_gen)], f"step {step + 1}")
        rows: list[Row] = []
        for q, e in enumerate(exs):
            for k in range(n_gen):
                c = comps[q * n_gen + k]
                rows.append(Row(e["prompt_ids"] + c, len(e["prompt_ids"]), "rl", meta={"group": q, "reward":
                                                                                        rewards[q * n_gen + k]}))
            if with_demo:
                t = e["completion"]
                demo_text = self.tok.decode(t["input_ids"][t["prompt_len"]:], skip_special_tokens=True)
                rd = self._rewards([demo_text], [e["answer"]], [idx[q]], f"step {step + 1}")[0]
                rows.append(Row(list(t["input_ids"]), t["prompt_len"], "demo", meta={"group": q, "reward": rd}))
        R = torch.tensor([rw.meta["reward"] for rw in rows], dtype=torch.float64, device=self.acc.device)
        R_all = self.acc.gather(R)
        A_all = self.terms.rl.advantages(R_all.cpu(), group_size=g.n)
        lo = self.acc.process_index * len(rows)
        for rw, a in zip(rows, A_all[lo:lo + len(rows)].tolist()):
            rw.advantage = a
        on = torch.tensor([rw.meta["reward"] for rw in rows if rw.kind == "rl"], dtype=torch.float64)
        lens = torch.tensor([float(rw.n_scored) for rw in rows if rw.kind == "rl"], dtype=torch.float64)
        s = self.acc.reduce(torch.stack([on.sum(), (on > 0.5).double().sum(), lens.sum(),
                                         torch.tensor(float(len(on)), dtype=torch.float64)]).to(self.acc.device), "sum")
        info.update(reward=float(s[0] / s[3]), accuracy=float(s[1] / s[3]), response_length=float(s[2] / s[3]))
        if m.name == "hpt":
            rows = self.hpt_gate(rows, exs, info)
        if self.terms.kl_coef:
            for rw, lp in zip(rows, self._ref_logp(rows)):
                rw.ref_token_logp = lp.tolist()
        return rows

    def _rewards(self, texts, answers, examples, when: str) -> list[float]:
        """The reward function on a batch; a failure also names the data example (its index in data.path)
        of the completion to blame, and when."""
        from scale.rewards import RewardError

        try:
            return [float(x) for x in self.reward_fn(texts, answers)]
        except RewardError as e:
            where = f"example {examples[e.index]} of {self.cfg.data.path}, " if e.index is not None else ""
            raise ValueError(f"{e} [{where}{when}]") from e

    def _trial_reward(self) -> None:
        """One call of the reward on the first example's answer, boxed, before the model loads: a function
        that fails on any input (a wrong signature, a None or NaN return) is named now, not after the
        model has loaded and the first batch has been generated."""
        answer = self.data[0]["answer"]
        self._rewards([f"\\boxed{{{answer}}}"], [answer], [0], "a trial call before the model loads")

    def hpt_gate(self, rows, exs, info):
        """HPT: per prompt, keep its n rollouts (weight alpha) and / or its demonstration (weight beta)."""
        n, coef = self.cfg.generation.n, self.cfg.method.hpt.sft_coef
        correct = np.array([sum(rw.meta["reward"] > 0.5 for rw in rows[q * n:(q + 1) * n]) for q in range(len(exs))])
        if self.schedule.switch_gate is not None:
            alpha, beta = self.schedule.count_weights(correct)
        else:
            alpha, beta = self.schedule.prompt_weights(correct / n)
        out = []
        for q, e in enumerate(exs):
            if alpha[q] > 0:
                for rw in rows[q * n:(q + 1) * n]:
                    rw.weight = float(alpha[q])
                    out.append(rw)
            if beta[q] > 0:
                t = e["completion"]
                out.append(Row(list(t["input_ids"]), t["prompt_len"], "sft", weight=float(beta[q]) * coef,
                               meta={"group": q}))
        info["sft_prompt_fraction"] = float(self.acc.reduce(torch.tensor(float((beta > 0).sum()),
                                                                         device=self.acc.device), "sum")) / \
            self.cfg.run.batch_size
        return out

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int = 0,
                 greedy: bool = False) -> list[list[int]]:
        """n sampled completions per prompt (grouped), each cut after its first EOS (kept); the sampling
        settings of `generation:` (rollouts and in-training evaluation alike), or greedy decoding."""
        g = self.cfg.generation
        max_new = max_new_tokens or g.max_new_tokens
        if self.generator is not None and not greedy and max_new == g.max_new_tokens:
            return self.generator.generate(self._model(), prompts, n)
        model = self._model()
        was_training = model.training
        model.eval()
        from scale.data import collate as pad

        b = pad([{"input_ids": p} for p in prompts], self.tok.pad_token_id, left=True)
        if g.backend == "ptlab" and not greedy:
            from scale.sampling import generate_ids

            new = generate_ids(model, b["input_ids"].to(self.acc.device), b["attention_mask"].to(self.acc.device), n,
                               max_new, self.tok.eos_token_id, self.tok.pad_token_id,
                               temperature=g.temperature, top_p=g.top_p)
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else \
                {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}
            new = model.generate(input_ids=b["input_ids"].to(self.acc.device),
                                 attention_mask=b["attention_mask"].to(self.acc.device), max_new_tokens=max_new,
                                 num_return_sequences=n, pad_token_id=self.tok.pad_token_id,
                                 eos_token_id=self.tok.eos_token_id, **sampling)[:, b["input_ids"].shape[1]:]
        model.train(was_training)
        comps = []
        for row in new.tolist():
            if self.tok.eos_token_id in row:
                row = row[: row.index(self.tok.eos_token_id) + 1]
            else:
                while row and row[-1] == self.tok.pad_token_id:
                    row.pop()
            comps.append(row if row else [self.tok.eos_token_id])
        return comps

    # ------------------------------------------------------------------ the update
    def _global_counts(self, rows: list[Row]) -> dict[str, float]:
        c = local_counts(rows)
        keys = sorted(c)
        v = self.acc.reduce(torch.tensor([c[k] for k in keys], dtype=torch.float64, device=self.acc.device), "sum")
        return dict(zip(keys, v.tolist()))

    def update(self, rows: list[Row], extra_norms: dict | None = None) -> dict:
        """One optimizer step on this process's rows of a global batch; returns global statistics."""
        r = self.cfg.run
        norms = {**self._global_counts(rows), **(extra_norms or {})}
        stats = dict.fromkeys(STAT_KEYS, 0.0)
        total = 0.0
        tokens = 0
        scale = r.grad_accum * self.P
        for j, mb_rows in enumerate(_split(rows, r.grad_accum)):
            mb = collate(mb_rows, self.tok.pad_token_id, self.acc.device)
            tokens += int(mb["attention_mask"].sum())
            if getattr(self, "datareg", None) is not None:  # the rule's own backward (scale/datareg.py)
                loss, st = self.datareg.backward(mb_rows, norms, j, r.grad_accum)
            else:
                with self.acc.accumulate(self.policy):
                    lp, ent = self.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"],
                                          temperature=self.cfg.generation.temperature,
                                          entropy_grad=bool(self.terms.entropy_coef))
                    loss, st = micro_loss(lp, ent, mb, self.terms, norms)
                    self.acc.backward(loss * scale)
            total += float(loss.detach())
            for k, v in st.items():
                stats[k] += v
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
        vec = torch.tensor([total, tokens] + [stats[k] for k in STAT_KEYS], dtype=torch.float64, device=self.acc.device)
        vec = self.acc.reduce(vec, "sum").tolist()
        g = dict(zip(["loss", "tokens", *STAT_KEYS], vec))
        out = {"loss": g["loss"], "grad_norm": gn, "skipped": float(skipped), "lr": self.sched.get_last_lr()[0],
               "tokens": g["tokens"]}
        at = max(norms["all_tokens"], 1.0)
        out["entropy"] = g["entropy_sum"] / at
        for k in ("rl_loss", "sft_loss", "dpo_loss"):
            if self.cfg.method.name in RL_FAMILY and k == "rl_loss" or norms["sft_rows"] and k == "sft_loss" \
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
        n_demo = sum(1.0 for rw in rows if rw.kind in ("demo",) or (rw.kind == "sft" and self.cfg.method.name == "hpt"))
        n_demo = float(self.acc.reduce(torch.tensor(n_demo, device=self.acc.device), "sum"))
        out["offline_ratio"] = n_demo / max(rows_all, 1.0) if self.cfg.method.name in RL_FAMILY else 0.0
        return out

    def train_step(self, step: int) -> dict:
        m = self.cfg.method
        t0 = time.perf_counter()
        rows, info = self.build_rows(step)
        t_gen = time.perf_counter() - t0
        if m.name not in RL_FAMILY or self.updates_per_step == 1:
            metrics = self.update(rows, self._extra_norms(rows))
        else:
            metrics = self._ppo_updates(rows)
        if isinstance(self.schedule, _maxright()):
            chosen = "sft" if info.get("w_sft") else "dpo"
            self.schedule.observe(chosen, metrics[f"{chosen}_loss"])
        dt = time.perf_counter() - t0
        metrics.update(info, step=step + 1, step_time=dt, generation_time=t_gen, tokens_per_s=metrics["tokens"] / dt)
        return metrics

    def _extra_norms(self, rows):
        """HPT paper: the RL term averages over Q prompts x n rollouts, the SFT term over Q demos, where Q
        counts every prompt of the (mini-)batch, whichever branch the gate sent it to."""
        if self.cfg.method.name != "hpt" or self.cfg.method.hpt.variant != "paper":
            return None
        Q = float(getattr(self, "_mb_prompts", self.cfg.run.batch_size // self.P) * self.P)
        return {"rl_seqs": Q * self.cfg.generation.n, "sft_seqs": Q}

    def _ppo_updates(self, rows):
        """Several optimizer updates on one generation batch: old log-probs first, then mini-batches."""
        self._fill_old_logp(rows)
        k = self.cfg.method.rl.mini_batches
        per = (self.cfg.run.batch_size // self.P) // k
        metrics = {}
        for _ in range(self.cfg.method.rl.epochs):
            for j in range(k):
                sub = [rw for rw in rows if j * per <= rw.meta["group"] < (j + 1) * per]
                self._mb_prompts = per
                metrics = self.update(sub, self._extra_norms(sub))
        del self._mb_prompts
        return metrics

    @torch.no_grad()
    def _fill_old_logp(self, rows):
        for mb_rows in _split(rows, max(1, len(rows) // 8)):
            mb = collate(mb_rows, self.tok.pad_token_id, self.acc.device)
            lp, _ = self.policy(mb["input_ids"], mb["attention_mask"], mb["score_mask"],
                                temperature=self.cfg.generation.temperature, with_entropy=False)
            for i, rw in enumerate(mb_rows):
                rw.old_logp = lp[i, rw.prompt_len:len(rw.input_ids)].double().tolist()

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        r = self.cfg.run
        torch.manual_seed(r.seed + self.acc.process_index)
        np.random.seed(r.seed + self.acc.process_index)
        if r.resume:
            self._resume()
        logger = _Logger(self.out, self.acc.is_main_process, r.tensorboard, self.step)
        if self.acc.is_main_process:
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        bar = _progress(r.max_steps, self.step, self.acc.is_main_process and r.progress)
        last = {}
        self.heldout.trim(self.step)  # a resumed run drops the records past its checkpoint
        if self.step == 0 and self.heldout.due(0, r.max_steps):  # the initial model
            logger.log({"step": 0, **self.evaluate(0)})
        while self.step < r.max_steps:
            last = self.train_step(self.step)
            self.step += 1
            if self.heldout.due(self.step, r.max_steps):
                last.update(self.evaluate(self.step))
            if self.step % r.log_every == 0 or self.step == r.max_steps or any(k.startswith("eval/") for k in last):
                logger.log(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{last[k]:.3g}" for k in ("loss", "reward", "grad_norm") if k in last})
            interrupted = r.stop_after and self.step >= r.stop_after and self.step < r.max_steps
            if (r.save_every and self.step % r.save_every == 0) or self.step == r.max_steps or interrupted:
                self.save_checkpoint()
            if interrupted:
                break
        if bar is not None:
            bar.close()
        logger.close()
        if self.step == r.max_steps and r.save_model:
            self.save_model(self.out / "final")
        return last

    def evaluate(self, step: int) -> dict:
        """The eval: section's metrics at the current parameters; per-prompt records appended to
        eval_records.jsonl."""
        metrics, records = self.heldout.run(step)
        self.heldout.write_records(records)
        return metrics

    def save_checkpoint(self, _fail: bool = False):
        extra = {"schedule": self.schedule}
        ckpt.save(self.acc, self.out, self.step, {"step": self.step}, extra, _fail_after_state=_fail)

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
        self.acc.wait_for_everyone()
        state = self.acc.get_state_dict(self.policy)
        if self.acc.is_main_process:
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            sd = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
            with ckpt.cleaned_on_failure(tmp, "final model"):  # a full disk: no final.tmp left behind
                self._model().save_pretrained(tmp, state_dict=sd)
                self.tok.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        self.acc.wait_for_everyone()


def _loaded(what: str, path: str, load, key: str = "model.path"):
    """`load(path)`, with a failure named in one line: the key, what, where, and the loader's first line."""
    try:
        return load(path)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"{key}: cannot load {what} from {path!r} ({type(e).__name__}: {first})") from e


def _sequential():
    from theory.schedules import Sequential

    return Sequential


def _maxright():
    from theory.schedules import Maxright

    return Maxright


def _split(rows: list[Row], k: int) -> list[list[Row]]:
    """k contiguous micro-batches of near-equal size; DPO pairs stay together; an empty one gets a dummy
    row with nothing scored (so every process runs the same number of backward passes)."""
    units, i = [], 0
    while i < len(rows):
        step = 2 if rows[i].kind == "chosen" else 1
        units.append(rows[i:i + step])
        i += step
    out = []
    for j in range(k):
        part = [rw for u in units[j * len(units) // k:(j + 1) * len(units) // k] for rw in u]
        if not part:
            ids = rows[0].input_ids[:2] if rows else [0, 0]
            part = [Row(list(ids), len(ids), "sft", weight=0.0)]
        out.append(part)
    return out


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


class _Logger:
    """metrics.jsonl (one line per logged step), and TensorBoard when it is installed."""

    def __init__(self, out: Path, main: bool, tensorboard: bool, start_step: int):
        self.main, self.tb = main, None
        self.path = out / "metrics.jsonl"
        if not main:
            return
        out.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # a resumed run drops the lines past its checkpoint
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out / "tb"))
            except Exception:  # tensorboard not installed
                self.tb = None

    def log(self, metrics: dict):
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, metrics["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def _progress(total, start, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="ptlab train", dynamic_ncols=True)


class _VllmGenerator:
    """Generation with vLLM where it is installed (weights pushed from the trainer before each batch).

    Not testable on this CPU-only machine; the import is guarded and the weight push uses vLLM's
    `load_weights` on the driver worker's model, which moves between vLLM versions.
    """

    def __init__(self, cfg: Config):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ValueError("generation.backend: 'vllm' is not installed (pip install vllm), use 'hf'") from None
        self.cfg, self.SamplingParams = cfg, SamplingParams
        self.llm = LLM(model=cfg.model.path, gpu_memory_utilization=cfg.generation.vllm_gpu_memory_utilization,
                       enable_prefix_caching=True)

    def generate(self, model, prompts, n):
        g = self.cfg.generation
        runner = self.llm.llm_engine.model_executor.driver_worker.model_runner
        runner.model.load_weights(model.state_dict().items())
        sp = self.SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or -1,
                                 max_tokens=g.max_new_tokens)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [list(o.token_ids) for out in outs for o in out.outputs]


def main(config_path: str, overrides: list[str]) -> dict:
    cfg = load_config(config_path, overrides)
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        _end_distributed()


def _end_distributed() -> None:
    """Tear the process group down before exit: gloo's threads otherwise abort the interpreter
    ("terminate called without an active exception") on some exits."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
