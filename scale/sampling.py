"""ptlab's own sampling loop (`generation.backend: ptlab`): what `model.generate` does for RL rollouts, lean.

`generate_ids` samples `n` completions per prompt from softmax(logits / temperature) restricted to the top-p
nucleus, one token at a time with a KV cache, exactly the distribution `model.generate(do_sample=True,
temperature, top_p, top_k=0)` samples from, with the same EOS handling (a finished row gets `pad_id` from then
on) and the same positions for left-padded prompts. What it drops is generate's generality: no logits
processors beyond temperature and top-p (so none of the extras a model's generation_config may carry, such
as a repetition penalty: RL scores its samples under softmax(logits / T), and this samples from exactly that),
no stopping criteria beyond EOS and the length, and per step

- one draw per row by inverse CDF (one uniform number) instead of `torch.multinomial` (which draws one
  exponential number per vocabulary entry on CPU), the same distribution;
- the attention mask built once as 4D and extended by a column (generate rebuilds it from 2D each step);
- the prompt pass done once per prompt and its cache repeated n times (generate runs it n times);
- on CPU, in float32, the linear layers run on oneDNN with their weights reordered once per call into its
  blocked layout (`cpu_packed_linears`; the reorder CPU inference engines and torch.compile's CPU freezing do):
  a decode step multiplies a few dozen rows by every weight, where torch's default path is slow. The values
  are the same products up to float32 rounding (another kernel sums in another order).

Greedy decoding (`greedy=True`) takes the argmax, as `model.generate(do_sample=False)` does; tests check
the two agree token for token, and `sampling_probs` against transformers' own warpers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn


def sampling_probs(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """[B, V] logits -> the float32 distribution generate samples from: softmax(logits / T) on the top-p nucleus.

    The nucleus is transformers' rule: sort ascending, drop the tokens whose cumulative probability is
    <= 1 - top_p, always keep the most likely token.
    """
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p}")
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1)
        drop = sorted_scores.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of [B, V] probabilities by inverse CDF; a zero-probability token is never drawn."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator) * cdf[:, -1:]
    tok = torch.searchsorted(cdf, u, right=True).squeeze(1)
    # u * total may round up to the total: fall back to the last token that has probability
    last = probs.shape[1] - 1 - (probs > 0).flip(-1).float().argmax(-1)
    return torch.minimum(tok, last)


def _packed_linear(weight, bias, x):
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _packable(m: nn.Module) -> bool:
    """A plain float32 nn.Linear on CPU with its own full weight: not a subclass, not sharded (a DTensor under
    FSDP, an empty ZeRO-3 partition), and without a forward set on the instance (accelerate's hooks live there)."""
    if type(m) is not nn.Linear or "forward" in m.__dict__:
        return False
    w = m.weight
    return (type(w.data) is torch.Tensor and w.device.type == "cpu" and w.dtype == torch.float32
            and tuple(w.shape) == (m.out_features, m.in_features))


@contextlib.contextmanager
def cpu_packed_linears(model: nn.Module, rows: int):
    """Inside the block, `model`'s packable linear layers (`_packable`) multiply with a oneDNN copy of their weight
    reordered for about `rows` rows at a time (module doc); yields how many. Nothing changes where oneDNN is
    missing or under autocast (whose dtype the copy would ignore). The copies live only inside the block, so
    the sampler always uses the current weights."""
    ops = getattr(torch.ops, "mkldnn", None)
    usable = (torch.backends.mkldnn.is_available() and not torch.is_autocast_enabled("cpu")
              and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))
    done = []
    try:
        for m in model.modules() if usable else ():
            if _packable(m):
                w = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), rows)
                b = None if m.bias is None else m.bias.detach()
                m.forward = functools.partial(_packed_linear, w, b)
                done.append(m)
        yield len(done)
    finally:
        for m in done:
            del m.forward


@torch.no_grad()
def generate_ids(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, n: int, max_new_tokens: int,
                 eos_id: int, pad_id: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                 generator: torch.Generator | None = None, logprobs: list | None = None) -> torch.Tensor:
    """Left-padded prompts [B, L] -> new tokens [B * n, <= max_new_tokens] (rows grouped by prompt, as
    `num_return_sequences=n`), `pad_id` after a row's EOS; stops early when every row has ended.
    `logprobs`, a list, receives one [B * n] float32 tensor per step: the log-probability of each drawn token
    under the distribution it was drawn from (after temperature and top-p), the rollout policy's log-prob."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n, max_new_tokens: expected positive integers, got {n}, {max_new_tokens}")
    with cpu_packed_linears(model, input_ids.shape[0] * n):
        return _sample(model, input_ids, attention_mask, n, max_new_tokens, eos_id, pad_id, temperature, top_p,
                       greedy, generator, logprobs)


def _sample(model, input_ids, attention_mask, n, max_new_tokens, eos_id, pad_id, temperature, top_p, greedy,
            generator, logprobs):
    from transformers import DynamicCache

    B, L = input_ids.shape
    dev = input_ids.device
    keep = attention_mask.bool()
    pos = (attention_mask.long().cumsum(-1) - 1).masked_fill(~keep, 0)
    # prompt pass: causal and no pad keys; a pad query sees itself only (a row with nothing to see gives NaN)
    eye = torch.eye(L, dtype=torch.bool, device=dev)
    mask4 = (torch.ones(L, L, dtype=torch.bool, device=dev).tril() & keep[:, None, None, :]) | eye
    cache = DynamicCache(config=model.config)
    # transformers renamed past_key_values to cache (deprecated from 5.2x, removed in 5.40): use what it takes
    ck = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=input_ids, attention_mask=mask4, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{ck: cache})
    logits = out.logits[:, -1].float().repeat_interleave(n, 0)
    if n > 1:
        cache.batch_repeat_interleave(n)
    keys = keep.repeat_interleave(n, 0)[:, None, None, :]            # [B n, 1, 1, L + t]
    nxt_pos = pos[:, -1:].repeat_interleave(n, 0) + 1
    alive = torch.ones(B * n, dtype=torch.bool, device=dev)
    new = []
    for t in range(max_new_tokens):
        probs = None if greedy else sampling_probs(logits, temperature, top_p)
        tok = logits.argmax(-1) if greedy else draw(probs, generator)
        if logprobs is not None and probs is not None:
            logprobs.append(probs.gather(1, tok[:, None]).squeeze(1).log())
        tok = torch.where(alive, tok, torch.full_like(tok, pad_id))
        new.append(tok)
        alive &= tok != eos_id
        if t == max_new_tokens - 1 or not bool(alive.any()):
            break
        keys = torch.cat([keys, keys.new_ones(B * n, 1, 1, 1)], -1)
        out = model(input_ids=tok[:, None], attention_mask=keys, position_ids=nxt_pos, use_cache=True, **{ck: cache})
        logits = out.logits[:, -1].float()
        nxt_pos = nxt_pos + 1
    return torch.stack(new, 1)
