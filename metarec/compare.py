"""`metarec compare` (and the demo's comparison): runs side by side on the same target test
users, each difference with a noise estimate.

Every run's best checkpoint ranks every test user's held-out item (the evaluation of
`metarec evaluate`, docs/design.md §5, kept per user). Against a baseline run, the
difference of each metric (run − baseline) gets a 95% paired bootstrap interval: users
are resampled with replacement `n_boot` times (seeded) and the interval is the
2.5th..97.5th percentile of the mean per-user difference. An interval that contains 0
means the difference is within the noise of this test set.

Only runs evaluated on the same users can be paired: the same target domain (name and
data checksum), the same subsample of it and the same evaluation rule; anything else is
refused with one line naming the difference. Runs are read through `RunDir` (local or
`s3://`); serving-style, only the target's tensors are restored (no source domain is read).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from metarec.errors import MetaRecError

METRIC = "NDCG@10"
METRICS = ("NDCG@10", "Recall@10", "MRR")
N_BOOT = 2000
LEVEL = 0.95


def ndcg_at_10(ranks: np.ndarray) -> np.ndarray:
    """Per-user NDCG@10 of 1-based ranks (one relevant item per user), in float64."""
    from metarec.eval import ndcg_per_user

    return ndcg_per_user(torch.as_tensor(np.asarray(ranks), dtype=torch.float64), 10).numpy()


def per_user_metrics(ranks: np.ndarray) -> dict[str, np.ndarray]:
    """Per-user NDCG@10, Recall@10 and MRR of 1-based ranks (docs/design.md Eq. (11))."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return {"NDCG@10": ndcg_at_10(ranks), "Recall@10": (ranks <= 10).astype(np.float64), "MRR": 1.0 / ranks}


def paired_bootstrap(base: np.ndarray, other: np.ndarray, *, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
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


@dataclass(frozen=True)
class RunRanks:
    """A run's test evaluation, per user: what it was evaluated on (`protocol`), the test
    targets in user order, and each target's 1-based rank under the best checkpoint."""

    run_dir: str
    target: str
    protocol: dict[str, Any]
    targets: np.ndarray
    ranks: np.ndarray


def rank_test_users(run_dir: str) -> RunRanks:
    """Rank every test user's target with RUN_DIR's best checkpoint (as `metarec evaluate` does)."""
    import torch

    from metarec import fastpath
    from metarec.data.domain import Domain
    from metarec.eval import evaluate
    from metarec.objective import last_position_scorer
    from metarec.problem import resolve_device, subsample_target
    from metarec.recommend import load_target_model
    from metarec.run_dir import RunDir

    run_dir = run_dir.rstrip("/") or run_dir
    cfg = RunDir(run_dir).read_config()
    data = cfg.data
    domain = subsample_target(cfg, Domain.load(data.root, data.target))
    device = resolve_device("auto")
    model = load_target_model(run_dir, cfg, domain.n_items).to(device)
    histories, targets = domain.eval_examples("test")
    with torch.no_grad():
        _, ranks = evaluate(
            last_position_scorer(model, dict(model.named_parameters()), data.target, device),
            histories, targets, data.max_len,
            batch_size=cfg.train.eval_batch_size, exclude_history=cfg.train.eval_exclude_history,
            length_buckets=fastpath.enabled(), return_ranks=True,
        )
    subsample = None
    if data.target_users:
        seed = cfg.seed if data.subsample_seed is None else data.subsample_seed
        subsample = {"users": data.target_users, "seed": seed, "items": data.subsample_items}
    protocol = {
        "data.target": data.target,
        "target data (sha256 of the prepared domain)": domain.manifest.get("sha256"),
        "target subsample (data.target_users, seed, data.subsample_items)": subsample,
        "train.eval_exclude_history": cfg.train.eval_exclude_history,
    }
    return RunRanks(run_dir, data.target, protocol, targets, ranks)


def check_pairable(base: RunRanks, run: RunRanks) -> None:
    """Refuse, in one line naming the difference, runs not evaluated on the same test users."""
    for key, value in base.protocol.items():
        other = run.protocol.get(key)
        if other != value:
            raise MetaRecError(f"{run.run_dir} and {base.run_dir} differ in {key}: {other!r} vs {value!r}; "
                               "a paired comparison needs runs tested on the same target users")
    if not np.array_equal(base.targets, run.targets):
        raise MetaRecError(f"{run.run_dir} and {base.run_dir} were not tested on the same target users: no paired comparison")


def difference(base: RunRanks, run: RunRanks, metric: str, *, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """`metric` of both runs, the difference (run − base), its relative size and 95% paired bootstrap interval."""
    base_values, values = per_user_metrics(base.ranks)[metric], per_user_metrics(run.ranks)[metric]
    diff, lower, upper = paired_bootstrap(base_values, values, n_boot=n_boot, seed=seed)
    return {
        "metric": metric,
        "base": float(base_values.mean()),
        "run": float(values.mean()),
        "difference": diff,
        "relative": diff / base_values.mean() if base_values.mean() > 0 else float("inf"),
        "ci95": [lower, upper],
        "excludes_zero": not lower <= 0 <= upper,
        "n_users": int(base_values.size),
        "n_boot": n_boot,
    }


def compare_runs(run_dirs: list[str], *, baseline: str | None = None, n_boot: int = N_BOOT, seed: int = 0) -> dict[str, Any]:
    """Test metrics of every run and, against `baseline` (default: the first run), each
    metric's paired difference with its 95% bootstrap interval (module docstring).

    Returns {"target", "n_users", "baseline", "n_boot", "seed", "runs": [{"run", "metrics"}],
    "differences": [{"run", "baseline", METRIC: difference(...) for each of METRICS}]}.
    """
    from metarec.eval import metrics_from_ranks

    runs = [r.rstrip("/") or r for r in run_dirs]
    base_dir = (baseline.rstrip("/") or baseline) if baseline else (runs[0] if runs else None)
    if base_dir is None or len(set(runs) | {base_dir}) < 2:
        raise MetaRecError("compare needs at least two different runs (RUN_DIR RUN_DIR ..., or one with --baseline RUN)")
    if base_dir not in runs:
        runs.insert(0, base_dir)
    runs = list(dict.fromkeys(runs))
    base = rank_test_users(base_dir)
    evaluated = {base_dir: base}
    for run_dir in runs:
        if run_dir != base_dir:
            evaluated[run_dir] = rank_test_users(run_dir)
            check_pairable(base, evaluated[run_dir])
    return {
        "target": base.target,
        "n_users": int(base.ranks.size),
        "baseline": base_dir,
        "n_boot": n_boot,
        "seed": seed,
        "runs": [{"run": r, "metrics": {**metrics_from_ranks(evaluated[r].ranks), "n_users": int(evaluated[r].ranks.size)}}
                 for r in runs],
        "differences": [{"run": r, "baseline": base_dir, **{m: difference(base, evaluated[r], m, n_boot=n_boot, seed=seed) for m in METRICS}}
                        for r in runs if r != base_dir],
    }


def format_comparison(c: dict[str, Any], label: str) -> str:
    """e.g. 'MetaRec vs target-only NDCG@10: +0.0012 (+3.3%), 95% interval [-0.0010, +0.0035] (paired bootstrap, 300 test users)'."""
    lower, upper = c["ci95"]
    verdict = "includes 0: within noise" if lower <= 0 <= upper else "excludes 0"
    return (f"{label} {c['metric']}: {c['difference']:+.4f} ({c['relative'] * 100:+.1f}%), 95% interval "
            f"[{lower:+.4f}, {upper:+.4f}] ({verdict}; paired bootstrap over {c['n_users']} test users)")


def format_table(result: dict[str, Any], labels: dict[str, str] | None = None, header: str = "run") -> str:
    """The metrics of every run, one row each, then each run's difference from the baseline
    per metric with its interval, `*` where the interval excludes 0."""
    labels = labels or {}
    name = {r["run"]: labels.get(r["run"], r["run"]) for r in result["runs"]}
    width = max(len(header), *(len(n) for n in name.values()))
    lines = [f"{header:<{width}}" + "".join(f"{m:>12}" for m in METRICS)]
    for row in result["runs"]:
        note = "   (baseline)" if row["run"] == result["baseline"] else ""
        lines.append(f"{name[row['run']]:<{width}}" + "".join(f"{row['metrics'][m]:>12.4f}" for m in METRICS) + note)
    if result["differences"]:
        lines.append(f"difference from {name[result['baseline']]}, 95% paired bootstrap interval over "
                     f"{result['n_users']} test users of {result['target']!r} (* the interval excludes 0):")
        lines.append(f"{'':<{width}}" + "".join(f"  {m:<27}" for m in METRICS))
        for diff in result["differences"]:
            cells = []
            for m in METRICS:
                d = diff[m]
                cell = f"{d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]{' *' if d['excludes_zero'] else ''}"
                cells.append(f"  {cell:<27}")
            lines.append(f"{name[diff['run']]:<{width}}" + "".join(cells).rstrip())
    return "\n".join(lines)
