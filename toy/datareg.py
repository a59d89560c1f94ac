"""A toy world for data-regularised training (Dr. Post-Training): scarce target data, abundant general data.

Regression with a small tanh MLP (float64, torch). The *target* task is a random teacher network with
observation noise; only ``n_target`` (default 16) noisy target examples are available for training.
The *general* pool is abundant and partly aligned: each general example comes from the target teacher
with probability ``align`` and otherwise from another function, correlated ``other_corr`` with the
target teacher (a mix of it and an independent teacher, both scaled to standard deviation ``signal``).
Each training step draws a general minibatch of ``n`` examples and a target minibatch of ``m`` examples
(cyclic over the scarce set, as in the released SFT code), forms the per-sample general gradients
G ([n, d]) and the target gradient g, and hands both to an update rule: a function (g, G) -> update,
built from ``theory.projection``.

Parameter layout: the model is a stack of linear layers; a "layer" group is one layer's weight and
bias, a "block" is two consecutive layers, "global" is every parameter (``groups(...)``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from theory.projection import (
    Cone,
    HalfSpace,
    HalfSpaces,
    Hull,
    Product,
    Span,
    SubsetAverages,
    lmo,
    negative_filtering,
    project,
)

DT = torch.float64


def _mlp(sizes: list[int], seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(torch.nn.Linear(sizes[i], sizes[i + 1], dtype=DT))
        if i < len(sizes) - 2:
            mods.append(torch.nn.Tanh())
    return torch.nn.Sequential(*mods)


@dataclass
class World:
    """The data: teachers, the scarce target set, a held-out target set, and a sampler of general data."""

    d_in: int = 4
    n_target: int = 16
    noise: float = 0.5
    signal: float = 2.0
    other_corr: float = 0.7
    align: float = 0.5
    seed: int = 0
    student_sizes: list = field(default_factory=lambda: [4, 32, 32, 32, 1])

    def __post_init__(self):
        if not 0.0 <= self.align <= 1.0:
            raise ValueError(f"align: expected a fraction in [0, 1], got {self.align}")
        if not -1.0 <= self.other_corr <= 1.0:
            raise ValueError(f"other_corr: expected a correlation in [-1, 1], got {self.other_corr}")
        if self.n_target < 1:
            raise ValueError(f"n_target: expected >= 1, got {self.n_target}")
        self.target_teacher = _mlp([self.d_in, 16, 1], self.seed + 1000)
        self.other_teacher = _mlp([self.d_in, 16, 1], self.seed + 2000)
        self.rng = torch.Generator().manual_seed(self.seed)
        # scale both teachers to output standard deviation `signal`, so noise has a fixed meaning
        x = torch.randn(4096, self.d_in, generator=self.rng, dtype=DT)
        with torch.no_grad():
            self._scale = {id(t): self.signal / float(t(x).std()) for t in (self.target_teacher,
                                                                           self.other_teacher)}
        self.x_target, self.y_target = self.sample_target(self.n_target)
        self.x_eval, self.y_eval = self.sample_target(2000)

    @torch.no_grad()
    def _teacher(self, net, x):
        return self._scale[id(net)] * net(x).squeeze(-1)

    def sample_target(self, m: int):
        x = torch.randn(m, self.d_in, generator=self.rng, dtype=DT)
        return x, self._teacher(self.target_teacher, x) + self.noise * torch.randn(m, generator=self.rng,
                                                                                  dtype=DT)

    def sample_general(self, n: int):
        x = torch.randn(n, self.d_in, generator=self.rng, dtype=DT)
        from_target = torch.rand(n, generator=self.rng, dtype=DT) < self.align
        f_t = self._teacher(self.target_teacher, x)
        # the other source: a function correlated other_corr with the target teacher
        f_o = self.other_corr * f_t + (1 - self.other_corr**2) ** 0.5 * self._teacher(self.other_teacher, x)
        y = torch.where(from_target, f_t, f_o)
        return x, y + self.noise * torch.randn(n, generator=self.rng, dtype=DT)

    def student(self, seed: int = 0) -> torch.nn.Sequential:
        return _mlp(list(self.student_sizes), seed)


def groups(model: torch.nn.Module, granularity: str) -> list[np.ndarray]:
    """Coordinate groups of the flat parameter vector: 'global', 'block' (2 layers) or 'layer'."""
    sizes = [sum(p.numel() for p in m.parameters()) for m in model if isinstance(m, torch.nn.Linear)]
    starts = np.cumsum([0] + sizes)
    layers = [np.arange(starts[i], starts[i + 1]) for i in range(len(sizes))]
    if granularity == "layer":
        return layers
    if granularity == "block":
        return [np.concatenate(layers[i:i + 2]) for i in range(0, len(layers), 2)]
    if granularity == "global":
        return [np.arange(starts[-1])]
    raise ValueError(f"granularity: expected 'global', 'block' or 'layer', got {granularity!r}")


def per_sample_grads(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[n, d] gradients of the squared error of each example, flattened in parameter order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        return 0.5 * (functional_call(model, p, (xi[None],)).squeeze() - yi) ** 2

    gs = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([gs[k].reshape(x.shape[0], -1) for k in params], dim=1)


@torch.no_grad()
def target_loss(model: torch.nn.Module, world: World) -> float:
    """Held-out target mean squared error (the 'target loss' of the figures)."""
    return float(torch.mean((model(world.x_eval).squeeze(-1) - world.y_eval) ** 2))


# ----------------------------------------------------------------------------- update rules (g, G) -> update


def rule(name: str, k: int = 4, granularity: str = "global", model: torch.nn.Module | None = None):
    """An update rule by name. Subset rules need ``model`` for the coordinate groups.

    target_only (Whole), full (Point at the general mean), span, subset (lmo over a Product of SubsetAverages
    with the given granularity), filter (negative filtering), and the projections cone, hull, gem
    (HalfSpaces), agem (HalfSpace of the general mean).
    """
    if name == "target_only":
        return lambda g, G: g
    if name == "full":
        return lambda g, G: G.mean(0)
    if name == "subset":
        if model is None:
            raise ValueError("model: the subset rule needs the model for its coordinate groups")
        grp = groups(model, granularity)
        return lambda g, G: lmo(g, Product([SubsetAverages(G[:, q], k) for q in grp], grp))
    if name == "filter":
        return lambda g, G: negative_filtering(g, G)[0]
    sets = {"cone": Cone, "hull": Hull, "gem": HalfSpaces, "agem": lambda G: HalfSpace(G.mean(0))}
    if name in sets:
        return lambda g, G: project(g, sets[name](G))
    if name == "span":
        return lambda g, G: project(g, Span(G))
    raise ValueError(f"name: unknown rule {name!r}")


class _one_thread:
    """Per-sample gradients of a tiny model run fastest on one thread (threads only add overhead)."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def train(world: World, update_rule, steps: int = 1500, n: int = 8, m: int = 1, lr: float = 1e-3,
          eval_every: int = 25, seed: int = 0) -> dict:
    """Train a fresh student with Adam on the updates of ``update_rule``; returns the target-loss curve.

    The learning rate decays linearly to 0 over ``steps`` (the released SFT code's linear schedule), so
    the final loss is not dominated by step noise."""
    with _one_thread():
        return _train(world, update_rule, steps, n, m, lr, eval_every, seed)


def _train(world, update_rule, steps, n, m, lr, eval_every, seed):
    model = world.student(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / steps)
    rng = np.random.default_rng(seed)
    order = rng.permutation(world.n_target)
    pos = 0
    steps_logged, losses = [0], [target_loss(model, world)]
    params = list(model.parameters())
    for step in range(1, steps + 1):
        idx = []
        for _ in range(m):  # cyclic over a shuffled copy of the scarce target set
            if pos == len(order):
                order, pos = rng.permutation(world.n_target), 0
            idx.append(order[pos])
            pos += 1
        g = per_sample_grads(model, world.x_target[idx], world.y_target[idx]).mean(0).numpy()
        xg, yg = world.sample_general(n)
        G = per_sample_grads(model, xg, yg).numpy()
        u = torch.as_tensor(np.asarray(update_rule(g, G)), dtype=DT)
        off = 0
        for p in params:
            p.grad = u[off:off + p.numel()].view_as(p).clone()
            off += p.numel()
        opt.step()
        sched.step()
        if step % eval_every == 0:
            steps_logged.append(step)
            losses.append(target_loss(model, world))
    return {"steps": np.array(steps_logged), "loss": np.array(losses)}


def spectrum_draws(world: World, rules: dict, draws: int = 200, n: int = 8, m: int = 1,
                   warm_steps: int = 200, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Samples of every rule's update at one checkpoint, and the true target gradient.

    The checkpoint is a student after ``warm_steps`` of Full-Training. Each draw takes a fresh target
    minibatch of m examples from the target distribution and a fresh general minibatch of n; the true
    target gradient is the gradient of the held-out target loss. Rules are built with the model.
    """
    with _one_thread():
        return _spectrum_draws(world, rules, draws, n, m, warm_steps, seed)


def _spectrum_draws(world, rules, draws, n, m, warm_steps, seed):
    model = world.student(seed)
    if warm_steps:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(warm_steps):
            opt.zero_grad()
            xg, yg = world.sample_general(n)
            (0.5 * torch.mean((model(xg).squeeze(-1) - yg) ** 2)).backward()
            opt.step()
    truth = per_sample_grads(model, world.x_eval, world.y_eval).mean(0).numpy()
    built = {name: make(model) for name, make in rules.items()}
    out: dict[str, list] = {name: [] for name in rules}
    for _ in range(draws):
        xt, yt = world.sample_target(m)
        g = per_sample_grads(model, xt, yt).mean(0).numpy()
        xg, yg = world.sample_general(n)
        G = per_sample_grads(model, xg, yg).numpy()
        for name, f in built.items():
            out[name].append(np.asarray(f(g, G)))
    return {k: np.stack(v) for k, v in out.items()}, truth
