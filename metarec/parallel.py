"""How the Trainer's processes share a batch: the data-parallel strategy (docs/design.md §6).

A strategy has two methods, which `Trainer` calls in its target-only and joint steps
(MetaRec's tasks are spread by the runner instead):

- `shard(rows) -> rows`: this process's share of the rows of a batch that every
  process drew alike (same seeded RNG);
- `sync_grads(params, step)`: average the parameters' gradients over the processes, in
  place, after the backward pass and before the one clip and optimizer step.

`SingleProcess`, the default, is one process holding all the data: both are no-ops.
`metarec.ray.collective.DataParallel` is W Ray Train workers on one process group.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import numpy as np
import torch


class Strategy(Protocol):
    def shard(self, rows: np.ndarray) -> np.ndarray:
        """This process's share of a batch's rows."""

    def sync_grads(self, params: Iterable[torch.nn.Parameter], step: int) -> None:
        """Average the gradients of `params` over the processes, in place (step `step`, 0-based)."""


class SingleProcess:
    """One process, all the data: nothing to shard, nothing to average."""

    def shard(self, rows: np.ndarray) -> np.ndarray:
        return rows

    def sync_grads(self, params: Iterable[torch.nn.Parameter], step: int) -> None:
        """One process: its gradients are the average already."""
