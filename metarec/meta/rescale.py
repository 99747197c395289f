"""Per-layer, similarity-based rescaling of the tasks' meta gradients.

docs/design.md §4 steps 4–6, Eq. (6)–(8) (paper §III-C, Eq. 6–8). For every parameter tensor p and task i:
u_i^p is the source task's own update direction, s_i^p = cos(g_i^p, u_i^p) (Eq. 6),
w^p = softmax_i(s_i^p / τ) over the tasks that touched p (Eq. 7), and the outer
step uses Σ_i w_i^p g_i^p (Eq. 8).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch

Direction = Literal["source_descent", "paper_literal"]


def descent_direction(theta: torch.Tensor, phi: torch.Tensor, direction: Direction) -> torch.Tensor:
    """u^p of docs/design.md Eq. (6): θ − φ (`source_descent`, docs/design.md §4 default) or φ − θ (`paper_literal`).

    θ − φ = α Σ ∇(L_src + L_vq) is the direction the source task descends along; the
    paper prints φ − θ, which would favour the least similar source.
    """
    if direction == "source_descent":
        return theta - phi
    if direction == "paper_literal":
        return phi - theta
    raise ValueError(f"unknown rescale direction {direction!r} (expected 'source_descent' or 'paper_literal')")


def _cosine_parts(g: torch.Tensor | None, u: torch.Tensor | None) -> torch.Tensor:
    """(g·u, ‖g‖, ‖u‖) as one float64 tensor of 3; a missing tensor counts as zero."""
    ref = g if g is not None else u
    if g is None or u is None:
        dot = ref.new_zeros((), dtype=torch.float64)
    else:
        dot = torch.dot(g.reshape(-1), u.reshape(-1)).to(torch.float64)
    norms = [ref.new_zeros((), dtype=torch.float64) if t is None else torch.linalg.vector_norm(t).to(torch.float64) for t in (g, u)]
    return torch.stack([dot, *norms])


def _cosine(dot: float, g_norm: float, u_norm: float) -> float:
    if g_norm == 0.0 or u_norm == 0.0:
        return 0.0
    return max(-1.0, min(1.0, dot / (g_norm * u_norm)))


def tensor_similarities(
    grads: dict[str, torch.Tensor | None], directions: dict[str, torch.Tensor | None]
) -> tuple[dict[str, float], set[str], dict[str, tuple[float, float]]]:
    """Eq. 6 for every tensor of one task at once (one device→host transfer).

    A missing or None entry counts as zero. Returns (sims, touched, norms): sims[p] =
    cos(g^p, u^p) for the touched tensors, touched = tensors where g^p or u^p is
    nonzero, norms[p] = (‖g^p‖, ‖u^p‖) for every tensor (NaN/inf reveal non-finite
    values).
    """
    names = [n for n in grads.keys() | directions.keys() if grads.get(n) is not None or directions.get(n) is not None]
    names.sort()
    if not names:
        return {}, set(), {}
    parts = torch.stack([_cosine_parts(grads.get(n), directions.get(n)) for n in names]).cpu().tolist()
    sims, touched, norms = {}, set(), {}
    for name, (dot, g_norm, u_norm) in zip(names, parts):
        norms[name] = (g_norm, u_norm)
        if g_norm != 0.0 or u_norm != 0.0:
            touched.add(name)
            sims[name] = _cosine(dot, g_norm, u_norm)
    return sims, touched, norms


def softmax_weights(sims: dict[int, float], tau: float) -> dict[int, float]:
    """w_i = exp(s_i/τ) / Σ_j exp(s_j/τ) over the tasks in `sims` (Eq. 7).

    `sims` holds one tensor's similarities, keyed by task, for the tasks that touched
    the tensor only; empty in, empty out. The maximum is subtracted before exp, so
    τ → 0 gives the most similar task(s) all the weight and τ → ∞ the uniform mean
    without overflow.
    """
    if tau <= 0:
        raise ValueError(f"softmax temperature must be positive, got {tau}")
    if not sims:
        return {}
    top = max(sims.values())
    scaled = {i: math.exp((s - top) / tau) for i, s in sims.items()}
    total = sum(scaled.values())
    return {i: v / total for i, v in scaled.items()}


def standardize(sims: list[dict[str, float]], touched: list[set[str]], eps: float = 1e-12) -> list[dict[str, float]]:
    """Per tensor p, the tasks' similarities as z-scores over the tasks that touched p.

    For `rescale.signal` target_gain and source_fit (docs/design.md §4, not in the paper): a
    task's signal is in loss units, whose scale changes along training and between datasets, so
    Eq. (7)'s τ could not be set once. Centred on the mean and divided by the standard
    deviation over the iteration's tasks (population; `eps` keeps a tie at 0), it is in
    units of the iteration's spread, so τ = 0.1 means the same at step 10 and step 10,000.
    A tensor only one task touched gets 0 (its weight is 1 whatever it is). Lists are
    aligned by task; the inputs are not modified.
    """
    out = [dict(s) for s in sims]
    for name in sorted(set().union(*touched)):
        tasks = [i for i, t in enumerate(touched) if name in t]
        values = [sims[i].get(name, 0.0) for i in tasks]
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        for i, v in zip(tasks, values):
            out[i][name] = (v - mean) / sd if sd > eps else 0.0
    return out


SimilarityState = dict[str, dict[str, float]]  # {source: {tensor: smoothed relative similarity}}


def smooth_similarities(
    sources: list[str],
    sims: list[dict[str, float]],
    touched: list[set[str]],
    state: SimilarityState,
    beta: float,
) -> tuple[list[dict[str, float]], SimilarityState]:
    """Each source's moving average of its *relative* similarity, used in place of s_i^p in Eq. (7).

    Not in the paper (docs/design.md §4, `rescale.smoothing`). One iteration's cosines are
    noisy and share a large common part (every task is measured at the same θ), so the
    per-iteration softmax of Eq. (7) cannot tell a source that is consistently less aligned
    with the target from noise. Per tensor p touched by at least two tasks, the tasks'
    similarities are centred on their mean (the softmax of Eq. (7) is shift-invariant, so
    only these differences ever mattered); each source's mean centred value x_s^p this
    iteration updates m_s^p ← β m_s^p + (1 − β) x_s^p (the first value as is), and every
    task of source s gets s_i^p = m_s^p. Tensors touched by one task keep their own
    similarity (its weight is 1 whatever it is). `beta = 0` returns `sims` unchanged.

    Lists are aligned by task (task i is position i); `state` is not modified. Returns
    (the similarities to weight with, the new state).
    """
    if beta == 0:
        return sims, state
    new_state = {s: dict(v) for s, v in state.items()}
    out = [dict(s) for s in sims]
    for name in sorted(set().union(*touched)):
        tasks = [i for i, t in enumerate(touched) if name in t]
        if len(tasks) < 2:
            continue
        mean = sum(sims[i].get(name, 0.0) for i in tasks) / len(tasks)
        centred: dict[str, list[float]] = {}
        for i in tasks:
            centred.setdefault(sources[i], []).append(sims[i].get(name, 0.0) - mean)
        for source, values in centred.items():
            x = sum(values) / len(values)
            old = new_state.setdefault(source, {}).get(name)
            new_state[source][name] = x if old is None else beta * old + (1 - beta) * x
        for i in tasks:
            out[i][name] = new_state[sources[i]][name]
    return out, new_state


def check_similarity_state(state: Any) -> SimilarityState:
    """`state` if it is a {source: {tensor: finite number}} mapping, else ValueError naming the bad entry."""
    if not isinstance(state, dict):
        raise ValueError(f"similarity state is a {type(state).__name__}, expected a mapping")
    for source, tensors in state.items():
        if not isinstance(tensors, dict):
            raise ValueError(f"similarity of {source!r} is a {type(tensors).__name__}, expected a mapping")
        for name, value in tensors.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"similarity of {source!r} on {name!r} is {value!r}, expected a finite number")
    return state


def combine(
    meta_grads: list[dict[str, torch.Tensor]],
    sims: list[dict[str, float]],
    touched: list[set[str]],
    tau: float,
    enabled: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[int, float]]]:
    """Combined outer gradient Σ_i w_i^p g_i^p per tensor p (Eq. 8).

    Lists are aligned by task; task i is position i. A task's weight for p is
    computed only among the tasks that touched p; `enabled=False` gives them equal
    weights (uniform mean, the w/o-rescale ablation). A task's meta gradient may omit
    a touched tensor whose gradient is zero. Tensors no task has a gradient for are
    absent from the result (the optimizer then leaves them alone). Returns
    (grad, weights) with weights[p] = {task position: w}. Sums run in task order, so
    the result does not depend on the order the tasks finished in.
    """
    if not (len(meta_grads) == len(sims) == len(touched)):
        raise ValueError("meta_grads, sims and touched must have one entry per task")
    grad: dict[str, torch.Tensor] = {}
    weights: dict[str, dict[int, float]] = {}
    for name in sorted(set().union(*touched)):
        tasks = [i for i, t in enumerate(touched) if name in t]
        if enabled:
            w = softmax_weights({i: sims[i].get(name, 0.0) for i in tasks}, tau)
        else:
            w = {i: 1.0 / len(tasks) for i in tasks}
        weights[name] = w
        total = None
        for i in tasks:
            g = meta_grads[i].get(name)
            if g is not None:
                total = g * w[i] if total is None else total + g * w[i]
        if total is not None:
            grad[name] = total
    return grad, weights
