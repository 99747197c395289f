"""The outer step of meta transfer (docs/design.md §4 steps 5–7, Eq. (8)–(9); paper Eq. 8).

Combines the tasks' meta gradients with per-tensor softmax weights, clips, checks and
steps the optimizer (`metarec.optimizer.clip_check_step`, shared with the other
methods), and (with `meta.source_params: persist_inner`) lets the
source-only tables keep what their inner loops learned.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch
from torch import nn

from metarec.config import Config
from metarec.meta.rescale import SimilarityState, combine, smooth_similarities, standardize
from metarec.meta.run_task import TaskResult, source_only_names
from metarec.optimizer import clip_check_step


def inner_changes(results: list[TaskResult], weights: dict[str, dict[int, float]], cfg: Config) -> dict[str, torch.Tensor]:
    """What the tensors keep of the inner loops after the outer step: {name: change to add}.

    Source-only tensors (`meta.source_params: persist_inner`) move by the mean, over the
    tasks of their source, of φ_i − θ. Shared tensors (`meta.persist_shared` = λ > 0)
    move by λ Σ_i w_i^p (φ_i^p − θ^p) with the rescaling weights w^p of the outer step,
    so the similarity weights also decide how much of each source's own step θ keeps.
    A linear sum over the tasks that carry a `source_delta`: given all results with
    their deltas it is the whole change; the collective runner sums the partial
    changes of its workers (metarec.ray.collective).
    """
    tasks_of: dict[str, int] = defaultdict(int)
    for r in results:
        tasks_of[r.source] += 1
    own_deltas: dict[str, list[torch.Tensor]] = defaultdict(list)
    changes: dict[str, torch.Tensor] = {}
    for pos, r in enumerate(results):
        own = set(source_only_names(r.source))
        for name, delta in r.source_delta.items():
            if name in own:
                own_deltas[name].append(delta)
            elif cfg.meta.persist_shared > 0 and pos in weights.get(name, {}):
                part = delta * (cfg.meta.persist_shared * weights[name][pos])
                changes[name] = part if name not in changes else changes[name] + part
    if cfg.meta.source_params == "persist_inner":
        for name, parts in own_deltas.items():
            count = tasks_of[name.split(".", 1)[1]]
            if len(parts) == count:  # every task's delta is here: their mean (as before the collective runner)
                changes[name] = parts[0] if count == 1 else torch.stack(parts).mean(0)
            else:  # a collective worker's share of the mean
                changes[name] = torch.stack(parts).sum(0) / count
    return changes


def source_gradient(results: list[TaskResult], weights: dict[str, dict[int, float]], cfg: Config) -> dict[str, torch.Tensor]:
    """μ Σ_i w_i^p (θ^p − φ_i^p) / α for the shared tensors (docs/design.md Eq. (8b)).

    Each task sends its source gradient (θ − φ_i) / α (`TaskResult.source_grad`, the sum
    of its inner-loop source gradients). Added to Eq. (8)'s G^p before the optimizer
    step, so, unlike `meta.persist_shared`'s direct move, it is scaled by the optimizer
    (AdamW) like the joint-training gradient, with the rescaling weights deciding how
    much each source contributes. μ = `meta.source_grad`; 0 = the paper's update. Only
    where task i also has a meta gradient for p, so the tensors with a gradient are the
    same as without it (and on the collective runner, which sums the workers' parts of
    this linear sum).
    """
    mu = cfg.meta.source_grad
    terms: dict[str, torch.Tensor] = {}
    if mu <= 0:
        return terms
    for pos, r in enumerate(results):
        for name, source_grad in r.source_grad.items():
            if name in r.meta_grad and pos in weights.get(name, {}):
                part = source_grad * (mu * weights[name][pos])
                terms[name] = part if name not in terms else terms[name] + part
    return terms


def _add_changes(params: dict[str, nn.Parameter], changes: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, delta in changes.items():
            params[name].add_(delta.to(device=params[name].device, dtype=params[name].dtype))


def task_weight(weights: dict[str, dict[int, float]], pos: int, touched: set[str]) -> float:
    """Mean softmax weight of task `pos` over the tensors it shares with another task.

    Tensors only this task touched (its source's own table) always weigh 1 and would
    hide the rescaling, so they count only when the task shares nothing (n = 1).
    """
    shared = [weights[p][pos] for p in sorted(touched) if len(weights[p]) > 1]
    own = shared or [weights[p][pos] for p in sorted(touched)]
    return sum(own) / len(own) if own else 0.0


def apply_meta_update(
    params: dict[str, nn.Parameter],
    optimizer: torch.optim.Optimizer,
    results: list[TaskResult],
    cfg: Config,
    iteration: int,
    reduce: Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] | None = None,
    similarity: SimilarityState | None = None,
) -> dict[str, Any]:
    """One outer update of the live parameters from the iteration's task results.

    .grad of p = Σ_i w_i^p g_i^p (rescale.enabled, τ = rescale.tau, the similarities
    standardized per iteration with `rescale.signal` other than cosine; else the uniform
    mean over the tasks that touched p), plus `source_gradient` with `meta.source_grad`; tensors without any meta gradient get
    .grad = None, so the optimizer leaves them alone. Then clip, finiteness check,
    optimizer.step(). Then `inner_changes` (source tables with
    `meta.source_params: persist_inner`, shared tensors with `meta.persist_shared`). Results are processed in task-index order, whatever order they came in.
    `reduce(grad, changes) -> (grad, changes)`: the collective runner's all-reduce, which
    turns each worker's partial sums (its own tasks' tensors) into the totals.
    `similarity`: the sources' smoothed similarities before this iteration
    (`rescale.smoothing` > 0, `metarec.meta.rescale.smooth_similarities`).

    Returns {"weights": {source: mean `task_weight` of its tasks}, "grad_norm",
    "source_loss", "vq_loss", "target_loss" (means over tasks), "task_seconds" (sum),
    "similarity" (the smoothed similarities after this iteration)}.
    """
    results = sorted(results, key=lambda r: r.index)
    if not results:
        raise ValueError(f"no task results for iteration {iteration}")
    sims = [r.sims for r in results]
    if cfg.rescale.signal != "cosine":
        sims = standardize(sims, [r.touched for r in results])
    sims, similarity = smooth_similarities(
        [r.source for r in results], sims, [r.touched for r in results], similarity or {}, cfg.rescale.smoothing,
    )
    grad, weights = combine(
        [r.meta_grad for r in results],
        sims,
        [r.touched for r in results],
        cfg.rescale.tau,
        cfg.rescale.enabled,
    )
    for name, term in source_gradient(results, weights, cfg).items():
        grad[name] = term if name not in grad else grad[name] + term
    changes = inner_changes(results, weights, cfg)
    if reduce is not None:
        grad, changes = reduce(grad, changes)
    unknown = sorted(grad.keys() - params.keys())
    if unknown:
        raise KeyError(f"meta gradients for tensors the model does not have: {unknown}")
    for name, p in params.items():
        g = grad.get(name)
        p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype)
    grad_norm = clip_check_step(params, optimizer, cfg.train.grad_clip, iteration, what="meta gradient")

    _add_changes(params, changes)

    by_source: dict[str, list[float]] = defaultdict(list)
    for pos, r in enumerate(results):
        by_source[r.source].append(task_weight(weights, pos, r.touched))
    n = len(results)
    return {
        "weights": {s: sum(ws) / len(ws) for s, ws in sorted(by_source.items())},
        "grad_norm": grad_norm,
        "source_loss": sum(r.stats["source_loss"] for r in results) / n,
        "vq_loss": sum(r.stats["vq_loss"] for r in results) / n,
        "target_loss": sum(r.stats["target_loss"] for r in results) / n,
        "task_seconds": sum(r.stats["seconds"] for r in results),
        "similarity": similarity,
    }
