"""Paired comparison of two runs on the same target test users, with a noise estimate.

Both runs' best checkpoints rank every test user's held-out item (the evaluation of
`metarec evaluate`, per user). The NDCG@10 difference (run − base) gets a 95% paired
bootstrap interval: users are resampled with replacement `n_boot` times (seeded) and
the interval is the 2.5th..97.5th percentile of the mean per-user difference. An
interval that contains 0 means the difference is within the noise of this test set.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metarec.errors import MetaRecError

METRIC = "NDCG@10"
N_BOOT = 2000


def ndcg_at_10(ranks: np.ndarray) -> np.ndarray:
    """Per-user NDCG@10 of 1-based ranks (one relevant item per user), in float64."""
    from metarec.eval import ndcg_per_user

    return ndcg_per_user(torch.as_tensor(np.asarray(ranks), dtype=torch.float64), 10).numpy()


def paired_bootstrap(base: np.ndarray, other: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(mean of other − base, lower, upper) of the `level` percentile bootstrap interval over paired users."""
    base, other = np.asarray(base, dtype=np.float64), np.asarray(other, dtype=np.float64)
    if base.ndim != 1 or base.size == 0 or base.shape != other.shape:
        raise ValueError("paired_bootstrap: expected two equally long, non-empty per-user arrays")
    diff = other - base
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, diff.size, diff.size)].mean() for _ in range(n_boot)])
    tail = (1.0 - level) / 2
    lower, upper = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean()), float(lower), float(upper)


def per_user_test_ranks(run_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """(test targets, their 1-based ranks) of RUN_DIR's best checkpoint, one entry per test user."""
    from metarec.eval import evaluate
    from metarec.objective import last_position_scorer
    from metarec.problem import problem_from_run

    problem = problem_from_run(run_dir)
    cfg, model, target = problem.cfg, problem.model, problem.target
    model.eval()
    params = dict(model.named_parameters())
    histories, targets = problem.domains[target].eval_examples("test")
    _, ranks = evaluate(
        last_position_scorer(model, params, target, problem.device),
        histories, targets, cfg.data.max_len,
        batch_size=cfg.train.eval_batch_size, exclude_history=cfg.train.eval_exclude_history, return_ranks=True,
    )
    return targets, ranks


def compare_runs(base_dir: str, run_dir: str, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """NDCG@10 of both runs, their difference, its relative size and 95% paired bootstrap interval."""
    base_targets, base_ranks = per_user_test_ranks(base_dir)
    targets, ranks = per_user_test_ranks(run_dir)
    if not np.array_equal(base_targets, targets):
        raise MetaRecError(f"{base_dir} and {run_dir} were not tested on the same target users: no paired comparison")
    base, other = ndcg_at_10(base_ranks), ndcg_at_10(ranks)
    diff, lower, upper = paired_bootstrap(base, other, n_boot=n_boot, seed=seed)
    return {
        "metric": METRIC,
        "base": float(base.mean()),
        "run": float(other.mean()),
        "difference": diff,
        "relative": diff / base.mean() if base.mean() > 0 else float("inf"),
        "ci95": [lower, upper],
        "n_users": int(base.size),
        "n_boot": n_boot,
    }


def format_comparison(c: dict[str, Any], label: str) -> str:
    """e.g. 'MetaRec vs target-only NDCG@10: +0.0012 (+3.3%), 95% interval [-0.0010, +0.0035] (paired bootstrap, 300 test users)'."""
    lower, upper = c["ci95"]
    verdict = "includes 0: within noise" if lower <= 0 <= upper else "excludes 0"
    return (f"{label} {c['metric']}: {c['difference']:+.4f} ({c['relative'] * 100:+.1f}%), 95% interval "
            f"[{lower:+.4f}, {upper:+.4f}] ({verdict}; paired bootstrap over {c['n_users']} test users)")
