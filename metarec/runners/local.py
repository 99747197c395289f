"""In-process runner: runs the tasks of an iteration one after another (docs/design.md §6).

The Ray runner has the same interface and calls the same `run_task` in actors.
"""

from __future__ import annotations

import torch

from metarec.meta.run_task import TaskContext, TaskResult, run_task
from metarec.meta.tasks import TaskSpec


class LocalRunner:
    """`run_tasks(params, specs)` -> results sorted by task index."""

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx

    def run_tasks(self, params: dict[str, torch.Tensor], specs: list[TaskSpec]) -> list[TaskResult]:
        return sorted((run_task(params, spec, self.ctx) for spec in specs), key=lambda r: r.index)

    def close(self) -> None:
        """Nothing to release in-process; present for parity with the Ray runner."""
