"""Token log-probabilities of a causal LM without a [B, T, vocab] float32 copy.

`Policy` wraps a Hugging Face causal LM so that its `forward` returns per-token log-probs (and
entropies) of the given tokens. It is the module handed to `accelerator.prepare`, so DDP / FSDP /
DeepSpeed see the whole computation as one forward. Inside:

1. the decoder runs once and returns hidden states [B, T, H];
2. only the positions whose next token is scored (the completion tokens) are kept: [N, H];
3. the LM head, the temperature division, log_softmax and the gather run over chunks of `chunk`
   positions, each under activation checkpointing, so at most [chunk, V] float32 logits exist at a time,
   in the forward and in the backward (where the chunk is recomputed).

Shapes: input_ids, attention_mask, score_mask [B, T]. score_mask[i, t] is True when token t of row i
is scored given tokens < t (so score_mask[:, 0] must be False). Returns logp, entropy [B, T] with 0
where score_mask is False.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_logp(head: nn.Module, h: torch.Tensor, target: torch.Tensor, temperature: float, with_entropy: bool):
    logits = head(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lsm = torch.log_softmax(logits, dim=-1)
    logp = lsm.gather(-1, target[:, None]).squeeze(-1)
    if with_entropy:
        ent = -(lsm.exp() * lsm).sum(-1)
    else:
        ent = torch.zeros_like(logp)
    return logp, ent


def selected_logprobs(decoder_hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor,
                      score_mask: torch.Tensor, temperature: float = 1.0, chunk: int = 1024,
                      with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [B, T, H] -> (logp, entropy) [B, T] at the scored positions (see module doc)."""
    if score_mask[:, 0].any():
        raise ValueError("score_mask: position 0 has no prefix and cannot be scored")
    B, T = input_ids.shape
    # position t is predicted from the hidden state at t - 1
    pos = score_mask[:, 1:].nonzero(as_tuple=True)
    h = decoder_hidden[:, :-1][pos]                          # [N, H]
    target = input_ids[:, 1:][pos]                           # [N]
    parts_lp, parts_ent = [], []
    for s in range(0, h.shape[0], chunk):
        args = (head, h[s:s + chunk], target[s:s + chunk], temperature, with_entropy)
        if torch.is_grad_enabled() and h.requires_grad:
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

    def forward(self, input_ids, attention_mask, score_mask, temperature: float = 1.0, with_entropy: bool = True):
        decoder = self.model.get_decoder()
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return selected_logprobs(out.last_hidden_state, self.model.get_output_embeddings(), input_ids, score_mask,
                                 temperature=temperature, chunk=self.chunk, with_entropy=with_entropy)


def reference_logprobs(model: nn.Module, input_ids, attention_mask, score_mask, temperature: float = 1.0):
    """The plain full-logits computation (for tests and references): log_softmax(logits / T) gathered."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    lsm = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, -1)
    lp = lsm.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    lp = torch.cat([torch.zeros_like(lp[:, :1]), lp], 1)
    return torch.where(score_mask, lp, torch.zeros_like(lp))
