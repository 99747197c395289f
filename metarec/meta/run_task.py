"""One meta task as a pure function: the unit of work of every runner (docs/design.md §4, §6).

`run_task(params, task, ctx)` depends only on its inputs: it seeds torch from the task
spec, so the local runner (in-process) and the Ray runner (in actors, possibly
re-running a task lost with its actor) produce the same result.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from metarec.config import Config
from metarec.errors import NonFiniteError
from metarec.meta.inner_loop import inner_loop
from metarec.meta.rescale import descent_direction, tensor_similarities
from metarec.meta.tasks import TaskSpec
from metarec.objective import LossParts, domain_loss
from metarec.optimizer import nonfinite_tensors


class Windows(Protocol):
    """The interface of `metarec.data.batches.TrainWindows` that tasks use."""

    def __len__(self) -> int: ...

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class TaskContext:
    """What stays fixed across tasks on one worker: the model (its encoder structure),
    the training windows of every domain, the run config, the target name, the device."""

    model: nn.Module
    windows: dict[str, Windows]
    cfg: Config
    target: str
    device: torch.device | str = "cpu"


@dataclass
class TaskResult:
    """What a task sends back (on CPU).

    meta_grad: g_i = d L_target(φ_i)/dθ for the tensors where it is nonzero.
    sims: cos(g_i^p, u_i^p) for the touched tensors; touched: tensors where g_i^p or
    u_i^p is nonzero. source_delta: φ_i − θ of the source-only tensors
    (`items.<source>`, `bias.<source>`), and of the shared tensors the inner loop moved
    when `meta.persist_shared` > 0. source_grad: the task's source gradient
    (θ − φ_i) / α = the sum of its inner-loop gradients (one step: ∇_θ of the source loss
    at θ) for the shared tensors the inner loop moved, when `meta.source_grad` > 0
    (docs/design.md Eq. (8b)). stats: source_loss (recommendation loss at θ), vq_loss
    (at θ), target_loss (at φ_i), seconds; target_gain with
    `rescale.signal: target_gain`.
    """

    index: int
    source: str
    meta_grad: dict[str, torch.Tensor]
    sims: dict[str, float]
    touched: set[str]
    source_delta: dict[str, torch.Tensor]
    stats: dict[str, float] = field(default_factory=dict)
    source_grad: dict[str, torch.Tensor] = field(default_factory=dict)


def source_loss_options(cfg: Config) -> dict[str, Any]:
    """Keyword arguments of `domain_loss` for a source domain under `cfg`."""
    return {
        "vq_enabled": cfg.vq.enabled,
        "vq_heads": cfg.vq.heads,
        "vq_source_output": cfg.vq.source_output,
        "vq_weight": cfg.vq.weight,
        "vq_chunk_size": cfg.vq.chunk_size,
        "negatives": cfg.train.source_negatives,
    }


def source_only_names(source: str) -> tuple[str, str]:
    """The tensors only source `source` uses (docs/design.md §4, `meta.source_params`)."""
    return f"items.{source}", f"bias.{source}"


def _moved_shared(source: str, theta: dict, phi: dict) -> list[str]:
    """The shared tensors (not the source's own tables) the inner loop moved."""
    own = source_only_names(source)
    return sorted(n for n in theta if n not in own and phi[n] is not theta[n])


def _kept_inner_changes(source: str, theta: dict, phi: dict, cfg: Config) -> list[str]:
    """Tensors whose inner-loop change φ − θ the outer step may keep: the source's own
    tables, plus every shared tensor the inner loop moved when `meta.persist_shared` > 0."""
    own = list(source_only_names(source))
    return own + (_moved_shared(source, theta, phi) if cfg.meta.persist_shared > 0 else [])


def _source_gradient(source: str, theta: dict, phi: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """(θ − φ) / α of the moved shared tensors when `meta.source_grad` > 0 (docs/design.md
    Eq. (8b)): the inner loop's source gradients, so that the outer step need not know α."""
    if cfg.meta.source_grad <= 0:
        return {}
    return {n: ((theta[n] - phi[n]) / cfg.meta.inner_lr).detach().cpu() for n in _moved_shared(source, theta, phi)}


def _describe(task: TaskSpec) -> str:
    return f"task {task.index} (source {task.source!r}) at iteration {task.iteration}"


def _raise_nonfinite_loss(what: str, task: TaskSpec, suspects: dict[str, torch.Tensor], kind: str) -> None:
    bad = nonfinite_tensors(suspects)
    detail = f"; {kind} with non-finite values: {', '.join(bad)}" if bad else ""
    raise NonFiniteError(f"non-finite {what} in {_describe(task)}{detail}")


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Fork torch's RNG (CPU and `device`) and seed it with `seed`, so a task's dropout
    and sampled negatives are the same wherever and in whatever order it runs."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed)
        yield


def target_gain(model: nn.Module, theta: dict, phi: dict, target: str, inputs: torch.Tensor, labels: torch.Tensor) -> float:
    """L_target(θ) − L_target(φ) on one target batch, without dropout (`rescale.signal: target_gain`).

    How much the task's inner step on its source lowered the target loss: positive when
    the source's step helps the target. Not in the paper (docs/design.md §4); it replaces
    the per-tensor cosine of Eq. (6) in the softmax of Eq. (7). Leaves the model in
    training mode.
    """
    model.eval()
    try:
        with torch.no_grad():
            before, after = (domain_loss(model, p, target, inputs, labels, target=target, fused_ce=True).total for p in (theta, phi))
            return float((before - after).item())
    finally:
        model.train()


def run_task(params: dict[str, torch.Tensor], task: TaskSpec, ctx: TaskContext) -> TaskResult:
    """Inner loop on the task's source batch, meta gradient on its target batch (docs/design.md §4 steps 2–4).

    θ = `params` detached (fresh leaves; `params` are never modified), φ = inner_loop(θ)
    on L_src + L_vq, g = d L_target(φ)/dθ (second order unless `meta.first_order`),
    and per tensor s^p = cos(g^p, u^p) with u = descent_direction(θ, φ) (with
    `rescale.signal` target_gain or source_fit, s^p is instead `target_gain` or minus the
    source loss at θ, the same for every touched tensor). Dropout is on
    and seeded with `task.seed`. Raises NonFiniteError naming the loss or tensor, the
    source and the iteration.
    """
    start = time.perf_counter()
    cfg = ctx.cfg
    device = torch.device(ctx.device)
    model = ctx.model.train()
    theta = {n: t.detach().to(device).requires_grad_(True) for n, t in params.items()}
    src_inputs, src_labels = (t.to(device) for t in ctx.windows[task.source].batch(task.source_rows))
    tgt_inputs, tgt_labels = (t.to(device) for t in ctx.windows[ctx.target].batch(task.target_rows))
    options = source_loss_options(cfg)
    inner_parts: list[LossParts] = []

    def source_loss(m: nn.Module, p: dict[str, torch.Tensor]) -> torch.Tensor:
        # the second-order inner loop differentiates this loss twice: reference CE there
        parts = domain_loss(m, p, task.source, src_inputs, src_labels, target=ctx.target, fused_ce=cfg.meta.first_order, **options)
        inner_parts.append(parts)
        return parts.total

    with seeded_rng(task.seed, device):
        phi = inner_loop(model, theta, source_loss, cfg.meta.inner_steps, cfg.meta.inner_lr, cfg.meta.first_order)
        target = domain_loss(model, phi, ctx.target, tgt_inputs, tgt_labels, target=ctx.target, fused_ce=True)
        first = inner_parts[0]
        values = [first.rec, first.vq, *(p.total for p in inner_parts), target.total]
        # the losses come to the host once, after the backward pass has been queued
        # (no device sync between the forward and the backward); a non-finite loss
        # still raises before any result leaves the task
        loss_values = torch.stack([v.detach() for v in values])
        names = list(theta)
        grads = torch.autograd.grad(target.total, [theta[n] for n in names], allow_unused=True)
        first_rec, first_vq, *losses = loss_values.cpu().tolist()
        if not all(math.isfinite(v) for v in losses[:-1]):
            _raise_nonfinite_loss("source loss", task, theta, "parameters")
        if not math.isfinite(losses[-1]):
            _raise_nonfinite_loss("target loss", task, {**theta, **phi}, "parameters or inner-loop values")

    meta_grad = dict(zip(names, grads))
    directions = {n: None if phi[n] is theta[n] else descent_direction(theta[n], phi[n], cfg.rescale.direction) for n in names}
    sims, touched, norms = tensor_similarities(meta_grad, directions)
    extra = {}
    if cfg.rescale.signal == "target_gain":
        gain = target_gain(model, theta, phi, ctx.target, tgt_inputs, tgt_labels)
        if not math.isfinite(gain):
            _raise_nonfinite_loss("target loss without dropout", task, {**theta, **phi}, "parameters or inner-loop values")
        sims = {n: gain for n in touched}
        extra["target_gain"] = gain
    elif cfg.rescale.signal == "source_fit":
        sims = {n: -first_rec for n in touched}
    for name, (g_norm, u_norm) in norms.items():
        if not math.isfinite(g_norm):
            raise NonFiniteError(f"non-finite meta gradient for tensor {name} in {_describe(task)}")
        if not math.isfinite(u_norm):
            raise NonFiniteError(f"non-finite inner-loop update of tensor {name} in {_describe(task)}")

    return TaskResult(
        index=task.index,
        source=task.source,
        meta_grad={n: g.detach().cpu() for n, g in meta_grad.items() if g is not None and norms[n][0] != 0.0},
        sims=sims,
        touched=touched,
        source_delta={n: (phi[n] - theta[n]).detach().cpu() for n in _kept_inner_changes(task.source, theta, phi, cfg)},
        source_grad=_source_gradient(task.source, theta, phi, cfg),
        stats={
            "source_loss": first_rec,
            "vq_loss": first_vq,
            "target_loss": losses[-1],
            **extra,
            "seconds": time.perf_counter() - start,
        },
    )
