"""Joint training on source and target losses: the `meta.enabled: false` ablation (docs/design.md §4).

Same tasks, same batches and the same VQ source loss as meta transfer, but the caller
takes one ordinary optimizer step on the summed losses instead of inner loop + meta
gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from metarec.meta.run_task import TaskContext, seeded_rng, source_loss_options
from metarec.meta.tasks import TaskSpec
from metarec.objective import domain_loss


def joint_loss(
    model: nn.Module, params: dict[str, torch.Tensor], specs: list[TaskSpec], ctx: TaskContext
) -> tuple[torch.Tensor, dict[str, float]]:
    """mean_i [ (L_src + L_vq)(source batch i) + L_target(target batch i) ] at `params`.

    Differentiable w.r.t. `params`; each task's dropout is seeded with its spec seed.
    Returns (loss, stats) with stats = mean source_loss, vq_loss, target_loss.
    """
    if not specs:
        raise ValueError("joint_loss needs at least one task")
    device = torch.device(ctx.device)
    model.train()
    options = source_loss_options(ctx.cfg)
    terms, src, vq, tgt = [], [], [], []
    for spec in sorted(specs, key=lambda s: s.index):
        src_inputs, src_labels = (t.to(device) for t in ctx.windows[spec.source].batch(spec.source_rows))
        tgt_inputs, tgt_labels = (t.to(device) for t in ctx.windows[ctx.target].batch(spec.target_rows))
        with seeded_rng(spec.seed, device):
            source = domain_loss(model, params, spec.source, src_inputs, src_labels, target=ctx.target, fused_ce=True, **options)
            target = domain_loss(model, params, ctx.target, tgt_inputs, tgt_labels, target=ctx.target, fused_ce=True)
        terms.append(source.total + target.total)
        src.append(source.rec.detach())
        vq.append(source.vq.detach())
        tgt.append(target.total.detach())
    loss = torch.stack(terms).mean()
    means = torch.stack([torch.stack(src).mean(), torch.stack(vq).mean(), torch.stack(tgt).mean()]).cpu().tolist()
    return loss, dict(zip(("source_loss", "vq_loss", "target_loss"), means))
