"""What runs alongside `Trainer.fit`: the callback protocol (docs/design.md §6).

`Trainer(..., callbacks=[...])` calls each callback's methods, in list order, at four
points of every step; the base class's are no-ops, so a callback overrides only the
ones it needs. In the order `fit` calls them:

1. `on_step_begin(step, trainer)`: before step `step` (0-based) runs;
2. `on_step_row(row, trainer)`: the step ran; `row` is its history row before
   validation. Keys a callback adds here are in the history and the step checkpoint;
3. `on_eval(row, trainer)`: after a validation (`row["val"]`), once the row is in the
   history (written to `history.jsonl`) and any step checkpoint due is saved;
4. `on_step_end(row, trainer)`: after every step, at the same point (after `on_eval`).
   Keys added here reach `history.jsonl` at its next write, not this step's checkpoint.

Tune reports in `on_eval` (`tune.sweep.TuneReport`); a Ray Train worker times its steps
and reports them to Ray Train (`metarec.ray.ray_train.RayTrainReport`).
"""

from __future__ import annotations

from typing import Any


class Callback:
    """Hooks of `Trainer.fit` (module docstring); each a no-op here."""

    def on_step_begin(self, step: int, trainer: Any) -> None:
        """Before step `step` (0-based) runs."""

    def on_step_row(self, row: dict[str, Any], trainer: Any) -> None:
        """After the step ran: its history row before validation (keys added are recorded)."""

    def on_eval(self, row: dict[str, Any], trainer: Any) -> None:
        """After a validation, once the row is in the history and any due step checkpoint is saved."""

    def on_step_end(self, row: dict[str, Any], trainer: Any) -> None:
        """After every step, once its row is in the history and any due step checkpoint is saved."""
