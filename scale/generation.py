"""Sampling completions for rollouts and in-training evaluation, with the settings of `generation:`
(temperature, top_p, top_k = 0 unless set), or greedy decoding; backends hf (`model.generate`), ptlab
(`scale.sampling`, the same sampling law) and vllm (GPU only)."""

from __future__ import annotations

import torch

from scale.config import Config
from scale.gather import gathered


class Generator:
    def __init__(self, cfg: Config, tok, acc, model_fn, rollouts: bool = True, root_fn=None,
                 logprobs: bool = False):
        """`model_fn()` returns the current (unwrapped) Hugging Face model, `root_fn()` the prepared module
        (FSDP2: its sharded root); vLLM serves the rollouts of an on-policy method only (evaluation and
        off-policy methods sample with hf). `logprobs`: record the sampler's log-probs (the rollout correction
        reads them; otherwise they are not kept)."""
        self.cfg, self.tok, self.acc, self.model_fn, self.root_fn = cfg, tok, acc, model_fn, root_fn
        self.logprobs = logprobs
        self.vllm = _VllmGenerator(cfg, acc, logprobs) if cfg.generation.backend == "vllm" and rollouts else None
        # per completion of the last sampled batch, the sampler's log-prob of each kept token (ptlab and vllm
        # backends, when asked; else None): the rollout policy of `method.rl.rollout_correction`
        self.rollout_logprobs: list[list[float]] | None = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int = 0,
                 greedy: bool = False) -> list[list[int]]:
        """n completions per prompt (grouped), each cut after its first EOS (kept)."""
        root = self.root_fn() if self.root_fn else None
        g = self.cfg.generation
        if self.vllm is not None and not greedy and (max_new_tokens or g.max_new_tokens) == g.max_new_tokens:
            self.vllm.push(self.model_fn(), root, self.acc)   # parameter by parameter: no whole-model gather
            return self._cut_sampled(self.vllm.generate(prompts, n), self.vllm.rollout_logprobs)
        self.rollout_logprobs = None
        with gathered(root, self.acc):
            return self._generate(prompts, n, max_new_tokens, greedy)

    def _generate(self, prompts, n, max_new_tokens, greedy):
        g = self.cfg.generation
        max_new = max_new_tokens or g.max_new_tokens
        model = self.model_fn()
        was_training = model.training
        model.eval()
        from scale.data import collate as pad

        b = pad([{"input_ids": p} for p in prompts], self.tok.pad_token_id, left=True)
        ids, mask = b["input_ids"].to(self.acc.device), b["attention_mask"].to(self.acc.device)
        try:
            if g.backend == "ptlab" and not greedy:
                from scale.sampling import generate_ids

                steps = [] if self.logprobs else None
                new = generate_ids(model, ids, mask, n, max_new, self.tok.eos_token_id, self.tok.pad_token_id,
                                   temperature=g.temperature, top_p=g.top_p, logprobs=steps)
                return self._cut_sampled(new.tolist(), torch.stack(steps, 1).tolist() if steps is not None else None)
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None} if greedy else \
                {"do_sample": True, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 num_return_sequences=n, pad_token_id=self.tok.pad_token_id,
                                 eos_token_id=self.tok.eos_token_id, **sampling)[:, ids.shape[1]:]
            return [self._cut(row) for row in new.tolist()]
        finally:
            model.train(was_training)

    def _cut_sampled(self, rows: list[list[int]], logprobs: list[list[float]] | None) -> list[list[int]]:
        """`_cut` each row, and keep the sampler's log-probs of the kept tokens (if recorded) as `rollout_logprobs`."""
        rows = [self._cut(row) for row in rows]
        self.rollout_logprobs = None if logprobs is None else [lp[:len(r)] for lp, r in zip(logprobs, rows)]
        return rows

    def _cut(self, row: list[int]) -> list[int]:
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        if eos in row:
            row = row[: row.index(eos) + 1]
        else:
            while row and row[-1] == pad:
                row.pop()
        return row if row else [eos]


class _VllmGenerator:
    """Colocated vLLM: one engine in every training process (data parallel; the settings of TRL's colocate mode
    with tensor parallel 1), sharing the GPU with training.

    Each rollout batch: wake the weights (sleep mode), push the current weights one parameter at a time
    (`scale.vllm_sync.weight_stream`: gathered per parameter under FSDP2 / ZeRO-3, adapters merged under LoRA),
    reset the prefix cache (its KV entries were computed with the old weights), wake the KV cache, sample with
    the log-probability of each sampled token (`rollout_logprobs`, after temperature), and put vLLM back to sleep
    (level 2: weights and KV cache freed) so that training gets the memory back.

    Not run on this CPU-only machine (vLLM needs a GPU): the weight stream is tested on CPU processes (FSDP2,
    ZeRO-3, LoRA) against the unsharded checkpoint; the calls into vLLM follow its LLM API as TRL 1.16 uses
    it. `rollout_logprobs` feed the rollout correction (`method.rl.estimator_options.rollout_correction`).
    """

    def __init__(self, cfg: Config, acc, logprobs: bool = False):
        import os

        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ValueError("generation.backend: 'vllm' is not installed (pip install vllm), use 'hf'") from None
        g = cfg.generation
        # the external launcher makes each process's engine join torch's process group through these variables
        os.environ.update(RANK=str(acc.process_index), LOCAL_RANK=str(acc.local_process_index),
                          WORLD_SIZE=str(acc.num_processes))
        self.cfg, self.SamplingParams, self.sleep = cfg, SamplingParams, g.vllm_sleep
        dtype = "bfloat16" if cfg.run.mixed_precision == "bf16" else cfg.model.dtype   # the compute dtype
        self.llm = LLM(model=cfg.model.path, tensor_parallel_size=1, dtype=dtype,
                       gpu_memory_utilization=g.vllm_gpu_memory_utilization,
                       max_model_len=cfg.data.max_length + g.max_new_tokens, enable_prefix_caching=True,
                       enable_sleep_mode=self.sleep, distributed_executor_backend="external_launcher",
                       seed=cfg.run.seed + acc.process_index,   # each rank samples its own completions
                       logprobs_mode="processed_logprobs")      # log-probs after temperature, as sampled
        if self.sleep:
            self.llm.sleep(level=2)
        self.logprobs = logprobs
        self.rollout_logprobs: list[list[float]] | None = None
        acc.wait_for_everyone()

    def push(self, model, root, acc) -> None:
        from scale.vllm_sync import weight_stream

        if self.sleep:
            self.llm.wake_up(tags=["weights"])
        target = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        for name, tensor in weight_stream(model, root, acc):   # every rank: the gathers are collective
            target.load_weights([(name, tensor)])
        self.llm.reset_prefix_cache()

    def generate(self, prompts: list[list[int]], n: int) -> list[list[int]]:
        g = self.cfg.generation
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        sp = self.SamplingParams(n=n, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k or -1,
                                 max_tokens=g.max_new_tokens,
                                 logprobs=0 if self.logprobs else None)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        if self.sleep:
            self.llm.sleep(level=2)
        done = [o for out in outs for o in out.outputs]
        self.rollout_logprobs = [[step[t].logprob for t, step in zip(o.token_ids, o.logprobs)] for o in done] \
            if self.logprobs else None
        return [list(o.token_ids) for o in done]
