"""Tiny synthetic setup for the VQ / meta-transfer tests.

A real `Recommender` (parameter names `items.<d>`, `bias.<d>`, `encoder.*`) with, by
default, a small causal test encoder in place of the registry backbone (fast, and
independent of the backbones), on tiny synthetic sequences cut by `TrainWindows`.
`meta_train` runs the real `Trainer` on it as an in-memory `Problem`.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch
from torch import nn

from metarec.config import Config, config_from_dict
from metarec.data.batches import TrainWindows
from metarec.meta import TaskContext, TaskSampler
from metarec.models.recommender import Recommender
from metarec.problem import Problem
from metarec.runners.local import LocalRunner
from metarec.train import Trainer


class ToyEncoder(nn.Module):
    """Causal: h_t = e_t + tanh(W · dropout(mean(e_1..e_t)) + b)."""

    def __init__(self, hidden: int, dropout: float):
        super().__init__()
        self.mix = nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(emb.dtype)
        mean = (emb * m).cumsum(1) / m.cumsum(1).clamp(min=1)
        return emb + torch.tanh(self.mix(self.drop(mean)))


def synthetic_sequences(n_items: int, n_users: int, length: int, stride: int, seed: int) -> list[np.ndarray]:
    """Learnable sequences: mostly item i -> i + stride (mod K), sometimes a random item."""
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_users):
        item = int(rng.integers(1, n_items + 1))
        seq = [item]
        for _ in range(length - 1):
            item = int(rng.integers(1, n_items + 1)) if rng.random() < 0.1 else (item - 1 + stride) % n_items + 1
            seq.append(item)
        seqs.append(np.array(seq))
    return seqs


DOMAIN_ITEMS = {"t": 12, "a": 20, "b": 16}
DOMAIN_STRIDE = {"t": 1, "a": 1, "b": 3}


def toy_config(**sections) -> Config:
    """Config for the toy domains; keyword arguments update whole sections, e.g. meta={...}."""
    raw = {
        "seed": 7,
        "data": {"target": "t", "sources": ["a", "b"], "max_len": 6},
        "model": {"hidden": 8, "dropout": 0.1},
        # batches drawn anew (the toy's draws are what the finite-difference checks were sized on)
        "train": {"batch_size": 8, "lr": 1e-2, "grad_clip": 5.0, "batch_order": "random"},
        "vq": {"heads": 2},
        # the paper's update, which the tests check term by term; meta.source_grad > 0 and
        # meta.persist_shared > 0 (the defaults: 3 and 0.5) are tested where a test sets them
        "meta": {"tasks_per_iter": 3, "inner_lr": 0.5, "source_grad": 0.0, "persist_shared": 0.0, "source_batch_size": None},
        "rescale": {"tau": 1.0},
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return config_from_dict(raw)


def toy_model(cfg: Config, seed: int = 0, dtype: torch.dtype = torch.float32, backbone: bool = False) -> Recommender:
    """The toy encoder, or with `backbone=True` the registry backbone `cfg.model.backbone`."""
    torch.manual_seed(seed)
    n_items = {name: DOMAIN_ITEMS[name] for name in [cfg.data.target, *cfg.data.sources]}
    if backbone:
        return Recommender(n_items, cfg.model).to(dtype)
    with mock.patch("metarec.models.recommender.build_encoder", lambda m: ToyEncoder(m.hidden, m.dropout)):
        model = Recommender(n_items, cfg.model)
    return model.to(dtype)


def toy_windows(cfg: Config) -> dict[str, TrainWindows]:
    return {
        name: TrainWindows(synthetic_sequences(DOMAIN_ITEMS[name], 40, 8, DOMAIN_STRIDE[name], seed=i), cfg.data.max_len)
        for i, name in enumerate([cfg.data.target, *cfg.data.sources])
    }


def toy_setup(cfg: Config, seed: int = 0, dtype: torch.dtype = torch.float32, backbone: bool = False) -> tuple[Recommender, TaskContext]:
    model = toy_model(cfg, seed, dtype, backbone)
    return model, TaskContext(model=model, windows=toy_windows(cfg), cfg=cfg, target=cfg.data.target)


def toy_problem(model: Recommender, ctx: TaskContext) -> Problem:
    """An in-memory Problem of the toy model and windows (no evaluation data: steps only)."""
    return Problem(cfg=ctx.cfg, domains={}, windows=ctx.windows, model=model, device=torch.device(ctx.device))


def toy_sampler(ctx: TaskContext) -> TaskSampler:
    """The run's task sampler (`TaskSampler.from_config`) over the toy windows."""
    return TaskSampler.from_config(ctx.cfg, ctx.windows)


def meta_train(model: nn.Module, ctx: TaskContext, iterations: int, runner=None) -> list[dict]:
    """`iterations` steps of the real Trainer on the toy problem (run directory unused). Returns the infos."""
    trainer = Trainer(toy_problem(model, ctx), "unused", runner or LocalRunner(ctx))
    return [trainer.step(it) for it in range(iterations)]
