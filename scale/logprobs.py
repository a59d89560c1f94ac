"""Token log-probabilities of a causal LM, computed a chunk of positions at a time.

`Policy` wraps a Hugging Face causal LM so that its `forward` returns per-token log-probs (and, when asked,
entropies) of the given tokens. It is the module handed to `accelerator.prepare`, so DDP / FSDP /
DeepSpeed see the whole computation as one forward. Inside:

1. the decoder runs once and returns hidden states [B, T, H];
2. only the positions whose next token is scored (the completion tokens) are kept: [N, H];
3. the LM head, the temperature division (skipped at temperature 1), log_softmax and the gather run over
   chunks of `chunk` positions, each under activation checkpointing, so only a few [chunk, V] float32
   tensors exist at a time, in the forward and in the backward (where the chunk is recomputed). A single
   chunk, or one of at most `SMALL_CHUNK` logits (a few MB: a tiny vocabulary, a handful of tokens), is not
   checkpointed: there the recompute costs more time than the memory it saves is worth.

The chunk comes from a memory budget (`run.logprob_memory_mb`): chunk = budget / (copies x V x bytes per
float), at least 1, where copies is the number of [chunk, V] tensors live at the peak: HEAD_COPIES, or
HEAD_COPIES_BONUS when the entropy carries gradients (measured with `experiments/bench_head.py`; README,
"Batches and normalisation"). An explicit `chunk` overrides it.

The entropy is computed only when asked (`with_entropy`): the trainer asks on the steps that log it
(`run.entropy_every`) and on every step of an entropy bonus, so otherwise it costs nothing and is None.
With `entropy_grad=False` it is a statistic computed without building its graph (the values are the same;
only the backward differs).

Padding-free batches (`run.padding_free`, `policy_logps`): the rows of a right-padded micro-batch are
concatenated into one row of their real tokens ([1, S], S = the sum of the lengths), with position ids that
restart at 0 for each row and no attention mask. transformers (5.x) then builds a block-diagonal causal mask
from the position ids for eager / sdpa attention (masking_utils.find_packed_sequence_indices) and runs
variable-length kernels for flash-attention, so each row attends to itself only and every hidden state equals
the padded one up to rounding. The head scores the same positions (a row's first token is never scored, so no
position is predicted across a row boundary), and the results are scattered back to the padded [B, T] layout
the loss uses. `packing_error` checks a model does this before a run relies on it. The block-diagonal mask
is [S, S] and sdpa then attends over all S positions, so on CPU the trainer switches an sdpa model to
`_packed_attention` (`use_packed_attention`), which runs sdpa's causal kernel on each packed example in turn:
the same values, attention costing the sum of the rows' squared lengths, and padded batches (generation)
passed to sdpa unchanged.

Shared prefixes (`run.share_prefix`, ours): rows that start with the same context, such as the n samples of one
RL prompt or the two answers of a DPO pair, hold it once in the packed row. The first row of a group is packed
whole; every other row of the group only from its last context token on, with its true position ids, so it
starts at a position c > 0. `_packed_attention` reads such an example as the continuation of the first c tokens
of the last example that started at 0: it attends to their keys and values, then causally to its own. Each row
then sees exactly the tokens it sees alone, so every scored log-prob and, since the loss is a sum over rows,
every gradient equals the padded one up to rounding (the shared positions' states receive the sum of their
rows' gradients, as their separate copies did). The last context token is repeated in every row because its
hidden state predicts that row's first scored token. This needs `_packed_attention`: transformers' own packed
paths take only position 0 as an example's start.

Shapes: input_ids, attention_mask, score_mask [B, T]. score_mask[i, t] is True when token t of row i
is scored given tokens < t (so score_mask[:, 0] must be False). Returns logp [B, T] and entropy [B, T] or
None, with 0 where score_mask is False.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from scale.config import RunConfig

SMALL_CHUNK = 1 << 20  # chunk positions x vocabulary: at most this many logits are kept, not recomputed
HEAD_COPIES = 3        # [chunk, V] float tensors live at once at the head's peak (measured: bench_head)
HEAD_COPIES_BONUS = 5  # the same when the entropy carries gradients (an entropy bonus)
HEAD_MEMORY_MB = RunConfig.logprob_memory_mb   # the default budget: the config's


def _entropy(lsm: torch.Tensor) -> torch.Tensor:
    return -(lsm.exp() * lsm).sum(-1)


def _chunk_logp(head: nn.Module, h: torch.Tensor, target: torch.Tensor, temperature: float, with_entropy: bool,
                entropy_grad: bool = True):
    logits = head(h)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))   # no copy when already float32
    if temperature != 1.0:   # a division by 1 would copy [chunk, V] (and its gradient) for nothing
        logits = logits / temperature
    lsm = torch.log_softmax(logits, dim=-1)
    del logits   # log_softmax keeps only its output for the backward: one [chunk, V] fewer from here on
    logp = lsm.gather(-1, target[:, None]).squeeze(-1)
    if not with_entropy:
        return logp, None
    if entropy_grad:
        return logp, _entropy(lsm)
    with torch.no_grad():   # a statistic: p log p formed in place, one [chunk, V] temporary
        return logp, -lsm.exp().mul_(lsm).sum(-1)


def vocab_size(head: nn.Module) -> int | None:
    """The head's output size: nn.Linear's out_features (kept under ZeRO-3, which empties the weight), else
    the rows of a 2-D weight; None when neither says."""
    n = getattr(head, "out_features", None)
    if isinstance(n, int):
        return n
    w = getattr(head, "weight", None)
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None


def head_chunk(vocab: int | None, itemsize: int, chunk: int = 0, memory_mb: float = HEAD_MEMORY_MB,
               copies: int = HEAD_COPIES) -> int:
    """Positions per head chunk: `chunk` when set (> 0), else the most that keep `copies` [chunk, vocab]
    tensors of `itemsize` bytes within `memory_mb`, at least 1."""
    if chunk:
        return chunk
    if vocab is None:
        raise ValueError("run.logprob_chunk: the output head has neither out_features nor a 2-D weight, so the "
                         "chunk cannot be derived from run.logprob_memory_mb; set run.logprob_chunk")
    return max(1, int(memory_mb * 2**20) // (copies * itemsize * vocab))


def selected_logprobs(decoder_hidden: torch.Tensor, head: nn.Module, input_ids: torch.Tensor,
                      score_mask: torch.Tensor, temperature: float = 1.0, chunk: int = 0,
                      memory_mb: float = HEAD_MEMORY_MB, with_entropy: bool = True,
                      entropy_grad: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden states [B, T, H] -> (logp, entropy or None) [B, T] at the scored positions (see module doc)."""
    if score_mask[:, 0].any():
        raise ValueError("score_mask: position 0 has no prefix and cannot be scored")
    B, T = input_ids.shape
    # position t is predicted from the hidden state at t - 1
    pos = score_mask[:, 1:].nonzero(as_tuple=True)
    h = decoder_hidden[:, :-1][pos]                          # [N, H]
    target = input_ids[:, 1:][pos]                           # [N]
    dtype = torch.promote_types(decoder_hidden.dtype, torch.float32)
    V = vocab_size(head)
    bonus = with_entropy and entropy_grad and torch.is_grad_enabled()
    chunk = head_chunk(V, dtype.itemsize, chunk, memory_mb, HEAD_COPIES_BONUS if bonus else HEAD_COPIES)
    # a single chunk is not checkpointed: its backward peak is the same with or without, and the recompute
    # would only cost time
    several = h.shape[0] > chunk
    parts_lp, parts_ent = [], []
    # at least one chunk, empty when nothing is scored: the result still hangs on the graph of the decoder
    # and the head, so the backward of an all-padding micro-batch gives zero gradients instead of failing
    # (and every DDP process runs the same backward)
    for s in range(0, max(h.shape[0], 1), chunk):
        args = (head, h[s:s + chunk], target[s:s + chunk], temperature, with_entropy, entropy_grad)
        small = V is not None and args[1].shape[0] * V <= SMALL_CHUNK
        if torch.is_grad_enabled() and h.requires_grad and several and not small:
            lp, ent = checkpoint(_chunk_logp, *args, use_reentrant=False)
        else:
            lp, ent = _chunk_logp(*args)
        parts_lp.append(lp)
        parts_ent.append(ent)
    return _scatter(parts_lp, pos, B, T, h.device), (_scatter(parts_ent, pos, B, T, h.device) if with_entropy
                                                     else None)


def _scatter(parts: list[torch.Tensor], pos, B: int, T: int, device) -> torch.Tensor:
    """The chunks' values [N] back to [B, T]: position 0 and the unscored positions are 0."""
    flat = torch.cat(parts)
    out = torch.zeros(B, T - 1, dtype=flat.dtype, device=device).index_put(pos, flat)
    return torch.cat([torch.zeros(B, 1, dtype=flat.dtype, device=device), out], 1)


class Policy(nn.Module):
    """A causal LM whose forward returns per-token log-probs at the scored positions (module doc)."""

    def __init__(self, model: nn.Module, chunk: int = 0, memory_mb: float = HEAD_MEMORY_MB):
        super().__init__()
        self.model = model
        self.chunk, self.memory_mb = chunk, memory_mb   # chunk 0: from the memory budget (module doc)
        # FSDP's transformer auto-wrap reads the block classes from the top module
        self._no_split_modules = getattr(model, "_no_split_modules", None)

    def tie_weights(self, *args, **kwargs):
        """Passed on to the model: accelerate's FSDP2 loading (`fsdp_cpu_ram_efficient_loading`) re-ties tied
        embeddings by calling this on the module it prepares; without it lm_head became a separate copy."""
        return self.model.tie_weights(*args, **kwargs)

    def forward(self, input_ids, attention_mask, score_mask, temperature: float = 1.0, with_entropy: bool = True,
                entropy_grad: bool = True, position_ids=None):
        return selected_logprobs(self.hidden(input_ids, attention_mask, position_ids),
                                 self.model.get_output_embeddings(), input_ids, score_mask, temperature=temperature,
                                 chunk=self.chunk, memory_mb=self.memory_mb, with_entropy=with_entropy,
                                 entropy_grad=entropy_grad)

    def hidden(self, input_ids, attention_mask, position_ids=None) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H] (the head is applied by ``selected_logprobs``). With
        `position_ids` (a packed row, module doc) there is no attention mask: the positions delimit the rows."""
        if position_ids is not None or is_right_padded(attention_mask):
            # Causal attention: a token never sees the pads after it, and pads are never scored, so the mask
            # changes nothing that is returned; without it attention takes its causal path (no mask built).
            attention_mask = None
        return self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                        use_cache=False).last_hidden_state


def pack(mb: dict, share_prefix: bool = False) -> dict:
    """A right-padded micro-batch (input_ids, attention_mask, score_mask [B, T]) as one packed row [1, S]: the
    real tokens row after row, position ids restarting at 0 per row, the score mask, and `index` (the (row,
    column) of each packed token, for `unpack`).

    With `share_prefix`, rows that begin with the same unscored context (RL samples of one prompt, a DPO pair)
    hold it once: the first such row is packed whole; each later one only from the last context token on, with
    its true positions (so its first position is > 0). `_packed_attention` reads that as "attends to the first
    positions of the last row that started at 0, then to itself" (module doc, "Shared prefixes")."""
    att = mb["attention_mask"].bool()
    if not is_right_padded(att):
        raise ValueError("pack: the micro-batch is not right-padded")
    keep = att
    if share_prefix:
        order, starts = _share(mb["input_ids"], mb["score_mask"], att.sum(1).tolist())
        keep = att & (torch.arange(att.shape[1], device=att.device) >= torch.tensor(starts, device=att.device)[:, None])
    rows, cols = keep.nonzero(as_tuple=True)   # row after row
    if share_prefix:   # ... in the groups' order
        rank = torch.empty(len(order), dtype=torch.long, device=att.device)
        rank[order] = torch.arange(len(order), device=att.device)
        perm = torch.sort(rank[rows], stable=True).indices
        rows, cols = rows[perm], cols[perm]
    return {"input_ids": mb["input_ids"][rows, cols][None], "position_ids": cols[None],
            "score_mask": mb["score_mask"][rows, cols][None], "index": (rows, cols), "shape": att.shape}


def _share(input_ids: torch.Tensor, score_mask: torch.Tensor, lens: list[int]) -> tuple[list[int], list[int]]:
    """Packing order and first packed column per row: a row whose context before its last unscored token
    (c = first scored column - 1 tokens; a row with nothing scored counts all but its last) equals an earlier
    row's starts at column c and goes right after the first row that has it (its root). c = 0: packed whole."""
    ids, score = input_ids.cpu(), score_mask.cpu()
    first = torch.where(score.any(1), score.float().argmax(1), torch.tensor(lens)).tolist()
    groups: dict[tuple, list[int]] = {}
    starts = [0] * len(lens)
    for i in range(len(lens)):
        c = first[i] - 1
        key = (c, *ids[i, :c].tolist()) if c > 0 else (i, "alone")
        if key in groups:
            starts[i] = c
        groups.setdefault(key, []).append(i)
    return [i for g in groups.values() for i in g], starts


def unpack(x: torch.Tensor, p: dict) -> torch.Tensor:
    """Values of a packed row [1, S] back in the padded layout of `pack`'s micro-batch ([B, T], 0 on the padding
    and on a shared prefix's columns of the rows that did not hold it: those are never scored)."""
    return x.new_zeros(p["shape"]).index_put(p["index"], x[0])


PACKING = ("none", "rows", "prefix")


def policy_logps(model, mb: dict, packing: str = "none", **kw):
    """(logp, entropy or None) [B, T] of a collated micro-batch under `model` (a `Policy`, or the prepared
    module wrapping one), computed on the padded batch ("none"), on its packed row ("rows": `run.padding_free`),
    or packed with shared prefixes held once ("prefix": `run.share_prefix`; module doc). `RunConfig.packing`."""
    if packing not in PACKING:
        raise ValueError(f"packing: expected one of {PACKING}, got {packing!r}")
    if packing == "none":
        return model(mb["input_ids"], mb["attention_mask"], mb["score_mask"], **kw)
    p = pack(mb, share_prefix=packing == "prefix")
    lp, ent = model(p["input_ids"], None, p["score_mask"], position_ids=p["position_ids"], **kw)
    return unpack(lp, p), (unpack(ent, p) if ent is not None else None)


PACKED_ATTENTION = "ptlab_packed"


_last_segments: tuple = (None, None)   # (weak reference to a position_ids tensor, its segments)


def _segments(position_ids: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """(start, end, prefix start, prefix length) of each example of a packed row [1, S]: a new example wherever
    the position does not go up by 1. One starting at position 0 has no prefix; one starting at position c > 0
    continues the first c tokens of the last example that started at 0 (a shared prefix, `pack`). Every layer
    gets the same position_ids tensor: the segments are read once per forward (on a GPU, one sync)."""
    global _last_segments
    ref, seg = _last_segments
    if ref is not None and ref() is position_ids:
        return seg
    pos = position_ids[0]
    cut = torch.nonzero(pos[1:] - pos[:-1] != 1).flatten().add(1).tolist()
    bounds = [0, *cut, pos.shape[0]]
    first = pos[bounds[:-1]].tolist()
    seg, root, root_len = [], 0, 0
    for a, b, c in zip(bounds[:-1], bounds[1:], first):
        if c == 0:
            root, root_len = a, b - a
        elif c > root_len:
            raise ValueError(f"packed row: an example starts at position {c}, past the end of the example it "
                             f"continues ({root_len} tokens)")
        seg.append((a, b, root, c))
    _last_segments = (weakref.ref(position_ids), seg)
    return seg


def _packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, position_ids=None,
                      **kw):
    """sdpa, but a packed row (batch 1, no mask, position ids restarting: module doc) attends one example at a
    time, each with sdpa's causal kernel, as its padded row would: no [S, S] mask, and attention costs the sum of
    the rows' squared lengths instead of the square of their total. An example that continues a shared prefix
    attends to the prefix's keys, then causally to its own. Anything else goes to sdpa unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if (attention_mask is None and position_ids is not None and query.shape[0] == 1
            and query.shape[2] == key.shape[2] == position_ids.shape[-1]):
        parts = []
        for a, b, r, c in _segments(position_ids):
            k, v, mask = key[:, :, a:b], value[:, :, a:b], None
            if c:
                k = torch.cat([key[:, :, r:r + c], k], 2)
                v = torch.cat([value[:, :, r:r + c], v], 2)
                mask = torch.ones(b - a, c + b - a, dtype=torch.bool, device=query.device).tril(c)[None, None]
            parts.append(sdpa_attention_forward(module, query[:, :, a:b], k, v, mask, dropout=dropout,
                                                scaling=scaling, **kw)[0])
        return torch.cat(parts, 1), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kw)


def _packed_mask(*args, attention_mask=None, **kw):
    """sdpa's mask, except none at all where there is no padding mask: a packed row (its rows are separated by
    `_packed_attention`) or a plain causal batch (sdpa's causal kernel)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kw)


def use_packed_attention(model: nn.Module) -> bool:
    """Switch a model with sdpa attention and only full causal layers to `_packed_attention` (registered with
    transformers as PACKED_ATTENTION): the same values, per-row attention on packed rows. Returns whether it did;
    other models keep their attention (a sliding window, for one, is not reproduced per row here)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    cfg = model.config
    if getattr(cfg, "_attn_implementation", None) != "sdpa":
        return False
    if any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"])):
        return False
    if getattr(cfg, "use_sliding_window", False) or not getattr(cfg, "is_causal", True):
        return False
    AttentionInterface.register(PACKED_ATTENTION, _packed_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)
    model.set_attn_implementation(PACKED_ATTENTION)
    return True


@torch.no_grad()
def packing_error(model: nn.Module, shared: bool = False) -> float:
    """How far a model's hidden states on two rows packed into one (position ids restarting, no mask) are
    from those of each row alone: max |difference| / max |value|. Near rounding when the attention follows the
    position ids; of order 1 when the second row attends to the first. `shared`: the second row starts with the
    first one's 3 tokens and is packed as their continuation (`pack` with share_prefix)."""
    dec = model.get_decoder()
    p = next(dec.parameters())
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(0, vocab, (1, n), generator=g).to(p.device) for n in (7, 5))
    first = 0
    if shared:
        b, first = torch.cat([a[:, :3], b], 1), 2   # b alone is 8 tokens; packed from its column 2 on
    was = dec.training
    dec.eval()
    try:
        pos = torch.cat([torch.arange(7), torch.arange(first, b.shape[1])])[None].to(p.device)
        packed = dec(input_ids=torch.cat([a, b[:, first:]], 1), position_ids=pos, use_cache=False).last_hidden_state
        alone = torch.cat([dec(input_ids=x, use_cache=False).last_hidden_state for x in (a, b)], 1)
    finally:
        dec.train(was)
    alone = torch.cat([alone[:, :7], alone[:, 7 + first:]], 1)
    return float((packed - alone).abs().max() / alone.abs().max().clamp_min(1e-30))


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
