"""The training loop: target-only, joint, or MetaRec, locally or with Ray workers.

Read it top to bottom: build data and model, then per step either
- target-only: one AdamW step on the target cross-entropy;
- joint (`meta.enabled: false`): one step on source + target losses of the sampled tasks;
- MetaRec: the runner computes each task's meta gradient (`run_task`), the driver
  softmax-rescales them per tensor and applies the outer update (DESIGN §4);
validate every `eval_every` steps, keep the best-validation checkpoint, stop early,
test once with the best parameters.

The run directory (local or s3://) holds `config.yaml`, `history.jsonl`,
`metrics.json` and `checkpoints/{best,step-N}`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from metarec import fastpath, fs
from metarec.checkpoint import (
    Checkpoint,
    check_optimizer_state,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_model,
    save_checkpoint,
    step_checkpoints,
)
from metarec.config import Config, dump_config, load_run_config
from metarec.data.batches import TrainWindows
from metarec.data.domain import Domain, load_domains
from metarec.errors import CheckpointError, ConfigError, DataError, NonFiniteError, quote
from metarec.eval import evaluate
from metarec.meta.joint import joint_loss
from metarec.meta.outer import apply_meta_update
from metarec.meta.run_task import TaskContext
from metarec.meta.tasks import TaskSampler
from metarec.models.recommender import Recommender
from metarec.objective import domain_loss, last_position_scores

BEST = "best"


def _log(message: str) -> None:
    """Progress messages go to stderr (stdout is for results), above any progress bar."""
    tqdm.write(message, file=sys.stderr)


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


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    t = cfg.train
    params = list(model.parameters())
    if t.optimizer == "sgd":  # plain SGD with beta reproduces paper Eq. 8
        return torch.optim.SGD(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.optimizer == "adam":
        return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


@dataclass
class Problem:
    """Data and model of one run, built once from the config (also by Ray workers)."""

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
    if cfg.data.target_users:
        seed = cfg.seed if cfg.data.subsample_seed is None else cfg.data.subsample_seed
        domains[cfg.data.target] = domains[cfg.data.target].subsample_users(
            cfg.data.target_users, seed, compact_items=cfg.data.subsample_items == "compact"
        )
    windows = {}
    for name, dom in domains.items():
        max_len = cfg.data.max_len if name == cfg.data.target else (cfg.data.source_max_len or cfg.data.max_len)
        windows[name] = TrainWindows(dom.train_sequences(), max_len)
    check_trainable(domains, windows, cfg.data.target)
    torch.manual_seed(cfg.seed)
    model = Recommender({n: d.n_items for n, d in domains.items()}, cfg.model).to(device)
    return Problem(cfg=cfg, domains=domains, windows=windows, model=model, device=device)


def check_trainable(domains: dict[str, Domain], windows: dict[str, TrainWindows], target: str) -> None:
    """Refuse, before any training, domains whose users are all too short to train or evaluate on."""
    if not domains[target].eval_examples("val")[1].size:
        raise DataError(f"target domain {target!r}: no user has the 3 items leave-one-out needs "
                        "(training, validation, test), so there is nothing to validate or test on")
    for name, w in windows.items():
        if not len(w):
            raise DataError(f"domain {name!r}: no training pair (every user's training part has fewer than 2 items)")


def target_metrics(problem: Problem, split: str) -> dict[str, float]:
    """Full-ranking metrics of the current parameters on the target's val or test split."""
    cfg, model = problem.cfg, problem.model
    histories, targets = problem.domains[problem.target].eval_examples(split)
    params = dict(model.named_parameters())
    was_training = model.training
    model.eval()
    try:
        return evaluate(
            lambda inputs: last_position_scores(model, params, problem.target, inputs.to(problem.device)),
            histories,
            targets,
            cfg.data.max_len,
            batch_size=cfg.train.eval_batch_size,
            exclude_history=cfg.train.eval_exclude_history,
            length_buckets=fastpath.enabled(),
        )
    finally:
        model.train(was_training)


@dataclass
class RunState:
    """Counters and best-so-far: everything besides tensors that a resume needs."""

    step: int = 0
    best_step: int = -1
    best_ndcg: float = -1.0
    best_val: dict[str, float] = field(default_factory=dict)
    evals_since_best: int = 0
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    evals: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __post_init__(self) -> None:
        """Refuse a state.json of the wrong shape (TypeError/ValueError name the field)."""
        for name, kind in (("step", int), ("best_step", int), ("evals_since_best", int), ("evals", int),
                           ("best_ndcg", (int, float)), ("train_seconds", (int, float)), ("eval_seconds", (int, float)),
                           ("best_val", dict), ("history", list)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"run.{name} is {quote(value, 40)}, expected {getattr(kind, '__name__', 'a number')}")
        if self.step < 0 or len(self.history) != self.step or not all(isinstance(r, dict) for r in self.history):
            raise ValueError(f"run.step {self.step} does not match the {len(self.history)} history rows")


def _check_finite(model: torch.nn.Module, loss: torch.Tensor, step: int, total_norm: torch.Tensor | None = None) -> None:
    """Raise NonFiniteError if the loss or any gradient holds a NaN or an infinity.

    One host sync for the whole step: the gradients' total norm is finite exactly when
    every gradient is (barring an overflow of the norm itself); only when the check fails
    are the tensors examined one by one to name the culprit.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if total_norm is None:
        total_norm = torch.nn.utils.get_total_norm(grads) if grads else loss.new_zeros(())
    if bool(torch.isfinite(loss) & torch.isfinite(total_norm)):
        return
    if not torch.isfinite(loss):
        raise NonFiniteError(f"iteration {step}: loss is {loss.item()}")
    for name, p in model.named_parameters():
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteError(f"iteration {step}: non-finite gradient in tensor '{name}'")


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out_dir: str,
        runner_factory: Callable[[Problem], Any] | None = None,
        on_eval: Callable[[dict[str, Any], "Trainer"], None] | None = None,
    ):
        self.cfg = cfg
        self.on_eval = on_eval  # called after every validation with the history row (Tune reports here)
        self.out = out_dir.rstrip("/")
        self.problem = build_problem(cfg)
        self.model = self.problem.model
        self.optimizer = make_optimizer(self.model, cfg)
        self.state = RunState()
        t = self.problem.target
        self.sampler = None if cfg.method == "target_only" else TaskSampler(
            sources=list(cfg.data.sources),
            source_sizes={s: len(self.problem.windows[s]) for s in cfg.data.sources},
            target_size=len(self.problem.windows[t]),
            n_tasks=cfg.meta.tasks_per_iter,
            source_batch_size=cfg.meta.source_batch_size or cfg.train.batch_size,
            target_batch_size=cfg.train.batch_size,
            sampling=cfg.data.source_sampling,
            seed=cfg.seed,
        )
        self.target_rng = np.random.default_rng(cfg.seed)  # target-only batches
        self.runner = None
        if cfg.method == "metarec":
            if runner_factory is None:
                from metarec.runners.local import LocalRunner

                runner_factory = lambda problem: LocalRunner(problem.task_context())  # noqa: E731
            self.runner = runner_factory(self.problem)

    # ------------------------------------------------------------------ steps

    def _target_only_step(self, step: int) -> dict[str, float]:
        windows = self.problem.windows[self.problem.target]
        inputs, labels = windows.batch(self._data_shard(windows.sample_rows(self.target_rng, self.cfg.train.batch_size)))
        params = dict(self.model.named_parameters())
        parts = domain_loss(self.model, params, self.problem.target, inputs.to(self.problem.device), labels.to(self.problem.device), target=self.problem.target, fused_ce=True)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        return self._finish_step(parts.total, step, {"target_loss": parts.rec.detach()})

    def _joint_step(self, step: int) -> dict[str, float]:
        specs = [replace(s, source_rows=self._data_shard(s.source_rows), target_rows=self._data_shard(s.target_rows))
                 for s in self.sampler.sample(step)]
        params = dict(self.model.named_parameters())
        loss, stats = joint_loss(self.model, params, specs, self.problem.task_context())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self._finish_step(loss, step, stats)

    def _finish_step(self, loss: torch.Tensor, step: int, stats: dict[str, Any]) -> dict[str, float]:
        """Check, clip (`train.grad_clip`), step; tensor stats come to the host in one transfer."""
        self._sync_grads()
        with_grad = [p for p in self.model.parameters() if p.grad is not None]
        # = clip_grad_norm_ split in two, so the norm also serves the finiteness check
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else loss.new_zeros(())
        _check_finite(self.model, loss, step, total_norm)
        if self.cfg.train.grad_clip and with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, self.cfg.train.grad_clip, total_norm)
        self.optimizer.step()
        keys = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
        loss_value, *values = torch.stack([loss.detach(), *(stats[k] for k in keys)]).cpu().tolist()
        return {"loss": loss_value, **stats, **dict(zip(keys, values))}

    def _meta_step(self, step: int) -> dict[str, Any]:
        specs = self.sampler.sample(step)
        theta = {n: p.detach() for n, p in self.model.named_parameters()}
        results = self.runner.run_tasks(theta, specs)
        self.optimizer.zero_grad(set_to_none=True)
        params = dict(self.model.named_parameters())
        return apply_meta_update(params, self.optimizer, results, self.cfg, step, reduce=getattr(self.runner, "reduce", None))

    # Data-parallel hooks (metarec.runners.ray_train overrides them; here: one process, all data)

    def _data_shard(self, rows: np.ndarray) -> np.ndarray:
        """This process's share of a batch's rows."""
        return rows

    def _sync_grads(self) -> None:
        """Average the gradients over the data-parallel processes (before clip and step)."""

    def _after_step(self, row: dict[str, Any]) -> None:
        """Called after every step's history row (and checkpoint) is written."""

    def step(self, step: int) -> dict[str, Any]:
        self.model.train()
        if self.cfg.method == "target_only":
            return self._target_only_step(step)
        if self.cfg.method == "joint":
            return self._joint_step(step)
        return self._meta_step(step)

    # ------------------------------------------------------------ checkpoints

    def _state_payload(self) -> dict[str, Any]:
        return {"run": self.state.to_json(), "sampler": self.sampler.state_dict() if self.sampler else None, "target_rng": self.target_rng.bit_generator.state, "config": self.cfg.to_dict()}

    def save(self, tag: str, with_optimizer: bool) -> None:
        save_checkpoint(f"{self.out}/checkpoints/{tag}", self.model, self.optimizer if with_optimizer else None, self._state_payload())

    def resume(self, root: str | None = None) -> bool:
        """Restore the newest complete step checkpoint under `root` (default: this run's); False if none."""
        root = root or f"{self.out}/checkpoints"
        ckpt = latest_checkpoint(root)
        if ckpt is None:
            if step_checkpoints(root):
                raise CheckpointError(f"{root}: every step checkpoint is torn or unreadable; nothing to resume from")
            return False
        self.restore(ckpt, root)
        return True

    def restore(self, ckpt: Checkpoint, root: str) -> None:
        """Parameters, optimizer, sampler, RNGs and counters from a step checkpoint (`root` names it in errors)."""
        restore_model(self.model, ckpt.params, root)
        if ckpt.optimizer is None:
            raise CheckpointError(f"{root}: step checkpoint has no optimizer state")
        check_optimizer_state(ckpt.optimizer, self.model, self.optimizer, root)
        try:
            missing = set(RunState.__dataclass_fields__) - set(ckpt.state["run"])
            if missing:
                raise KeyError(f"run state lacks {', '.join(sorted(missing))}")
            run = RunState(**ckpt.state["run"])
            self.optimizer.load_state_dict(ckpt.optimizer)
            if self.sampler is not None:
                self.sampler.load_state_dict(ckpt.state["sampler"])
            self.target_rng.bit_generator.state = ckpt.state["target_rng"]
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CheckpointError(f"{root}: corrupted run state in the newest step checkpoint ({type(err).__name__}: {quote(str(err))})") from None
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)
        self.state = run

    def _write_history(self) -> None:
        lines = "".join(json.dumps(r) + "\n" for r in self.state.history)
        fs.atomic_write_bytes(f"{self.out}/history.jsonl", lines.encode())

    # ------------------------------------------------------------------- loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg = self.cfg
        fs.makedirs(self.out)
        fs.atomic_write_bytes(f"{self.out}/config.yaml", dump_config(cfg).encode())
        if resume and self.resume():
            _log(f"resumed {self.out} at step {self.state.step}")
        bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, disable=not cfg.train.progress, desc=f"{cfg.name} [{cfg.method}]", dynamic_ncols=True)
        while self.state.step < cfg.train.max_steps:
            step = self.state.step
            t_step = time.perf_counter()
            replaced = getattr(self.runner, "worker_replacements", 0)
            info = self.step(step)
            self.state.train_seconds += time.perf_counter() - t_step
            self.state.step = step + 1
            row = {"step": step + 1, **{k: v for k, v in info.items() if isinstance(v, (int, float, dict))}}
            if getattr(self.runner, "worker_replacements", 0) > replaced:  # Ray workers lost this step
                row["worker_replacements"] = self.runner.worker_replacements - replaced
            bar.update(1)
            bar.set_postfix(loss=f"{info.get('loss', info.get('target_loss', float('nan'))):.4f}", refresh=False)
            stop = False
            if (step + 1) % cfg.train.eval_every == 0 or step + 1 == cfg.train.max_steps:
                t_eval = time.perf_counter()
                val = target_metrics(self.problem, "val")
                self.state.eval_seconds += time.perf_counter() - t_eval
                self.state.evals += 1
                row["val"] = val
                row["train_seconds"] = round(self.state.train_seconds, 2)
                if val["NDCG@10"] > self.state.best_ndcg:
                    self.state.best_ndcg, self.state.best_step, self.state.best_val = val["NDCG@10"], step + 1, val
                    self.state.evals_since_best = 0
                    self.save(BEST, with_optimizer=False)
                else:
                    self.state.evals_since_best += 1
                    stop = self.state.evals_since_best >= cfg.train.patience
                _log(f"step {step + 1}: val NDCG@10 {val['NDCG@10']:.5f} (best {self.state.best_ndcg:.5f} @ {self.state.best_step})")
            self.state.history.append(row)
            if "val" in row:
                self._write_history()
            if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                self._write_history()
                self.save(f"step-{step + 1:08d}", with_optimizer=True)
                prune_checkpoints(f"{self.out}/checkpoints", cfg.train.keep_checkpoints)
            if "val" in row and self.on_eval is not None:
                self.on_eval(row, self)
            self._after_step(row)
            if stop:
                _log(f"early stop at step {step + 1}: no improvement in {cfg.train.patience} evaluations")
                break
        bar.close()
        self._write_history()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        best = load_checkpoint(f"{self.out}/checkpoints/{BEST}")
        restore_model(self.model, best.params, self.out)
        test = target_metrics(self.problem, "test")
        metrics = {
            "method": self.cfg.method,
            "best_step": self.state.best_step,
            "steps": self.state.step,
            "train_seconds": round(self.state.train_seconds, 3),
            "eval_seconds": round(self.state.eval_seconds, 3),
            "eval_users_per_s": round(self.state.evals * self.state.best_val.get("n_users", 0) / max(self.state.eval_seconds, 1e-9), 1),
            "val": self.state.best_val,
            "test": test,
            "source_weights": _weights_over_time(self.state.history),
            "worker_replacements": sum(r.get("worker_replacements", 0) for r in self.state.history),
        }
        fs.atomic_write_bytes(f"{self.out}/metrics.json", json.dumps(metrics, indent=1).encode())
        if self.runner is not None:
            self.runner.close()
        return metrics


def _weights_over_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"step": r["step"], **r["weights"]} for r in history if isinstance(r.get("weights"), dict)]


def train(cfg: Config, out_dir: str, *, resume: bool = False, runner_factory=None, on_eval=None,
          refuse_existing: bool = False) -> dict[str, Any]:
    """Train per `cfg` into `out_dir` (locked, checked first: `metarec.run_dir`); returns the
    metrics written to metrics.json. `refuse_existing`: refuse a directory holding a started run."""
    from metarec.run_dir import open_run

    with open_run(out_dir, cfg, resume=resume, refuse_existing=refuse_existing):
        return Trainer(cfg, out_dir, runner_factory, on_eval).fit(resume=resume)


def evaluate_run(run_dir: str) -> dict[str, float]:
    """Recompute the test metrics of a run directory from its best checkpoint."""
    run_dir = run_dir.rstrip("/")
    cfg = load_run_config(run_dir)
    problem = build_problem(cfg)
    best = load_checkpoint(f"{run_dir}/checkpoints/{BEST}")
    restore_model(problem.model, best.params, run_dir)
    return target_metrics(problem, "test")
