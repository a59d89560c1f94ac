"""Token log-probabilities of a causal LM without a [B, T, vocab] float32 copy.

`Policy` wraps a Hugging Face causal LM so that its `forward` returns per-token log-probs (and
entropies) of the given tokens. It is the module handed to `accelerator.prepare`, so DDP / FSDP /
DeepSpeed see the whole computation as one forward. Inside:

1. the decoder runs once and returns hidden states [B, T, H];
2. only the positions whose next token is scored (the completion tokens) are kept: [N, H];
3. the LM head, the temperature division, log_softmax and the gather run over chunks of `chunk`
   positions, each under activation checkpointing, so at most [chunk, V] float32 logits exist at a time,
   in the forward and in the backward (where the chunk is recomputed). A chunk of at most `SMALL_CHUNK`
   logits (a few MB: a tiny vocabulary, a handful of tokens) is not checkpointed: there the recompute
   costs more time than the memory it saves is worth.

The entropy is a statistic unless an entropy bonus is trained: with `entropy_grad=False` it is computed
without building its graph (the values are the same; only the backward differs).

Shapes: input_ids, attention_mask, score_mask [B, T]. score_mask[i, t] is True when token t of row i
is scored given tokens < t (so score_mask[:, 0] must be False). Returns logp, entropy [B, T] with 0
where score_mask is False.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

SMALL_CHUNK = 1 << 20  # chunk positions x vocabulary: at most this many logits are kept, not recomputed


def _entropy(lsm: torch.Tensor) -> torch.Tensor:
    return -(lsm.exp() * lsm).sum(-1)


def _chunk_logp(head: nn.Module, h: torch.Tensor, target: torch.Tensor, temperature: float, with_entropy: bool,
                entropy_grad: bool = True):
    logits = head(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lsm = torch.log_softmax(logits, dim=-1)
    logp = lsm.gather(-1, target[:, None]).squeeze(-1)
    if not with_entropy:
        ent = torch.zeros_like(logp)
    elif entropy_grad:
        ent = _entropy(lsm)
    else:
        with torch.no_grad():
            ent = _entropy(lsm.detach())
    return logp, ent


def _vocab_size(head: nn.Module) -> int | None:
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def selected_logprobs(decoder_hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor,
                      score_mask: torch.Tensor, temperature: float = 1.0, chunk: int = 1024,
                      with_entropy: bool = True, entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [B, T, H] -> (logp, entropy) [B, T] at the scored positions (see module doc)."""
    if score_mask[:, 0].any():
        raise ValueError("score_mask: position 0 has no prefix and cannot be scored")
    B, T = input_ids.shape
    # position t is predicted from the hidden state at t - 1
    pos = score_mask[:, 1:].nonzero(as_tuple=True)
    h = decoder_hidden[:, :-1][pos]                          # [N, H]
    target = input_ids[:, 1:][pos]                           # [N]
    parts_lp, parts_ent = [], []
    V = _vocab_size(head)
    # at least one chunk, empty when nothing is scored: the result still hangs on the graph of the decoder
    # and the head, so the backward of an all-padding micro-batch gives zero gradients instead of failing
    # (and every DDP process runs the same backward)
    for s in range(0, max(h.shape[0], 1), chunk):
        args = (head, h[s:s + chunk], target[s:s + chunk], temperature, with_entropy, entropy_grad)
        small = V is not None and args[1].shape[0] * V <= SMALL_CHUNK
        if torch.is_grad_enabled() and h.requires_grad and not small:
            lp, ent = checkpoint(_chunk_logp, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logp(*args)
        parts_lp.append(lp)
        parts_ent.append(ent)
    dtype = torch.promote_types(decoder_hidden.dtype, torch.float32)
    flat_lp = torch.cat(parts_lp) if parts_lp else decoder_hidden.new_zeros(0, dtype=dtype)
    flat_ent = torch.cat(parts_ent) if parts_ent else decoder_hidden.new_zeros(0, dtype=dtype)
    logp = torch.zeros(B, T - 1, dtype=flat_lp.dtype, device=h.device).index_put(pos, flat_lp)
    ent = torch.zeros(B, T - 1, dtype=flat_lp.dtype, device=h.device).index_put(pos, flat_ent)
    pad = torch.zeros(B, 1, dtype=flat_lp.dtype, device=h.device)
    return torch.cat([pad, logp], 1), torch.cat([pad, ent], 1)


class Policy(nn.Module):
    """A causal LM whose forward returns per-token log-probs at the scored positions (module doc)."""

    def __init__(self, model: nn.Module, chunk: int = 1024):
        super().__init__()
        self.model = model
        self.chunk = chunk
        # FSDP's transformer auto-wrap reads the block classes from the top module
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """Passed on to the model: accelerate's FSDP2 loading (`fsdp_cpu_ram_efficient_loading`) re-ties tied
        embeddings by calling this on the module it prepares; without it lm_head became a separate copy."""
        return self.model.tie_weights(*args, **kwargs)

    def forward(self, input_ids, attention_mask, score_mask, temperature: float = 1.0, with_entropy: bool = True,
                entropy_grad: bool = True):
        return selected_logprobs(self.hidden(input_ids, attention_mask), self.model.get_output_embeddings(),
                                 input_ids, score_mask, temperature=temperature, chunk=self.chunk,
                                 with_entropy=with_entropy, entropy_grad=entropy_grad)

    def hidden(self, input_ids, attention_mask) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H] (the head is applied by ``selected_logprobs``)."""
        if is_right_padded(attention_mask):
            # Causal attention: a token never sees the pads after it, and pads are never scored, so the mask
            # changes nothing that is returned; without it attention takes its causal path (no mask built).
            attention_mask = None
        return self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row's mask is ones then zeros (real tokens from position 0, pads only after them)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()) and bool(attention_mask[:, 0].all())


def reference_logprobs(model: nn.Module, input_ids, attention_mask, score_mask, temperature: float = 1.0):
    """The plain full-logits computation (for tests and references): log_softmax(logits / T) gathered."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    lsm = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)
    lp = lsm.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)
    return torch.where(score_mask, lp, torch.zeros_like(lp))
