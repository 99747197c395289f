"""The Problem of a run: its data, its model and the device, built from the config by one function.

`build_problem(cfg)` is what the trainer, the Ray workers (`SourceTaskWorker`), the
commands that read a finished run (`evaluate`, `compare`) and the benchmarks call; tests
may hand the trainer a small in-memory `Problem` instead. Building it seeds torch with
`cfg.seed` right before the model is created, so the initial parameters are a function
of the config alone (docs/design.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metarec import fastpath
from metarec.config import Config
from metarec.data.batches import TrainWindows
from metarec.data.domain import Domain, data_fingerprint, load_domains
from metarec.errors import ConfigError, DataError, bounded
from metarec.eval import evaluate
from metarec.meta.run_task import TaskContext
from metarec.models.recommender import Recommender
from metarec.objective import last_position_scorer
from metarec.run_dir import RunDir


def resolve_device(name: str) -> torch.device:
    """`train.device` as a torch device; a CUDA device this machine does not have is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            have = f"only {count} CUDA device(s)" if count else "no CUDA device (torch.cuda.is_available() is False)"
            raise ConfigError(f"train.device: {name!r} is not available: this machine has {have}; use 'auto' or 'cpu'")
    return device


@dataclass
class Problem:
    """Data and model of one run. `domains` (for evaluation) may be empty in tests that only
    take training steps; `windows` holds the training windows of every domain."""

    cfg: Config
    domains: dict[str, Domain]
    windows: dict[str, TrainWindows]
    model: Recommender
    device: torch.device

    @property
    def target(self) -> str:
        return self.cfg.data.target

    def task_context(self) -> TaskContext:
        return TaskContext(model=self.model, windows=self.windows, cfg=self.cfg, target=self.target, device=self.device)


def build_problem(cfg: Config, device: torch.device | None = None) -> Problem:
    """Load the domains, build training windows and the (seeded) model."""
    device = device or resolve_device(cfg.train.device)
    names = [cfg.data.target, *cfg.data.sources]
    domains = load_domains(cfg.data.root, names)
    domains[cfg.data.target] = subsample_target(cfg, domains[cfg.data.target])
    windows = {}
    for name, dom in domains.items():
        max_len = cfg.data.max_len if name == cfg.data.target else (cfg.data.source_max_len or cfg.data.max_len)
        refit = cfg.data.train_on_validation and name == cfg.data.target
        windows[name] = TrainWindows(dom.train_sequences(include_validation=refit), max_len, cfg.data.first_item_label)
    check_trainable(domains, windows, cfg.data.target)
    torch.manual_seed(cfg.seed)
    try:
        model = Recommender({n: d.n_items for n, d in domains.items()}, cfg.model).to(device)
    except (MemoryError, RuntimeError) as err:
        if not _allocation_failure(err):
            raise
        detail = bounded(str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__, 200)
        raise ConfigError(f"model.hidden={cfg.model.hidden}, model.blocks={cfg.model.blocks}: cannot allocate the model on "
                          f"{device} ({detail}); use a smaller model") from None
    return Problem(cfg=cfg, domains=domains, windows=windows, model=model, device=device)


def subsample_target(cfg: Config, target: Domain) -> Domain:
    """The target domain as a run of `cfg` trains and evaluates on it: the seeded subsample of
    `data.target_users` users (`data.subsample_seed`, else `seed`), or all of it."""
    if not cfg.data.target_users:
        return target
    seed = cfg.seed if cfg.data.subsample_seed is None else cfg.data.subsample_seed
    return target.subsample_users(cfg.data.target_users, seed, compact_items=cfg.data.subsample_items == "compact")


def _allocation_failure(err: BaseException) -> bool:
    """Whether `err` says memory ran out (torch reports CPU allocation failures as RuntimeError)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return "alloc" in text and ("memory" in text or "bytes" in text)


def problem_from_run(run_dir: str) -> Problem:
    """The Problem a run directory was trained on, its model holding the best checkpoint."""
    run = RunDir(run_dir)
    problem = build_problem(run.read_config())
    run.restore_best(problem.model, data=data_fingerprint(problem.domains))
    return problem


def check_trainable(domains: dict[str, Domain], windows: dict[str, TrainWindows], target: str) -> None:
    """Refuse, before any training, domains whose users are all too short to train or evaluate on."""
    if not domains[target].eval_examples("val")[1].size:
        raise DataError(f"target domain {target!r}: no user has the 3 items leave-one-out needs "
                        "(training, validation, test), so there is nothing to validate or test on")
    for name, w in windows.items():
        if not len(w):
            raise DataError(f"domain {name!r}: no training pair (every user's training part has fewer than 2 items)")


def target_metrics(problem: Problem, split: str) -> dict[str, float]:
    """Full-ranking metrics of the current parameters on the target's val or test split (docs/design.md §5)."""
    cfg, model = problem.cfg, problem.model
    histories, targets = problem.domains[problem.target].eval_examples(split)
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    try:
        return evaluate(
            last_position_scorer(model, params, problem.target, problem.device),
            histories,
            targets,
            cfg.data.max_len,
            batch_size=cfg.train.eval_batch_size,
            exclude_history=cfg.train.eval_exclude_history,
            length_buckets=fastpath.enabled(),
        )
    finally:
        model.train(was_training)
