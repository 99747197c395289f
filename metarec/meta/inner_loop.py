"""Functional inner loop of meta transfer (docs/design.md §4 step 2, Eq. (5); paper Eq. 4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def inner_loop(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    loss_fn: LossFn,
    steps: int,
    lr: float,
    first_order: bool,
) -> dict[str, torch.Tensor]:
    """φ = θ − α ∇_θ (L_src + L_vq), repeated `steps` times; returns φ.

    `loss_fn(model, params)` is the scalar source loss at `params`. The update is
    functional: `params` are not modified, φ is a new dict. Second order
    (`first_order=False`) keeps the graph of every inner gradient, so d L(φ)/dθ
    includes the Hessian term; first order detaches the inner gradients, so
    d L(φ)/dθ is the gradient at φ (FOMAML). Tensors the loss does not use keep
    their value (and identity: φ[p] is θ[p]).
    """
    phi = dict(params)
    names = list(phi)
    for _ in range(steps):
        loss = loss_fn(model, phi)
        grads = torch.autograd.grad(loss, [phi[n] for n in names], create_graph=not first_order, allow_unused=True)
        phi = {n: phi[n] if g is None else phi[n] - lr * g for n, g in zip(names, grads)}
    return phi
