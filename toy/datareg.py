"""A toy world for data-regularised training (Dr. Post-Training): scarce target data, abundant general data.

Binary classification with a tanh MLP in float64 numpy, trained on the logistic loss. The *target* task
is a random teacher network: label 1 with probability sigmoid(f_target(x)), then flipped with
probability ``noise`` (label noise). Only ``n_target`` = 16 target examples are available for training,
as in the released SFT code; the *target loss* is the log-loss on ``n_eval`` *held-out* target examples,
the analogue of the paper's eval perplexity on held-out target examples (log perplexity, docs/drpt.md section 1.6).
The *general* pool is abundant and partly aligned: each general example has its label from the target
teacher with probability ``align`` and otherwise from another function, correlated ``other_corr`` with
the target teacher (a mix of it and an independent teacher; both have logit standard deviation
``signal``). Inputs are standard normal in ``d_in`` dimensions for both.

Each step takes ``m`` target examples cyclically from the scarce set (reshuffled each pass, like the
released code's loader) and a fresh general minibatch of ``n``; it forms the target-minibatch gradient
g ([d]) and the per-sample general gradients G ([n, d]) and hands both to an update rule, a function
(g, G) -> update built from ``theory.projection``. Target-only trains on g itself, so it can memorise
the 16 examples; the subset rules use g only to choose which general gradients to follow (docs/drpt.md section 1.4).

Parameters live in one flat vector in torch's ``nn.Linear`` order (each layer's weight [out, in]
row-major, then its bias), so a "layer" group is one layer's weight and bias, a "block" two consecutive
layers, and "global" every parameter (``groups``). Per-sample gradients are computed by hand (backprop
of a tanh MLP; checked against torch autograd in the tests), so a step takes well under a millisecond.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field

import numpy as np

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


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z))


def log_loss(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example logistic loss -log p(y | logit z) = log(1 + e^z) - y z, computed in log space."""
    return np.logaddexp(0.0, z) - y * z


class MLP:
    """A tanh MLP y = W_L tanh(... tanh(W_1 x + b_1) ...) + b_L with parameters in one flat vector.

    Initialisation is torch's ``nn.Linear`` default (uniform on +-1/sqrt(fan_in) for weight and bias)
    drawn from a numpy generator with ``seed``; ``gain`` scales it (teachers use a larger gain so that
    they are clearly non-linear).
    """

    def __init__(self, sizes, seed: int = 0, gain: float = 1.0):
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or min(sizes) < 1:
            raise ValueError(f"sizes: expected at least two positive layer widths, got {sizes}")
        self.sizes = sizes
        shapes = [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]
        self.layer_sizes = [o * i + o for o, i in shapes]
        self.theta = np.empty(sum(self.layer_sizes))
        rng = np.random.default_rng(seed)
        self.W, self.b = [], []
        off = 0
        for o, i in shapes:  # views into theta: updating theta updates the layers
            W = self.theta[off:off + o * i].reshape(o, i)
            b = self.theta[off + o * i:off + o * i + o]
            bound = gain / np.sqrt(i)
            W[:] = rng.uniform(-bound, bound, (o, i))
            b[:] = rng.uniform(-bound, bound, o)
            self.W.append(W)
            self.b.append(b)
            off += o * i + o

    @property
    def d(self) -> int:
        return self.theta.size

    def _forward(self, x):
        acts = [x]
        for layer, (W, b) in enumerate(zip(self.W, self.b)):
            z = acts[-1] @ W.T + b
            acts.append(z if layer == len(self.W) - 1 else np.tanh(z))
        return acts

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Outputs [N] for inputs [N, d_in]."""
        return self._forward(x)[-1][:, 0]

    def per_sample_grads(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[N, d]: the gradient of each example's logistic loss, in the flat parameter order."""
        acts = self._forward(x)
        delta = (_sigmoid(acts[-1][:, 0]) - y)[:, None]          # dloss/dlogit, [N, 1]
        parts = []
        for layer in range(len(self.W) - 1, -1, -1):
            a = acts[layer]
            parts.append(delta)                                                  # bias
            parts.append((delta[:, :, None] * a[:, None, :]).reshape(len(x), -1))  # weight, row-major
            if layer:
                delta = (delta @ self.W[layer]) * (1.0 - a**2)
        return np.concatenate(parts[::-1], axis=1)

    def grad(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """[d]: the gradient of the mean logistic loss (no per-sample materialisation)."""
        acts = self._forward(x)
        delta = (_sigmoid(acts[-1][:, 0]) - y)[:, None] / len(x)
        parts = []
        for layer in range(len(self.W) - 1, -1, -1):
            a = acts[layer]
            parts.append(delta.sum(0))
            parts.append((delta.T @ a).ravel())
            if layer:
                delta = (delta @ self.W[layer]) * (1.0 - a**2)
        return np.concatenate(parts[::-1])

    def to_torch(self):
        """The same network as a torch ``nn.Sequential`` (float64), for checks against autograd."""
        import torch

        mods = []
        for layer, (W, b) in enumerate(zip(self.W, self.b)):
            lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=torch.float64)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W))
                lin.bias.copy_(torch.from_numpy(b))
            mods.append(lin)
            if layer < len(self.W) - 1:
                mods.append(torch.nn.Tanh())
        return torch.nn.Sequential(*mods)


@dataclass
class World:
    """The data: teachers, the scarce target set, a held-out target set, and a sampler of general data."""

    d_in: int = 2
    n_target: int = 16
    n_eval: int = 1000
    noise: float = 0.1
    signal: float = 4.0
    other_corr: float = 0.3
    align: float = 0.25
    teacher_width: int = 32
    teacher_gain: float = 3.0
    seed: int = 0
    student_sizes: list = field(default_factory=lambda: [2, 32, 32, 32, 1])

    def __post_init__(self):
        if not 0.0 <= self.align <= 1.0:
            raise ValueError(f"align: expected a fraction in [0, 1], got {self.align}")
        if not -1.0 <= self.other_corr <= 1.0:
            raise ValueError(f"other_corr: expected a correlation in [-1, 1], got {self.other_corr}")
        if self.n_target < 1:
            raise ValueError(f"n_target: expected >= 1, got {self.n_target}")
        if not (0.0 <= self.noise < 0.5 and self.signal > 0):
            raise ValueError(f"noise, signal: expected noise in [0, 0.5) and signal > 0, got {self.noise}, "
                             f"{self.signal}")
        if self.student_sizes[0] != self.d_in or self.student_sizes[-1] != 1:
            raise ValueError(f"student_sizes: expected [d_in={self.d_in}, ..., 1], got {self.student_sizes}")
        self.target_teacher = MLP([self.d_in, self.teacher_width, 1], self.seed + 1000, self.teacher_gain)
        self.other_teacher = MLP([self.d_in, self.teacher_width, 1], self.seed + 2000, self.teacher_gain)
        rng = np.random.default_rng(self.seed)
        # centre and scale both teachers to standard deviation `signal`, so `noise` has a fixed meaning
        x = rng.standard_normal((8192, self.d_in))
        self._affine = {}
        for name, t in (("target", self.target_teacher), ("other", self.other_teacher)):
            f = t(x)
            self._affine[name] = (f.mean(), self.signal / f.std())
        self.x_target, self.y_target = self.sample_target(self.n_target, rng)
        self.x_eval, self.y_eval = self.sample_target(self.n_eval, rng)

    def f_target(self, x: np.ndarray) -> np.ndarray:
        mu, s = self._affine["target"]
        return s * (self.target_teacher(x) - mu)

    def f_other(self, x: np.ndarray) -> np.ndarray:
        """The other source: a function correlated ``other_corr`` with the target teacher."""
        mu, s = self._affine["other"]
        c = self.other_corr
        return c * self.f_target(x) + (1 - c**2) ** 0.5 * s * (self.other_teacher(x) - mu)

    def _labels(self, logits, rng):
        """Bernoulli(sigmoid(logit)) labels, each flipped with probability ``noise`` (label noise)."""
        y = rng.random(logits.shape) < _sigmoid(logits)
        return np.logical_xor(y, rng.random(logits.shape) < self.noise).astype(np.float64)

    def sample_target(self, m: int, rng: np.random.Generator):
        x = rng.standard_normal((m, self.d_in))
        return x, self._labels(self.f_target(x), rng)

    def sample_general(self, n: int, rng: np.random.Generator):
        x = rng.standard_normal((n, self.d_in))
        from_target = rng.random(n) < self.align
        return x, self._labels(np.where(from_target, self.f_target(x), self.f_other(x)), rng)

    def student(self, seed: int = 0) -> MLP:
        return MLP(self.student_sizes, seed)


def groups(model: MLP, granularity: str) -> list[np.ndarray]:
    """Coordinate groups of the flat parameter vector: 'global', 'block' (2 layers) or 'layer'.

    Each group is a contiguous range of indices (layers are stored one after the other)."""
    starts = np.cumsum([0] + model.layer_sizes)
    layers = [np.arange(starts[i], starts[i + 1]) for i in range(len(model.layer_sizes))]
    if granularity == "layer":
        return layers
    if granularity == "block":
        return [np.concatenate(layers[i:i + 2]) for i in range(0, len(layers), 2)]
    if granularity == "global":
        return [np.arange(starts[-1])]
    raise ValueError(f"granularity: expected 'global', 'block' or 'layer', got {granularity!r}")


def target_loss(model: MLP, world: World) -> float:
    """Held-out target log-loss (the 'target loss' of the figures: log of the target perplexity)."""
    return float(np.mean(log_loss(model(world.x_eval), world.y_eval)))


def teacher_loss(world: World) -> float:
    """Held-out log-loss of the true label probabilities (the floor no student can beat in expectation)."""
    q = world.noise + (1 - 2 * world.noise) * _sigmoid(world.f_target(world.x_eval))
    return float(np.mean(log_loss(np.log(q) - np.log1p(-q), world.y_eval)))


# ----------------------------------------------------------------------------- update rules (g, G) -> update


def rule(name: str, k: int = 4, granularity: str = "global", model: MLP | None = None):
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
        cols = [slice(q[0], q[-1] + 1) for q in grp]  # every group is a contiguous range: slice, don't copy
        return lambda g, G: lmo(g, Product([SubsetAverages(G[:, c], k) for c in cols], grp))
    if name == "filter":
        return lambda g, G: negative_filtering(g, G)[0]
    # Cone, half-spaces and span are unchanged by scaling each row by a positive number; rows scaled to
    # unit norm give the same set with a far better conditioned Gram matrix (logistic per-sample gradients
    # of confidently fitted examples are ~1e-6 of the others, and the NNLS on the raw Gram matrix stalls)
    sets = {"cone": lambda G: Cone(_unit_rows(G)), "gem": lambda G: HalfSpaces(_unit_rows(G)),
            "span": lambda G: Span(_unit_rows(G)), "hull": Hull, "agem": lambda G: HalfSpace(G.mean(0))}
    if name in sets:
        return lambda g, G: project(g, sets[name](G))
    raise ValueError(f"name: unknown rule {name!r}")


def _unit_rows(G: np.ndarray) -> np.ndarray:
    """The non-zero rows of G scaled to unit norm."""
    norms = np.linalg.norm(G, axis=1)
    keep = norms > 0
    return G[keep] / norms[keep, None]


class Adam:
    """Adam on a flat parameter vector (in place), as torch.optim.Adam with default betas and eps."""

    def __init__(self, theta: np.ndarray, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.theta, self.lr, self.betas, self.eps = theta, lr, betas, eps
        self.m = np.zeros_like(theta)
        self.v = np.zeros_like(theta)
        self.t = 0

    def step(self, grad: np.ndarray, lr: float | None = None) -> None:
        b1, b2 = self.betas
        self.t += 1
        self.m = b1 * self.m + (1 - b1) * grad
        self.v = b2 * self.v + (1 - b2) * grad**2
        mhat = self.m / (1 - b1**self.t)
        vhat = self.v / (1 - b2**self.t)
        self.theta -= (self.lr if lr is None else lr) * mhat / (np.sqrt(vhat) + self.eps)


@functools.cache
def _openblas():
    """(get, set) thread-count functions of the OpenBLAS that numpy loaded, or None where not found."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()})
        for path in paths:
            lib = ctypes.CDLL(path)
            for pre, suf in (("scipy_openblas", "64_"), ("scipy_openblas", ""), ("openblas", "64_"), ("openblas", "")):
                get, put = f"{pre}_get_num_threads{suf}", f"{pre}_set_num_threads{suf}"
                if hasattr(lib, get) and hasattr(lib, put):
                    return getattr(lib, get), getattr(lib, put)
    except OSError:
        pass
    return None


class _one_blas_thread:
    """Run on one BLAS thread: on these tiny matrices threads only add overhead (about 2.5x slower on a
    busy 2-core machine). A no-op where numpy's OpenBLAS cannot be found."""

    def __enter__(self):
        self.fns = _openblas()
        if self.fns:
            self.n = self.fns[0]()
            self.fns[1](1)

    def __exit__(self, *exc):
        if self.fns:
            self.fns[1](self.n)


def train(world: World, update_rule, steps: int = 2000, n: int = 8, m: int = 4, lr: float = 1e-3,
          eval_every: int = 40, seed: int = 0, lr_decay: bool = False) -> dict:
    """Train a fresh student (init ``seed``) with Adam on the updates of ``update_rule``.

    Each step: m target examples, cyclic over reshuffled copies of the scarce target set (the released SFT
    code's loader), give g; a fresh general minibatch of n gives G; the rule's update is Adam's gradient.
    The general stream and the target order depend only on ``seed`` (two separate streams), so rules
    compared at one seed see the same data, whatever m. ``lr_decay`` decays the rate linearly to 0 (the
    released code's schedule); the default is a constant rate. Returns the held-out target-loss curve
    {"steps", "loss"} (evaluated every ``eval_every`` steps and at step 0).
    """
    if steps < 1 or n < 1 or not 1 <= m <= world.n_target:
        raise ValueError(f"steps, n, m: expected steps >= 1, n >= 1, 1 <= m <= n_target={world.n_target}; "
                         f"got {steps}, {n}, {m}")
    with _one_blas_thread():
        return _train(world, update_rule, steps, n, m, lr, eval_every, seed, lr_decay)


def _train(world, update_rule, steps, n, m, lr, eval_every, seed, lr_decay):
    model = world.student(seed)
    opt = Adam(model.theta, lr)
    rng, rng_general = np.random.default_rng([seed, 7]), np.random.default_rng([seed, 8])  # separate streams:
    order, pos = rng.permutation(world.n_target), 0  # the general data do not depend on m
    steps_logged, losses = [0], [target_loss(model, world)]
    for step in range(1, steps + 1):
        idx = []
        for _ in range(m):
            if pos == len(order):
                order, pos = rng.permutation(world.n_target), 0
            idx.append(order[pos])
            pos += 1
        g = model.grad(world.x_target[idx], world.y_target[idx])
        xg, yg = world.sample_general(n, rng_general)
        G = model.per_sample_grads(xg, yg)
        opt.step(np.asarray(update_rule(g, G), dtype=np.float64),
                 lr * (1.0 - (step - 1) / steps) if lr_decay else None)
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
    with _one_blas_thread():
        return _spectrum_draws(world, rules, draws, n, m, warm_steps, seed)


def _spectrum_draws(world, rules, draws, n, m, warm_steps, seed):
    model = world.student(seed)
    rng = np.random.default_rng([seed, 11])
    opt = Adam(model.theta, 1e-3)
    for _ in range(warm_steps):
        xg, yg = world.sample_general(n, rng)
        opt.step(model.grad(xg, yg))
    truth = model.grad(world.x_eval, world.y_eval)
    built = {name: make(model) for name, make in rules.items()}
    out: dict[str, list] = {name: [] for name in rules}
    for _ in range(draws):
        xt, yt = world.sample_target(m, rng)
        g = model.grad(xt, yt)
        xg, yg = world.sample_general(n, rng)
        G = model.per_sample_grads(xg, yg)
        for name, f in built.items():
            out[name].append(np.asarray(f(g, G)))
    return {k: np.stack(v) for k, v in out.items()}, truth
