"""The training config: a typed, nested dataclass schema, loaded from YAML plus `key=value` overrides.

    cfg = load_config("experiments/configs/tiny_hpt.yaml", ["run.max_steps=4", "method.hpt.gamma=0.25"])

Sections: `model`, `data`, `method` (its `name` and one option block per method family), `generation`
and `run`. Every key is checked against the schema and every value against its type before anything
heavy happens, so a typo (`run.max_step`) or a wrong type (`run.lr=fast`) fails at once with the key
named. Semantic checks across keys (e.g. batch divisibility) are in `Config.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METHODS = ("sft", "dpo", "rl", "hpt", "luffy", "srft", "sft_dpo")
SCHEDULES = ("sequential", "mix", "alright", "maxright")


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ModelConfig:
    path: str = ""                    # local Hugging Face folder or hub name
    dtype: str = "auto"               # auto (bf16 where supported, else fp32) | float32 | bfloat16 | float16 | float64
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)
    ref_path: str = ""                # reference model for DPO / KL; "" = a frozen copy of the initial model


@dataclass
class DataConfig:
    path: str = ""                    # JSONL / JSON / parquet file, or a local dataset folder
    pref_path: str = ""               # sft_dpo only: preference data when it is a separate set ("" = `path`)
    split: str = "train"
    columns: dict[str, str] = field(default_factory=dict)   # ptlab name -> source column (dotted for nested)
    prompt_template: str = "{prompt}"  # applied to string prompts, e.g. "User: {prompt}\nAssistant: "
    chat_template: bool = False       # wrap string prompts as one user message and apply the tokenizer's template
    max_prompt_length: int = 512      # a longer prompt is an error (named), not silently truncated
    max_length: int = 1024            # prompt + completion; completions are truncated to fit
    limit: int = 0                    # use the first `limit` rows (0: all)
    pref_limit: int = 0               # the same for pref_path
    pref_columns: dict[str, str] = field(default_factory=dict)   # the same for pref_path
    shuffle: bool = True


@dataclass
class GenerationConfig:
    backend: str = "hf"               # hf (model.generate) | ptlab (scale/sampling.py, same sampling) | vllm
    n: int = 8                        # samples per prompt (the group size)
    temperature: float = 1.0          # also divides the logits of the training log-probs
    top_p: float = 1.0
    top_k: int = 0                    # 0: no top-k cut (transformers' generate would default to 50)
    max_new_tokens: int = 256
    vllm_gpu_memory_utilization: float = 0.3


@dataclass
class SftOptions:
    aggregation: str = "global_token_mean"   # global_token_mean (TRL) | seq_mean_token_mean (per-demo mean)


@dataclass
class DpoOptions:
    beta: float = 0.1
    precompute_ref: bool = False      # compute the reference log-probs once, then free the reference model


@dataclass
class RlOptions:
    estimator: str = "grpo"           # any theory.estimator preset
    estimator_options: dict[str, Any] = field(default_factory=dict)
    reward: str = "math"              # math | exact | module:function
    entropy_coef: float = 0.0         # loss -= entropy_coef * (global token-mean entropy)
    kl_coef: float = 0.0              # k3 KL to the reference model, global token mean
    mini_batches: int = 1             # optimizer steps per generation batch (PPO mini-batches)
    epochs: int = 1                   # passes over each generation batch (PPO epochs)


@dataclass
class HptOptions:
    variant: str = "paper"            # paper (Eq. 9-13, preset hpt_paper) | code (released code, preset hpt_code)
    gamma: float = 0.0                # gate threshold on the rollout accuracy P: SFT iff P <= gamma
    switch_gate: int = -1             # code variant: SFT iff (number correct) <= switch_gate; -1: round(gamma * n)
    gate_mode: str = "switch"         # switch | smooth [ours]
    gate_temperature: float = 0.05
    sft_coef: float = 1.0             # the code's sft_loss_coef (0.3 for Qwen2.5-Math-1.5B)


@dataclass
class JointOptions:
    schedule: str = "mix"             # sequential | mix | alright | maxright
    lam: float = 0.5                  # DPO weight (XRIGHT's lambda)
    order: list[str] = field(default_factory=lambda: ["sft", "dpo"])   # sequential
    split: float = 0.5                # sequential: fraction of max_steps for the first stage
    reset_optimizer: bool = True      # sequential: fresh optimizer state at each stage (the code's separate runs)
    f_star_sft: float = 0.0           # maxright: optimum values (0 if unknown, as the XRIGHT README says)
    f_star_dpo: float = 0.0
    k: int = 1                        # maxright: refresh both values every k steps (the code: 10)
    seed: int = 0                     # alright
    dpo_batch_size: int = 0           # pairs per step when it differs from run.batch_size (0: the same)


@dataclass
class MethodConfig:
    name: str = "sft"                 # sft | dpo | rl | hpt | luffy | srft | sft_dpo
    sft: SftOptions = field(default_factory=SftOptions)
    dpo: DpoOptions = field(default_factory=DpoOptions)
    rl: RlOptions = field(default_factory=RlOptions)
    hpt: HptOptions = field(default_factory=HptOptions)
    joint: JointOptions = field(default_factory=JointOptions)


@dataclass
class RunConfig:
    output_dir: str = "runs/ptlab"
    seed: int = 0
    max_steps: int = 10               # optimizer steps (RL: generation batches)
    batch_size: int = 8               # GLOBAL per step: prompts (RL family), examples (sft), pairs (dpo)
    grad_accum: int = 1               # micro-batches per process per optimizer step
    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    lr_scheduler: str = "constant"    # constant | linear | cosine
    warmup_ratio: float = 0.0
    max_grad_norm: float = 1.0        # clip; 0 disables
    skip_grad_norm: float = 0.0       # skip the update when the norm exceeds this (HPT code: 80); 0 disables
    mixed_precision: str = "no"       # no | bf16 | fp16 (accelerate autocast)
    cpu: bool = False
    logprob_chunk: int = 1024         # completion tokens per lm_head chunk (no [B, T, V] float32 copy)
    save_every: int = 0               # checkpoint every k steps (0: only at the end)
    resume: bool = False
    stop_after: int = 0               # stop after this many steps as if interrupted (tests); 0 disables
    log_every: int = 1
    progress: bool = True
    tensorboard: bool = True          # when tensorboard is installed
    save_model: bool = True           # save the final model (save_pretrained) into output_dir/final


RULES = ("full", "target_only", "global_subset", "blockwise_subset", "layerwise_subset", "projection")
GROUPINGS = ("layer", "sublayer", "block", "global", "custom")
SELECTIONS = ("topk", "released", "negative_filtering", "random")
SCORINGS = ("exact", "ghost", "matrix", "sketched", "auto")
SUBSET_MODES = ("one_pass", "two_pass")
PROJECTION_SETS = ("hull", "cone", "span", "gem", "agem", "subset", "point")
DEFAULT_GROUPS = {"global_subset": "global", "blockwise_subset": "block", "layerwise_subset": "layer",
                  "projection": "layer"}


@dataclass
class DataRegConfig:
    """The options of a data-regularised update (the ``datareg:`` config section mirrors these)."""

    update_rule: str = "full"        # full | target_only | {global,blockwise,layerwise}_subset | projection
    k: int = 0                       # samples kept per group; 0: floor(fraction * n)
    fraction: float = 0.5
    selection: str = "topk"          # topk (exact lmo) | released (top-k of raw scores) | negative_filtering | random
    filter_frac: float = 1.0         # negative_filtering: drop this fraction of the negative-score samples
    groups: str = ""                 # "" (from the rule) | layer | sublayer | block | global | custom
    custom_groups: list[list[str]] = field(default_factory=list)   # lists of fnmatch patterns over hooked module names
    subset_mode: str = "one_pass"    # one_pass | two_pass (GREATS: score, then a pass on the subset alone)
    scoring: str = "exact"           # exact (cheaper of ghost / matrix) | ghost | matrix | sketched | auto
    sketch_rank: int = 64
    projection_set: str = "hull"     # projection rule: hull | cone | span | gem | agem | subset | point
    seed: int = 0

    def validate(self) -> DataRegConfig:
        for key, allowed in (("update_rule", RULES), ("selection", SELECTIONS), ("scoring", SCORINGS),
                             ("subset_mode", SUBSET_MODES), ("projection_set", PROJECTION_SETS)):
            if getattr(self, key) not in allowed:
                raise ValueError(f"datareg.{key}: expected one of {allowed}, got {getattr(self, key)!r}")
        if self.groups not in ("",) + GROUPINGS:
            raise ValueError(f"datareg.groups: expected one of {GROUPINGS} (or empty), got {self.groups!r}")
        if self.groups == "custom" and not self.custom_groups:
            raise ValueError("datareg.custom_groups: groups=custom needs at least one list of module patterns")
        if not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"datareg.k: expected an integer >= 0 (0: use fraction), got {self.k!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"datareg.fraction: expected a number in (0, 1], got {self.fraction!r}")
        if not 0.0 <= self.filter_frac <= 1.0:
            raise ValueError(f"datareg.filter_frac: expected a number in [0, 1], got {self.filter_frac!r}")
        if self.sketch_rank < 1:
            raise ValueError(f"datareg.sketch_rank: expected >= 1, got {self.sketch_rank}")
        if self.subset_mode == "two_pass" and self.update_rule != "global_subset":
            raise ValueError("datareg.subset_mode: two_pass is the GREATS rule and needs update_rule=global_subset")
        return self

    @property
    def grouping(self) -> str:
        return self.groups or DEFAULT_GROUPS.get(self.update_rule, "layer")

    def k_for(self, n: int) -> int:
        k = self.k if self.k else max(1, int(math.floor(self.fraction * n)))
        if k > n:
            raise ValueError(f"datareg.k: {k} is larger than the general batch of {n} samples")
        return k


@dataclass
class DataregConfig(DataRegConfig):
    """The `datareg:` section: a DataRegConfig (scale/datareg.py's options) plus where the target comes from."""

    target: str = "file"              # file (target_path, cycled) | batch (the batch's own gradient)
    target_path: str = ""
    target_batch_size: int = 1        # target examples per step (the released SFT code: 1)
    merged_target: bool = False       # append the target rows to the general batch: one forward and backward


EVAL_KINDS = ("generate", "sft", "dpo")


@dataclass
class EvalSet:
    name: str = ""                    # metrics are logged as eval/<name>/<metric>
    path: str = ""                    # JSONL / parquet / folder
    kind: str = "generate"            # generate (prompt, answer) | sft (prompt, completion) |
    #                                   dpo (prompt, chosen, rejected)
    limit: int = 0                    # first `limit` rows (0: all)


@dataclass
class EvalConfig:
    """Held-out evaluation inside the trainer (scale/heldout.py): every `every` steps and at the end."""

    sets: list[EvalSet] = field(default_factory=list)
    every: int = 0                    # 0: only at the end
    at_start: bool = True             # also evaluate the initial model, logged as step 0
    n: int = 8                        # samples per prompt (generate sets), drawn with the generation: settings
    ks: list[int] = field(default_factory=list)   # pass@k values (empty: powers of two up to n)
    greedy: bool = True               # also greedy accuracy (one decode per prompt)
    max_new_tokens: int = 0           # 0: generation.max_new_tokens
    batch_size: int = 64              # prompts per generate call / rows per forward
    reward: str = ""                  # "" = method.rl.reward
    records: bool = True              # per-prompt correct counts to eval_records.jsonl

    def validate(self) -> EvalConfig:
        names = [s.name for s in self.sets]
        for i, s in enumerate(self.sets):
            if not s.name or "/" in s.name:
                raise ValueError(f"eval.sets[{i}].name: expected a non-empty name without '/', got {s.name!r}")
            if not s.path:
                raise ValueError(f"eval.sets[{i}].path: required (a JSONL / parquet file or a dataset folder)")
            _choice(f"eval.sets[{i}].kind", s.kind, EVAL_KINDS)
            if s.limit < 0:
                raise ValueError(f"eval.sets[{i}].limit: expected >= 0 (0: all rows), got {s.limit}")
        if len(set(names)) != len(names):
            raise ValueError(f"eval.sets: names must be distinct, got {names}")
        for key, v, lo in (("eval.every", self.every, 0), ("eval.n", self.n, 1),
                           ("eval.max_new_tokens", self.max_new_tokens, 0), ("eval.batch_size", self.batch_size, 1)):
            if v < lo:
                raise ValueError(f"{key}: expected an integer >= {lo}, got {v}")
        if any(not 1 <= k <= self.n for k in self.ks):
            raise ValueError(f"eval.ks: expected values in 1..eval.n={self.n}, got {self.ks}")
        return self


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    datareg: DataregConfig = field(default_factory=DataregConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Checks across keys; each error names the key."""
        m, r, g = self.method, self.run, self.generation
        _choice("method.name", m.name, METHODS)
        _choice("method.sft.aggregation", m.sft.aggregation, ("global_token_mean", "seq_mean_token_mean"))
        _choice("method.hpt.variant", m.hpt.variant, ("paper", "code"))
        _choice("method.hpt.gate_mode", m.hpt.gate_mode, ("switch", "smooth"))
        _choice("method.joint.schedule", m.joint.schedule, SCHEDULES)
        _choice("generation.backend", g.backend, ("hf", "ptlab", "vllm"))
        _choice("model.dtype", self.model.dtype, ("auto", "float32", "bfloat16", "float16", "float64"))
        _choice("run.lr_scheduler", r.lr_scheduler, ("constant", "linear", "cosine"))
        _choice("run.mixed_precision", r.mixed_precision, ("no", "bf16", "fp16"))
        if not self.model.path:
            raise ValueError("model.path: required (a local model folder or a hub name)")
        if not self.data.path:
            raise ValueError("data.path: required (a JSONL / parquet file or a dataset folder)")
        for key, v in [("run.max_steps", r.max_steps), ("run.batch_size", r.batch_size),
                       ("run.grad_accum", r.grad_accum), ("generation.n", g.n),
                       ("generation.max_new_tokens", g.max_new_tokens), ("data.max_length", self.data.max_length),
                       ("data.max_prompt_length", self.data.max_prompt_length),
                       ("run.logprob_chunk", r.logprob_chunk), ("method.rl.mini_batches", m.rl.mini_batches),
                       ("method.rl.epochs", m.rl.epochs)]:
            if v < 1:
                raise ValueError(f"{key}: expected a positive integer, got {v}")
        if not r.lr > 0:
            raise ValueError(f"run.lr: expected a positive number, got {r.lr}")
        if not g.temperature > 0:
            raise ValueError(f"generation.temperature: expected > 0, got {g.temperature}")
        if g.top_k < 0:
            raise ValueError(f"generation.top_k: expected >= 0 (0: no top-k cut), got {g.top_k}")
        if g.top_k and g.backend == "ptlab":
            raise ValueError("generation.top_k: the ptlab sampler has no top-k; use backend hf or top_k=0")
        if not 0 < g.top_p <= 1:
            raise ValueError(f"generation.top_p: expected a number in (0, 1], got {g.top_p}")
        if m.name in ("rl", "hpt", "luffy", "srft") and g.n < 2:
            raise ValueError(f"generation.n: method {m.name!r} needs at least 2 samples per prompt, got {g.n}")
        if r.batch_size % m.rl.mini_batches:
            raise ValueError(f"method.rl.mini_batches: must divide run.batch_size={r.batch_size}, "
                             f"got {m.rl.mini_batches}")
        if m.name == "sft_dpo" and m.joint.schedule == "sequential" and len(m.joint.order) != 2:
            raise ValueError(f"method.joint.order: expected two objective names, got {m.joint.order}")
        if len(r.betas) != 2:
            raise ValueError(f"run.betas: expected two numbers, got {r.betas}")
        _validate_datareg(self)
        self.eval.validate()
        return self


def _validate_datareg(cfg: Config) -> None:
    d = cfg.datareg
    if d.update_rule == "full":
        return
    d.validate()
    _choice("datareg.target", d.target, ("file", "batch"))
    if d.target == "file" and not d.target_path:
        raise ValueError("datareg.target_path: required with datareg.target=file (a JSONL of target examples)")
    if d.target == "batch" and d.update_rule == "target_only":
        raise ValueError("datareg.target: target_only needs a target set (target=file)")
    if d.target_batch_size < 1:
        raise ValueError(f"datareg.target_batch_size: expected a positive integer, got {d.target_batch_size}")
    if d.merged_target and (d.target != "file" or d.update_rule == "target_only" or d.subset_mode == "two_pass"):
        raise ValueError("datareg.merged_target: needs target=file and a one-pass subset or projection rule")


def _choice(key, value, valid):
    if value not in valid:
        raise ValueError(f"{key}: unknown value {value!r}; valid: {list(valid)}")


# ------------------------------------------------------------------------------------------ loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """YAML file (optional) + `a.b.c=value` overrides (values parsed as YAML) -> a validated Config."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config: file not found: {path}")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config: {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r}: expected key=value (e.g. run.max_steps=4)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key}: {p!r} is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    return from_dict(raw).validate()


def from_dict(raw: dict) -> Config:
    """Build a Config from nested dicts, checking every key and type (unknown key -> ValueError naming it)."""
    return _build(Config, raw, "")


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown key; valid keys in "
                         f"{prefix.rstrip('.') or 'the config'}: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name)
    return cls(**kwargs)


def _coerce(tp, value, key):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _coerce(arm, value, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: got {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {_coerce(kt, k, f"{key}.{k}"): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return value
    raise ValueError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug
