"""Data-regularised updates (Dr. Post-Training, ``docs/drpt.md`` sections 1.3-1.5) inside one backward pass.

Each step the general micro-batch's per-sample gradients g_i and a target gradient g_T define an update:
per group Q of hooked layers (a layer, a decoder block, a custom list of layers, or all of them), the
group's part of the update is the (token-weighted) average of the per-sample gradients of a subset S_Q
chosen by the scores s_i^Q = <g_i^Q, g_T^Q> (top-k, negative filtering, random control), or, in the
``projection`` rule, the Euclidean projection of g_T^Q onto any ``theory.projection`` set built from the
g_i^Q. Parameters that are not hooked (norms, a tied embedding / LM head) keep the ordinary full-batch
gradient.

How it runs without per-sample gradients. Every trainable ``nn.Linear`` (LoRA's ``lora_A`` / ``lora_B``
included, each its own layer; the output embedding excluded, its input is not per row) is patched so that
its forward is an autograd Function whose backward sees the layer input x [B, T, I] and the output
gradient delta [B, T, O]. The per-sample weight gradient is g_i = delta_i^T x_i (a sum over tokens), and
its score against the target's G_T = sum_v delta_v^T x_v (v over the target tokens) takes one of three forms
(proofs: theory/README.md section 5; names as docs/drpt.md section 1.5):

    matrix   (PIP)    r_i = sum_t delta_{i,t}^T G_T x_{i,t}                      O*I per token
    ghost    (GIP)    r_i = sum_t sum_v (delta_{i,t} . delta_v)(x_{i,t} . x_v)   V*(I+O) per token
    sketched (LoGra)  r_i = <(delta_i P_O)^T (x_i P_I), (delta_T P_O)^T (x_T P_I)> I*r + O*r + r*r per token

with Gaussian P_I [I, r], P_O [O, r] (entries N(0, 1/r)); a side whose dimension is <= r uses the identity,
so a rank at least every dimension makes the sketch exact. A bias adds sum_t delta_{i,t} . b_T. An untied
input embedding (weight [V, H]) is hooked as well: its per-sample gradient puts delta_{i,t} in row id_{i,t},
so r_i = sum_t delta_{i,t} . G_T[id_{i,t}], with G_T kept as the rows of the target's token ids. ``exact``
picks, per layer, the cheaper of matrix and ghost, ``auto`` the cheapest of the three. The target pass is a
backward of the target loss in which each layer keeps only its form (the factors, G_T, or the r x r sketch)
and no weight gradient. When the last layer of a group has arrived in the backward, the group's
scores are summed, reduced over processes (every process then selects the same samples), a subset is
chosen, and the selected weight gradient sum_{i in S} delta_i^T x_i is formed on the selected rows only and
scaled by W / W_S (total over selected weights, e.g. token counts), so it equals a pass on S alone.
Layer-wise groups therefore hold nothing beyond the one layer being processed; a global group
("one pass", Alg. 4.2) keeps every layer's delta until the first layer arrives; ``two_pass`` (GREATS,
Alg. 4.3) scores in one backward and runs a second forward/backward on the subset alone.

Weights. Sample i has weight w_i (its share of the loss normaliser: scored tokens under a global token
mean, 1 under a per-sequence mean) and its batch gradient is (w_i / W) gbar_i, gbar_i being the gradient of
sample i alone. The selection works on s_i = r_i / w_i (proportional to <gbar_i, g_T>), so the default
``topk`` rule is exactly ``theory.projection.lmo`` over ``SubsetAverages(Gbar, k, weights=w)`` (its
Dinkelbach iteration when lengths differ); ``released`` is the released code's top-k of the raw r_i.

Under DDP the caller runs the backward without DDP's own gradient sync (``no_sync``); this module sums
scores and weights over processes inside the backward and sums the finished gradients once after it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import time
import types
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scale.config import (  # noqa: E402  (the options live with the config schema, torch-free)
    GROUPINGS,
    DataRegConfig,
)
from theory import projection as tp


# ---------------------------------------------------------------------------------------------- statistics
def selection_stats(info: dict, n: int) -> dict[str, float]:
    """What a subset rule did in one call of ``DataReg.step`` (its ``info``; n samples in the batch), for the
    training log: the mean over groups of the scores' standard deviation and of the share of positive scores,
    the share of samples kept, and (with several groups) the mean Jaccard overlap of the kept sets over all
    pairs of groups: 1 when every group keeps the same samples, as one global group would."""
    scores, selected = info.get("scores", []), info.get("selected", [])
    if not scores:
        return {}
    out = {"score_std": float(np.mean([np.std(s) for s in scores])),
           "score_positive": float(np.mean([np.mean(s > 0) for s in scores])),
           "kept": float(np.mean([len(x) for x in selected])) / max(n, 1)}
    sets = [set(x) for x in selected]
    if len(sets) > 1:
        pairs = [(a, b) for i, a in enumerate(sets) for b in sets[i + 1:]]
        out["overlap"] = float(np.mean([len(a & b) / len(a | b) if a | b else 1.0 for a, b in pairs]))
    return out


# ---------------------------------------------------------------------------------------------- layers
def hookable_layers(model: nn.Module, embeddings: bool = True) -> dict[str, nn.Module]:
    """Trainable layers whose input has the row batch first: nn.Linear (the output head excluded) and, with
    ``embeddings``, plain nn.Embedding whose weight is not tied to the output head (a tied weight also
    takes the head's gradient, so it keeps the ordinary gradient)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head, "weight", None)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod is not head and mod.weight.requires_grad:
            out[name] = mod
        elif (embeddings and type(mod) is nn.Embedding and mod.weight.requires_grad and mod.weight is not head_w
              and mod.max_norm is None and not mod.scale_grad_by_freq and not mod.sparse):
            out[name] = mod
    return out


def _block_key(name: str, level: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'model.layers.3' (block) or 'model.layers.3.mlp' (sublayer)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if re.fullmatch(r"\d+", p):
            return ".".join(parts[:i + 1] if level == "block" else parts[:i + 2])
    return name  # a layer outside any numbered block is its own group


def make_groups(names: list[str], grouping: str, custom: list | None = None) -> list[list[str]]:
    """Partition the hooked layer names. custom: each entry a pattern or list of fnmatch patterns; layers
    matched by no entry stay groups of their own; a pattern matching no layer is an error."""
    if not names:
        raise ValueError("model: no trainable nn.Linear layer to hook")
    if grouping == "layer":
        return [[n] for n in names]
    if grouping == "global":
        return [list(names)]
    if grouping in ("block", "sublayer"):
        keyed: dict[str, list[str]] = {}
        for n in names:
            keyed.setdefault(_block_key(n, grouping), []).append(n)
        return list(keyed.values())
    if grouping != "custom":
        raise ValueError(f"datareg.groups: expected one of {GROUPINGS}, got {grouping!r}")
    taken: dict[str, int] = {}
    groups = []
    for q, entry in enumerate(custom or []):
        pats = [entry] if isinstance(entry, str) else list(entry)
        members = []
        for pat in pats:
            hit = [n for n in names if fnmatch.fnmatchcase(n, pat) or n == pat]
            if not hit:
                raise ValueError(f"datareg.custom_groups: group {q} pattern {pat!r} matches no hooked layer")
            for n in hit:
                if n in taken and taken[n] != q:
                    raise ValueError(f"datareg.custom_groups: layer {n!r} is in groups {taken[n]} and {q}")
                if n not in members:
                    members.append(n)
                taken[n] = q
        groups.append(members)
    return groups + [[n] for n in names if n not in taken]


class _Embedding(torch.autograd.Function):
    """F.embedding whose backward hands (ids, delta) to the engine (delta zero at padding_idx, as nn.Embedding)."""

    @staticmethod
    def forward(ctx, ids, weight, padding_idx, engine, idx):
        ctx.save_for_backward(ids)
        ctx.engine, ctx.idx, ctx.pad = engine, idx, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, delta):
        (ids,) = ctx.saved_tensors
        if ctx.pad is not None:
            delta = delta.masked_fill((ids == ctx.pad)[..., None], 0)
        return None, ctx.engine._arrive(ctx.idx, ids, delta)[0], None, None, None


class _Linear(torch.autograd.Function):
    """y = x W^T + b; the backward returns grad_x as usual and hands (x, delta) to the engine, which returns
    the weight / bias gradients to use (None: the engine writes them itself, later)."""

    @staticmethod
    def forward(ctx, x, weight, bias, engine, idx):
        ctx.save_for_backward(x, weight)
        ctx.engine, ctx.idx, ctx.has_bias = engine, idx, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, delta):
        x, weight = ctx.saved_tensors
        gx = delta @ weight if ctx.needs_input_grad[0] else None
        gw, gb = ctx.engine._arrive(ctx.idx, x, delta)
        return gx, gw, (gb if ctx.has_bias else None), None, None


# ---------------------------------------------------------------------------------------------- engine
class DataReg:
    """Patches the hooked linears of ``model``; ``step`` fills ``.grad`` with the rule's update.

    Use the unwrapped model (patching is on the module instances, so a DDP wrapper sees it too). ``close``
    restores the original forwards. With merged target rows every un-hooked module with trainable
    parameters of its own runs the target rows on detached parameters, splitting its input's first
    dimension as rows; ``unsplit`` names modules left out of this, for a caller that applies them to other
    shapes (a head on flattened tokens) and keeps the target rows off their parameters itself.
    """

    def __init__(self, model: nn.Module, cfg: DataRegConfig, modules: dict[str, nn.Linear] | None = None,
                 unsplit: tuple[nn.Module, ...] = ()):
        self.cfg = cfg.validate()
        # embeddings are not hooked in the projection rule: their per-sample gradients would be V x H each
        self.modules = modules if modules is not None else hookable_layers(model, cfg.update_rule != "projection")
        self.names = list(self.modules)
        self.groups = make_groups(self.names, cfg.grouping, cfg.custom_groups)
        index = {n: i for i, n in enumerate(self.names)}
        self.group_of = {}
        self.group_layers = []
        for q, g in enumerate(self.groups):
            self.group_layers.append([index[n] for n in g])
            for n in g:
                self.group_of[index[n]] = q
        self.layers = [self.modules[n] for n in self.names]
        self.emb = [isinstance(m, nn.Embedding) for m in self.layers]
        # modules with trainable parameters of their own that are not hooked (norms, embeddings, a tied head):
        # with merged target rows they run the target rows on detached parameters (see ``_split_forward``)
        skip = {id(m) for m in self.layers} | {id(m) for m in unsplit}
        self.others = [m for m in model.modules() if id(m) not in skip
                       and any(p.requires_grad for p in m.parameters(recurse=False))]
        self.merged = 0  # target rows appended to the general rows in the current step (0: a separate pass)
        self.all_params = [p for p in model.parameters() if p.requires_grad]
        self.mode = "off"
        self.step_count = 0
        self._hooked = [p for m in self.layers for p in (m.weight, _bias(m)) if p is not None]
        self._sketch: dict = {}
        self.tc = None  # per layer: the target in its scoring form (set by each target capture)
        self.info: dict = {}
        self.attach()

    def attach(self):
        """Patch the hooked layers' forwards (done by the constructor; again after ``close``)."""
        patches = [(m, _patched_forward(self, i)) for i, m in enumerate(self.layers)]
        patches += [(m, _split_forward(self, m.forward)) for m in self.others]
        if any(hasattr(m, "_datareg_forward") for m, _ in patches):
            raise ValueError("model: already patched by another DataReg engine (close it first)")
        for m, new in patches:
            m._datareg_forward = m.forward
            m.forward = types.MethodType(new, m)

    def close(self):
        for m in self.layers + self.others:
            if hasattr(m, "_datareg_forward"):
                m.forward = m._datareg_forward
                del m._datareg_forward

    # ------------------------------------------------------------------ distributed helpers
    @staticmethod
    def _world() -> int:
        d = torch.distributed
        return d.get_world_size() if d.is_available() and d.is_initialized() else 1

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if self._world() > 1:
            torch.distributed.all_reduce(t)
        return t

    def _layout(self, n_local: int, w_local: torch.Tensor):
        """Global sample offsets and weights: (offset of this process, N, w_all [N] float64 cpu)."""
        P = self._world()
        if P == 1:
            return 0, n_local, w_local.double().cpu()
        rank = torch.distributed.get_rank()
        dev = w_local.device
        counts = self._sum(torch.zeros(P, dtype=torch.float64, device=dev).index_fill_(0, torch.tensor(
            [rank], device=dev), float(n_local))).long().tolist()
        off, N = sum(counts[:rank]), sum(counts)
        w = torch.zeros(N, dtype=torch.float64, device=dev)
        w[off:off + n_local] = w_local.double()
        return off, N, self._sum(w).cpu()

    # ------------------------------------------------------------------ the step
    def step(self, general_loss: Callable, weights: torch.Tensor, target_loss: Callable | None = None,
             sample_of_row: torch.Tensor | None = None, no_sync: Callable | None = None,
             new_target: bool = True, sync: bool = True, merged: int = 0) -> dict:
        """Add the rule's update to ``.grad`` of every trainable parameter (summed over processes).

        general_loss(rows): the loss of this process's general rows (all when rows is None, else the given
        local row indices), normalised by the counts of the WHOLE global batch (its share of the global
        loss). weights [n_local]: each local sample's weight w_i. target_loss(): the loss of the target
        set (the same on every process); the string "batch" takes the batch's own gradient as the target.
        sample_of_row [n_rows]: the local sample of each row (default: row i is sample i, e.g. DPO pairs
        map two rows to one sample). no_sync(): a context that turns off DDP's gradient sync.

        Gradient accumulation: call once per micro-batch; each micro-batch is its own selection batch (k of
        its samples), and its update, normalised by the whole batch, adds to ``.grad``. new_target=False
        reuses the target captured by the previous call (target_only: adds no target gradient again), so the
        target is computed once per optimizer step; sync=False leaves the cross-process sum to a later call.

        Merged target batch (docs/drpt.md section 1.5): merged=m > 0 and target_loss=None; general_loss(None) then
        runs ONE forward over this process's general rows followed by the m target rows and returns the general loss
        plus the target loss (each with its own normaliser). Rows do not interact, so each hooked layer reads the
        target's factors off the last m rows of the same backward; un-hooked modules (norms, embeddings) run the
        target rows on detached parameters, so they keep the general rows' gradient only.
        """
        cfg = self.cfg
        ctx = no_sync or contextlib.nullcontext
        weights = torch.as_tensor(weights)
        if weights.ndim != 1 or (weights <= 0).any():
            raise ValueError("weights: expected a 1-D tensor of positive per-sample weights")
        n_local = weights.shape[0]
        rows = sample_of_row if sample_of_row is not None else torch.arange(n_local)
        self._rows = rows.to(torch.long)
        self._rows_identity = bool(torch.equal(self._rows, torch.arange(n_local)))
        self._n_local = n_local
        self.off, self.N, self.w_all = self._layout(n_local, weights)
        self.W = float(self.w_all.sum())
        self.info = {}
        if merged and (target_loss is not None or cfg.update_rule in ("full", "target_only")
                       or cfg.subset_mode == "two_pass"):
            raise ValueError("merged: target rows merged into the general batch need a one-pass subset or "
                             "projection rule and target_loss=None")
        self.merged = merged
        try:
            self._run(general_loss, target_loss, ctx, new_target)
        finally:
            self.merged = 0
        if sync:
            self._reduce_grads()
        self.step_count += 1
        return self.info

    def _run(self, general_loss: Callable, target_loss, ctx, new_target: bool):
        cfg = self.cfg
        if cfg.update_rule == "full":
            with ctx():
                general_loss(None).backward()
        elif cfg.update_rule == "target_only":
            if target_loss is None or target_loss == "batch":
                raise ValueError("target_loss: target_only needs a target set")
            if new_target:
                with ctx():  # identical on every process: divided by P before the sum over processes
                    (target_loss() / self._world()).backward()
        else:
            if cfg.selection != "negative_filtering":
                self.k = cfg.k_for(self.N)
            self._batch_target = target_loss == "batch"
            with ctx():
                if not self._batch_target and new_target and not self.merged:
                    if target_loss is None:
                        raise ValueError("target_loss: the subset and projection rules need a target set "
                                         "(or target_loss='batch')")
                    t0 = time.perf_counter()
                    self._capture_target(target_loss)
                    self.info["target_seconds"] = time.perf_counter() - t0
                self._start()
                if cfg.subset_mode == "two_pass":
                    self._two_pass(general_loss)
                else:
                    self.mode = "project" if cfg.update_rule == "projection" else "select"
                    loss = general_loss(None)
                    try:
                        loss.backward()
                    finally:
                        self.mode = "off"
                    self._check_complete()
            self.info["scoring"] = {m: self.scoring.count(m) for m in sorted(set(self.scoring))}

    def _capture_target(self, target_loss: Callable):
        """A backward of the target loss in which each hooked layer keeps only its scoring form of the target
        (``_set_target``) and accumulates no gradient; un-hooked parameters are not differentiated."""
        self._reset_targets()
        self.mode = "target"
        try:
            target_loss().backward(inputs=self._hooked)
        finally:
            self.mode = "off"
        missing = [self.names[i] for i, t in enumerate(self.tc) if t is None]
        if missing:
            raise ValueError(f"target_loss: hooked layers {missing[:3]} got no target gradient (are they used in "
                             "the forward?)")

    def _reset_targets(self):
        L = len(self.layers)
        self.tc, self.tb, self.scoring = [None] * L, [None] * L, [None] * L

    def _set_target(self, i: int, xf: torch.Tensor, df: torch.Tensor, summed: bool):
        """Layer i's target in the form its scoring uses, from the target factors xf [V, I], df [V, O]:
        ghost -> the factors themselves; matrix -> G_T = df^T xf [O, I]; sketched -> (df P_O)^T (xf P_I).
        summed: the factors are this process's share of a target summed over processes (the batch target),
        so only the matrix and sketched forms (linear in G_T) are possible, reduced here."""
        if self.emb[i]:
            self._set_embedding_target(i, xf, df, summed)
            return
        O, I = df.shape[1], xf.shape[1]
        method = self._method(O, I, None if summed else xf.shape[0])
        if method == "ghost":
            t = (xf.detach(), df.detach())
        elif method == "matrix":
            t = df.T @ xf
        else:
            PI, PO = self._projections(i, I, O, xf)
            t = (df if PO is None else df @ PO).T @ (xf if PI is None else xf @ PI)
        gb = df.sum(0) if _bias(self.layers[i]) is not None else None
        if summed:
            t, gb = self._sum(t), (None if gb is None else self._sum(gb))
        self.tc[i], self.tb[i], self.scoring[i] = t, gb, method

    def _set_embedding_target(self, i: int, ids: torch.Tensor, df: torch.Tensor, summed: bool):
        """An embedding's target gradient has rows only at the target's token ids: kept as those rows and a
        map id -> row (-1: absent); the batch target (summed over processes) keeps all V rows."""
        V = self.layers[i].num_embeddings
        if summed:
            rows = self._sum(df.new_zeros(V, df.shape[1]).index_add_(0, ids, df))
            pos = torch.arange(V, device=ids.device)
        else:
            u, inv = torch.unique(ids, return_inverse=True)
            rows = df.new_zeros(len(u), df.shape[1]).index_add_(0, inv, df)
            pos = torch.full((V,), -1, dtype=torch.long, device=ids.device)
            pos[u] = torch.arange(len(u), device=ids.device)
        self.tc[i], self.tb[i], self.scoring[i] = (pos, rows), None, "embedding"

    def _method(self, O: int, I: int, V: int | None) -> str:
        """The cheapest allowed scoring form by FLOPs per general token (docs/drpt.md section 1.5): ghost
        V*(I+O) (V target tokens), matrix O*I, sketched I*r + O*r + r*r (a side <= r uses the identity). ghost
        and matrix are exact; the projection rule needs the explicit G_T (matrix)."""
        if self.cfg.update_rule == "projection":
            return "matrix"
        r = self.cfg.sketch_rank
        rI, rO = min(r, I), min(r, O)
        cost = {"matrix": O * I, "sketched": (I * rI if I > r else 0) + (O * rO if O > r else 0) + rI * rO}
        if V is not None:
            cost["ghost"] = V * (I + O)
        allowed = [m for m in {"exact": ("ghost", "matrix"), "auto": tuple(cost)}.get(
            self.cfg.scoring, (self.cfg.scoring,)) if m in cost]
        if not allowed:
            raise ValueError("datareg.scoring: ghost needs the target's own factors; the batch target is a sum "
                             "over processes (use exact, matrix, sketched or auto)")
        return min(allowed, key=cost.get)

    def _projections(self, i: int, I: int, O: int, like: torch.Tensor):
        """Layer i's Gaussian sketches (P_I, P_O; None: the identity), drawn in float64 from (seed, i) and kept
        only in the dtype and device of use (another would draw the same values again)."""
        key = (i, like.dtype, like.device)
        if key not in self._sketch:
            r = self.cfg.sketch_rank
            g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + i)

            def draw(n: int):
                if n <= r:
                    return None
                P = torch.randn(n, r, generator=g, dtype=torch.float64) / math.sqrt(r)
                return P.to(dtype=like.dtype, device=like.device)
            self._sketch[key] = (draw(I), draw(O))
        return self._sketch[key]

    def _start(self):
        self.arrived = [0] * len(self.groups)
        self.buffer: list[dict] = [{} for _ in self.groups]
        self.scores = [torch.zeros(self._n_local, dtype=torch.float64) for _ in self.groups]
        self.selected: list = [None] * len(self.groups)
        if self._batch_target or self.merged:
            self._reset_targets()
        elif self.tc is None:
            raise ValueError("new_target: no target was captured before (the first call needs new_target=True)")

    # ------------------------------------------------------------------ inside the backward
    def _arrive(self, i: int, x: torch.Tensor, delta: torch.Tensor):
        def flat(t):  # a layer input, tokens first: [tokens, I] (an embedding's ids: [tokens])
            return t.reshape(-1) if self.emb[i] else t.reshape(-1, t.shape[-1])

        df = delta.reshape(-1, delta.shape[-1])
        if self.mode == "off":  # a graph recorded by the engine, differentiated outside its step: ordinary
            return self._weight_grad(i, flat(x), df, 1.0), df.sum(0)
        if self.mode == "target":
            self._set_target(i, flat(x), df, summed=False)
            return None, None
        B, n = x.shape[0], self._rows.shape[0]
        if B != n + self.merged or x.dim() < (1 if self.emb[i] else 2):
            raise ValueError(f"layer {self.names[i]!r}: input of shape {tuple(x.shape)} does not have the "
                             f"{n + self.merged} rows of the batch first")
        x3 = x.reshape(B, -1) if self.emb[i] else x.reshape(B, -1, x.shape[-1])
        d3 = delta.reshape(B, -1, delta.shape[-1])
        if self.merged:  # the last rows are the target's: copied, so the batch's activations are not kept
            self._set_target(i, flat(x3[n:]).clone(), d3[n:].reshape(-1, d3.shape[-1]), summed=False)
            x3, d3 = x3[:n], d3[:n]
        q = self.group_of[i]
        if self._batch_target:  # the batch's own (global) gradient of this layer
            self._set_target(i, flat(x3), d3.reshape(-1, d3.shape[-1]), summed=True)
        if self.mode == "project":
            self.buffer[q][i] = self._per_sample(i, x3, d3)
        else:
            self.scores[q] += self._layer_scores(i, x3, d3)
            if self.mode == "select":
                self.buffer[q][i] = (x3, d3)
        self.arrived[q] += 1
        if self.arrived[q] == len(self.group_layers[q]):
            self._finish_group(q)
        return None, None

    def _layer_scores(self, i, x3, d3) -> torch.Tensor:
        """Raw per-sample scores r_i = <delta_i^T x_i, G_T> (+ bias term), float64, one per local sample."""
        dt = torch.promote_types(d3.dtype, torch.float32)
        d3 = d3.to(dt)
        gb, method, t = self.tb[i], self.scoring[i], self.tc[i]
        per_row = (d3.sum(1) @ gb.to(dt)) if gb is not None else 0.0  # exact in every form: O flops per token
        if method == "embedding":  # sum_t delta_t . G_T[id_t], over the ids the target has
            p = t[0][x3]
            per_row = (d3 * (t[1].to(dt)[p.clamp(min=0)] * (p >= 0)[..., None])).sum((1, 2))
        elif method == "ghost":  # sum_{t,v} <x_t, x_v> <delta_t, delta_v>
            x3 = x3.to(dt)
            xt, dtt = (f.to(dt) for f in t)
            per_row = per_row + ((x3 @ xt.T) * (d3 @ dtt.T)).sum((1, 2))
        else:
            x3 = x3.to(dt)
            if method == "sketched":
                PI, PO = self._projections(i, x3.shape[-1], d3.shape[-1], x3)
                x3 = x3 if PI is None else x3 @ PI
                d3 = d3 if PO is None else d3 @ PO
            t = t.to(dt)
            if t.shape[0] <= t.shape[1]:  # contract through the smaller side of the target matrix
                per_row = per_row + (d3 * (x3 @ t.T)).sum((1, 2))
            else:
                per_row = per_row + ((d3 @ t) * x3).sum((1, 2))
        per_row = per_row.double().cpu()
        if self._rows_identity:  # row i is sample i: no scatter needed
            return per_row
        return torch.zeros(self._n_local, dtype=torch.float64).index_add_(0, self._rows, per_row)

    def _per_sample(self, i, x3, d3) -> torch.Tensor:
        """[n_local, d_layer] per-sample gradients (weight then bias), the projection rule only."""
        g = torch.einsum("bto,bti->boi", d3, x3).reshape(x3.shape[0], -1)
        if _bias(self.layers[i]) is not None:
            g = torch.cat([g, d3.sum(1)], 1)
        g = g.double().cpu()
        return torch.zeros(self._n_local, g.shape[1], dtype=torch.float64).index_add_(0, self._rows, g)

    # ------------------------------------------------------------------ a group is complete
    def _finish_group(self, q: int):
        if self.mode == "project":
            self._project_group(q)
            return
        r = torch.zeros(self.N, dtype=torch.float64)
        r[self.off:self.off + self._n_local] = self.scores[q]
        r = self._sum(r.to(self._device())).cpu() if self._world() > 1 else r
        sel = self._choose(r.numpy(), q)
        self.selected[q] = sel
        self.info.setdefault("selected", []).append(sel.tolist())
        self.info.setdefault("scores", []).append(r.numpy() / self.w_all.numpy())   # s_i, as _choose ranks them
        if self.mode != "select":
            return
        keep = torch.zeros(self.N, dtype=torch.bool)
        keep[torch.as_tensor(sel, dtype=torch.long)] = True
        rows = keep[self.off:self.off + self._n_local][self._rows].nonzero().squeeze(1)
        W_S = float(self.w_all[torch.as_tensor(sel, dtype=torch.long)].sum()) if len(sel) else 0.0
        c = self.W / W_S if W_S > 0 else 0.0
        for i in self.group_layers[q]:
            x3, d3 = self.buffer[q].pop(i)
            m = self.layers[i]
            if len(rows) and c:
                xs, ds = (t.index_select(0, rows.to(t.device)) for t in (x3, d3))
                ds = ds.reshape(-1, ds.shape[-1])
                gw = self._weight_grad(i, xs.reshape(-1) if self.emb[i] else xs.reshape(-1, xs.shape[-1]), ds, c)
                gb = ds.sum(0).mul_(c)
            else:
                gw, gb = torch.zeros_like(m.weight), torch.zeros(d3.shape[-1], dtype=d3.dtype, device=d3.device)
            _accumulate(m.weight, gw)
            if _bias(m) is not None:
                _accumulate(m.bias, gb)

    def _weight_grad(self, i: int, xf: torch.Tensor, df: torch.Tensor, c: float) -> torch.Tensor:
        """c * (the weight gradient of tokens xf [tokens, I] (ids for an embedding) with output gradients df)."""
        if self.emb[i]:
            return df.new_zeros(self.layers[i].weight.shape).index_add_(0, xf, df, alpha=c)
        # the rescaling inside the GEMM (beta=0 ignores the uninitialised input): no extra pass
        return torch.addmm(xf.new_empty(df.shape[1], xf.shape[1]), df.T, xf, beta=0, alpha=c)

    def _device(self):
        return self.layers[0].weight.device

    def _choose(self, r: np.ndarray, q: int) -> np.ndarray:
        """Sorted global sample indices kept in group q, from the raw scores r [N] (equal on all processes)."""
        cfg, w = self.cfg, self.w_all.numpy()
        s = r / w  # proportional to <gbar_i, g_T>: the scores of SubsetAverages(Gbar, k, w)
        if cfg.selection == "topk":
            return tp.SubsetAverages(s[:, None], self.k, weights=w).select(np.ones(1))
        if cfg.selection == "released":
            return np.sort(np.argsort(-r, kind="stable")[: self.k])
        if cfg.selection == "negative_filtering":
            return np.where(tp.negative_filtering(np.ones(1), s[:, None], cfg.filter_frac, weights=w)[1])[0]
        rng = np.random.default_rng([cfg.seed, self.step_count, q])
        return np.sort(rng.choice(self.N, self.k, replace=False))

    def _project_group(self, q: int):
        """Projection rule: materialised per-sample gradients of the group, gathered, projected with theory."""
        layers = self.group_layers[q]
        G = torch.cat([self.buffer[q].pop(i) for i in layers], 1)
        G = G * (self.W / self.w_all[self.off:self.off + self._n_local])[:, None]  # raw -> gbar_i
        full = torch.zeros(self.N, G.shape[1], dtype=torch.float64)
        full[self.off:self.off + self._n_local] = G
        full = self._sum(full.to(self._device())).cpu() if self._world() > 1 else full
        g = torch.cat([torch.cat([self.tc[i].reshape(-1), self.tb[i] if self.tb[i] is not None else
                                  self.tc[i].new_zeros(0)]).double().cpu() for i in layers])
        z = torch.as_tensor(tp.project(g.numpy(), self._set(full.numpy())))
        self.info.setdefault("projected_norm", []).append(float(z.norm()))
        z = z / self._world()  # the gradients are summed over processes afterwards
        o = 0
        for i in layers:
            for p in (self.layers[i].weight, _bias(self.layers[i])):
                if p is not None:
                    _accumulate(p, z[o:o + p.numel()].view_as(p).to(p.dtype).to(p.device))
                    o += p.numel()

    def _set(self, G: np.ndarray) -> tp.FeasibleSet:
        w, name = self.w_all.numpy(), self.cfg.projection_set
        if name == "hull":
            return tp.Hull(G)
        if name == "cone":
            return tp.Cone(G)
        if name == "span":
            return tp.Span(G)
        if name == "gem":
            return tp.HalfSpaces(G)
        if name == "agem":
            return tp.HalfSpace(w @ G / w.sum())
        if name == "subset":
            return tp.SubsetAverages(G, self.cfg.k_for(self.N), weights=w)
        return tp.Point.general_mean(G, w)

    # ------------------------------------------------------------------ passes and reductions
    def _two_pass(self, general_loss: Callable):
        """GREATS: a scoring backward (no weight gradients), then a forward/backward on the subset alone."""
        self.mode = "score"
        try:
            general_loss(None).backward(inputs=self._hooked)
        finally:
            self.mode = "off"
        self._check_complete()
        sel = self.selected[0]
        held = [p.grad for p in self.all_params]  # earlier micro-batches: kept out of the rescaling below
        for p in self.all_params:
            p.grad = None
        keep = torch.zeros(self.N, dtype=torch.bool)
        keep[torch.as_tensor(sel, dtype=torch.long)] = True
        rows = keep[self.off:self.off + self._n_local][self._rows].nonzero().squeeze(1)
        W_S = float(self.w_all[torch.as_tensor(sel, dtype=torch.long)].sum()) if len(sel) else 0.0
        if len(rows) and W_S > 0:
            general_loss(rows).backward()
            for p in self.all_params:
                if p.grad is not None:
                    p.grad.mul_(self.W / W_S)  # the loss was normalised by the whole batch's counts
        for p, g in zip(self.all_params, held):
            if g is not None:
                _accumulate(p, g)

    def _check_complete(self):
        for q, layers in enumerate(self.group_layers):
            if self.arrived[q] != len(layers):
                raise RuntimeError(f"datareg: group {q} ({self.groups[q][:3]}...) saw {self.arrived[q]} of "
                                   f"{len(layers)} layers in the backward; every hooked layer must be used once")

    def _reduce_grads(self):
        """Sum every trainable gradient over processes (one flat all-reduce)."""
        if self._world() == 1:
            return
        for p in self.all_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in self.all_params])
        torch.distributed.all_reduce(flat)
        o = 0
        for p in self.all_params:
            p.grad.copy_(flat[o:o + p.numel()].view_as(p))
            o += p.numel()


def _accumulate(p: torch.Tensor, g: torch.Tensor):
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g.contiguous()
    else:
        p.grad.add_(g)


def _bias(m: nn.Module):
    return getattr(m, "bias", None)


def _patched_forward(engine: DataReg, i: int):
    if engine.emb[i]:
        def forward(self, ids):
            if engine.mode == "off" or not torch.is_grad_enabled():
                return F.embedding(ids, self.weight, self.padding_idx)
            return _Embedding.apply(ids, self.weight, self.padding_idx, engine, i)
        return forward

    def forward(self, x):
        if engine.mode == "off" or not torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return _Linear.apply(x, self.weight, self.bias, engine, i)
    return forward


def _split_forward(engine: DataReg, original: Callable):
    """Forward of an un-hooked module with parameters: with merged target rows, the general rows use the
    parameters and the target rows detached copies (their gradient then reaches only the hooked layers)."""
    def forward(self, *args, **kwargs):
        m = engine.merged
        if not m or engine.mode == "off" or not torch.is_grad_enabled():
            return original(*args, **kwargs)
        if len(args) != 1 or kwargs or not torch.is_tensor(args[0]):
            raise ValueError(f"merged: un-hooked module {type(self).__name__} takes more than one tensor; use a "
                             "separate target pass (merged=0)")
        x, frozen = args[0], {k: p.detach() for k, p in self.named_parameters(recurse=False)}
        engine.merged = 0  # functional_call calls this forward again: run the original there
        try:
            tail = torch.func.functional_call(self, frozen, (x[x.shape[0] - m:],))
        finally:
            engine.merged = m
        return torch.cat([original(x[:x.shape[0] - m]), tail], 0)
    return forward


# ---------------------------------------------------------------------------------------------- trainer glue
