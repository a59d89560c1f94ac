"""Sampling completions for rollouts and in-training evaluation, with the settings of `generation:`
(temperature, top_p, top_k = 0 unless set), or greedy decoding; backends hf (`model.generate`), ptlab
(`scale.sampling`, the same sampling law) and vllm (GPU only)."""

from __future__ import annotations

import contextlib

import torch

from scale.config import Config


class Generator:
    def __init__(self, cfg: Config, tok, acc, model_fn, rollouts: bool = True, root_fn=None):
        """`model_fn()` returns the current (unwrapped) Hugging Face model, `root_fn()` the prepared module
        (FSDP2: its sharded root); vLLM serves the rollouts of an on-policy method only (evaluation and
        off-policy methods sample with hf)."""
        self.cfg, self.tok, self.acc, self.model_fn, self.root_fn = cfg, tok, acc, model_fn, root_fn
        self.vllm = _VllmGenerator(cfg) if cfg.generation.backend == "vllm" and rollouts else None

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int = 0,
                 greedy: bool = False) -> list[list[int]]:
        """n completions per prompt (grouped), each cut after its first EOS (kept)."""
        with gathered(self.root_fn() if self.root_fn else None, self.acc):
            return self._generate(prompts, n, max_new_tokens, greedy)

    @torch.no_grad()
    def _generate(self, prompts, n, max_new_tokens, greedy):
        g = self.cfg.generation
        max_new = max_new_tokens or g.max_new_tokens
        model = self.model_fn()
        if self.vllm is not None and not greedy and max_new == g.max_new_tokens:
            return self.vllm.generate(model, prompts, n)
        was_training = model.training
        model.eval()
        from scale.data import collate as pad

        b = pad([{"input_ids": p} for p in prompts], self.tok.pad_token_id, left=True)
        ids, mask = b["input_ids"].to(self.acc.device), b["attention_mask"].to(self.acc.device)
        if g.backend == "ptlab" and not greedy:
            from scale.sampling import generate_ids

            new = generate_ids(model, ids, mask, n, max_new, self.tok.eos_token_id, self.tok.pad_token_id,
                               temperature=g.temperature, top_p=g.top_p)
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else \
                {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 num_return_sequences=n, pad_token_id=self.tok.pad_token_id,
                                 eos_token_id=self.tok.eos_token_id, **sampling)[:, ids.shape[1]:]
        model.train(was_training)
        return [self._cut(row) for row in new.tolist()]

    def _cut(self, row: list[int]) -> list[int]:
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        if eos in row:
            row = row[: row.index(eos) + 1]
        else:
            while row and row[-1] == pad:
                row.pop()
        return row if row else [eos]


@contextlib.contextmanager
def gathered(root, acc):
    """Under FSDP2 and ZeRO-3, the full parameters for the length of a generation: every sharded unit is
    gathered once and kept (not re-gathered at each decoding step), then sharded again. FSDP2: `generate`
    runs the inner model, whose embedding and head belong to the root unit that its forward would otherwise
    skip (a mix of plain tensors and DTensors). Elsewhere (one process, DDP, ZeRO-2) nothing to do."""
    from torch.distributed.fsdp import FSDPModule

    if zero3_engine(root):
        with _zero3_gathered(root):
            yield
        return
    units = [m for m in root.modules() if isinstance(m, FSDPModule)] if root is not None else []
    if not units:
        yield
        return
    root._get_fsdp_state()._lazy_init()   # what the root's first forward does; generate may come first
    after = acc.state.fsdp_plugin.reshard_after_forward
    for u in units:
        u.set_reshard_after_forward(False)
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
            u.set_reshard_after_forward(after)


def zero3_engine(module) -> bool:
    """A DeepSpeed engine whose parameters are partitioned (ZeRO-3)."""
    return getattr(module, "zero_optimization_stage", lambda: 0)() == 3


@contextlib.contextmanager
def _zero3_gathered(engine):
    """ZeRO-3: gather every parameter once and lift the engine's per-module fetch / release hooks for the
    generation (with them each decoding step would gather and release every layer again, and ranks that stop
    at different lengths would wait on each other), then put the hooks back and partition again."""
    import deepspeed

    offload = engine.optimizer.parameter_offload
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        offload._remove_module_hooks()
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()


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
