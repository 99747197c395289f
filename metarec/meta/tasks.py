"""Meta-task sampling (docs/design.md §4, step 1).

A task is one (source domain, source batch, target batch) triple. All draws of a run
come from ONE numpy Generator seeded once, so a run is reproducible, and the
generator's state is exported with every checkpoint so a resumed run draws exactly
the tasks the uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from metarec.config import Config
from metarec.data.batches import epoch_order_rows
from metarec.errors import CheckpointError, DataError

_SEED_MASK = (1 << 64) - 1


@dataclass(frozen=True, eq=False)
class TaskSpec:
    """Everything a worker needs to run one task: small and picklable.

    `source_rows` / `target_rows` index the training windows of the source and the
    target domain; `seed` seeds torch (dropout, sampled negatives) inside the task.
    """

    iteration: int
    index: int
    source: str
    source_rows: np.ndarray
    target_rows: np.ndarray
    seed: int


def task_seed(seed: int, iteration: int, index: int) -> int:
    """Torch seed of task `index` of outer iteration `iteration` of a run seeded `seed`.

    Independent of the order in which tasks are run, and of where they run.
    """
    state = np.random.SeedSequence([seed & _SEED_MASK, iteration, index]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))  # a non-negative int64, accepted by torch.manual_seed


class TaskSampler:
    """Draws the n tasks of each outer iteration.

    Sources: the first min(n, M) are drawn without replacement (uniformly, or
    proportionally to the number of training windows); tasks beyond M draw their
    source with replacement from the same distribution. Rows: uniform, without
    replacement inside a batch when the domain has enough windows.
    """

    def __init__(
        self,
        sources: list[str],
        source_sizes: dict[str, int],
        target_size: int,
        n_tasks: int,
        source_batch_size: int,
        target_batch_size: int,
        sampling: Literal["uniform", "proportional"] = "uniform",
        seed: int = 0,
        target_order: Literal["random", "epoch"] = "random",
    ):
        if not sources:
            raise ValueError("TaskSampler needs at least one source domain")
        if sampling not in ("uniform", "proportional"):
            raise ValueError(f"unknown source sampling {sampling!r} (expected 'uniform' or 'proportional')")
        for name in sources:
            if source_sizes.get(name, 0) <= 0:
                raise DataError(f"source domain {name!r} has no training windows")
        if target_size <= 0:
            raise DataError("the target domain has no training windows")
        self.sources = list(sources)
        self.source_sizes = {name: int(source_sizes[name]) for name in sources}
        self.target_size = int(target_size)
        self.n_tasks = n_tasks
        self.source_batch_size = source_batch_size
        self.target_batch_size = target_batch_size
        self.sampling = sampling
        self.seed = seed
        self.target_order = target_order
        self._rng = np.random.default_rng(np.random.SeedSequence(seed & _SEED_MASK))

    @classmethod
    def from_config(cls, cfg: Config, windows: Mapping[str, Sized]) -> "TaskSampler":
        """The sampler of a run: `data.sources`, `meta.tasks_per_iter` tasks, batches of
        `meta.source_batch_size` (default `train.batch_size`) and `train.batch_size` rows
        of `windows`, `data.source_sampling`, seeded with `seed`."""
        return cls(
            sources=list(cfg.data.sources),
            source_sizes={s: len(windows[s]) for s in cfg.data.sources},
            target_size=len(windows[cfg.data.target]),
            n_tasks=cfg.meta.tasks_per_iter,
            source_batch_size=cfg.meta.source_batch_size or cfg.train.batch_size,
            target_batch_size=cfg.train.batch_size,
            sampling=cfg.data.source_sampling,
            seed=cfg.seed,
            target_order=cfg.train.batch_order,
        )

    def _source_probabilities(self) -> np.ndarray | None:
        if self.sampling == "uniform":
            return None
        sizes = np.array([self.source_sizes[s] for s in self.sources], dtype=np.float64)
        return sizes / sizes.sum()

    def _draw_sources(self) -> list[str]:
        m = len(self.sources)
        p = self._source_probabilities()
        picks = list(self._rng.choice(m, size=min(self.n_tasks, m), replace=False, p=p))
        if self.n_tasks > m:
            picks += list(self._rng.choice(m, size=self.n_tasks - m, replace=True, p=p))
        return [self.sources[i] for i in picks]

    def _draw_rows(self, size: int, batch_size: int) -> np.ndarray:
        if batch_size <= size:
            return self._rng.choice(size, size=batch_size, replace=False).astype(np.int64)
        return self._rng.integers(0, size, size=batch_size, dtype=np.int64)

    def _target_rows(self, iteration: int, index: int) -> np.ndarray:
        """Task `index`'s target batch: drawn anew, or batch number iteration·n + index of the
        epoch order (`train.batch_order`; `metarec.data.batches.epoch_order_rows`)."""
        if self.target_order == "epoch":
            return epoch_order_rows(self.target_size, self.target_batch_size, iteration * self.n_tasks + index, self.seed)
        return self._draw_rows(self.target_size, self.target_batch_size)

    def sample(self, iteration: int) -> list[TaskSpec]:
        """The tasks of outer iteration `iteration`, indexed 0..n-1."""
        specs = []
        for index, source in enumerate(self._draw_sources()):
            specs.append(
                TaskSpec(
                    iteration=iteration,
                    index=index,
                    source=source,
                    source_rows=self._draw_rows(self.source_sizes[source], self.source_batch_size),
                    target_rows=self._target_rows(iteration, index),
                    seed=task_seed(self.seed, iteration, index),
                )
            )
        return specs

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state: the generator state plus what it was built for."""
        return {"sources": list(self.sources), "sampling": self.sampling, "seed": self.seed, "rng": self._rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue drawing exactly where the sampler that wrote `state` stopped."""
        for key in ("sources", "sampling", "seed"):
            if key not in state:
                raise CheckpointError(f"task sampler state: missing key {key!r}")
            mine = getattr(self, key)
            theirs = list(state[key]) if key == "sources" else state[key]
            if theirs != mine:
                raise CheckpointError(f"task sampler state: {key} = {state[key]!r} in the checkpoint, {mine!r} in this run")
        try:
            self._rng.bit_generator.state = state["rng"]
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"task sampler state: unusable generator state ({err})") from None
