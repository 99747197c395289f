"""`metarec evaluate`: recompute a run's test metrics from its best checkpoint."""

from __future__ import annotations

from metarec.problem import problem_from_run, target_metrics


def evaluate_run(run_dir: str) -> dict[str, float]:
    """Test metrics (docs/design.md §5) of RUN_DIR's best checkpoint, on the data its config names."""
    return target_metrics(problem_from_run(run_dir), "test")
