"""The training loop: target-only, joint, or MetaRec, locally or with Ray workers.

Read it top to bottom: per step either
- target-only: one optimizer step on the target cross-entropy;
- joint (`meta.enabled: false`): one step on source + target losses of the sampled tasks;
- MetaRec: the runner computes each task's meta gradient (`run_task`), the driver
  softmax-rescales them per tensor and applies the outer update (docs/design.md §4);
every step ends in `metarec.optimizer.clip_check_step`. Validate every `eval_every`
steps, keep the best-validation checkpoint, stop early, test once with the best
parameters.

The trainer takes a `Problem` (data + model + device, `metarec.problem`), a run
directory (`metarec.run_dir.RunDir`, which owns every file it writes) and, for MetaRec,
a runner (`LocalRunner` by default, or `RayRunner`). `metarec.launch` opens the run
directory (lock, start/resume checks) and builds all three from a config.

It is extended in one way, never by a subclass: a data-parallel `strategy`
(`metarec.parallel`: which rows of a batch this process takes, how its gradients are
averaged; `SingleProcess` by default) and a list of `callbacks` (`metarec.callbacks`:
called at the start of each step, with its row, after each validation, at its end).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from metarec.callbacks import Callback
from metarec.checkpoint import Checkpoint, check_optimizer_state, restore_model
from metarec.config import Config
from metarec.errors import CheckpointError, quote
from metarec.meta.joint import joint_loss
from metarec.meta.outer import apply_meta_update
from metarec.meta.rescale import SimilarityState, check_similarity_state
from metarec.meta.tasks import TaskSampler
from metarec.objective import domain_loss
from metarec.optimizer import clip_check_step, make_optimizer
from metarec.parallel import SingleProcess, Strategy
from metarec.problem import Problem, build_problem, target_metrics
from metarec.data.batches import epoch_order_rows
from metarec.data.domain import data_fingerprint
from metarec.run_dir import DATA_KEY, RunDir, check_data
from metarec.runners.local import LocalRunner


def _log(message: str) -> None:
    """Progress messages go to stderr (stdout is for results), above any progress bar."""
    tqdm.write(message, file=sys.stderr)


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


class Trainer:
    """The loop of one run over `problem`, writing into `run_dir`.

    `runner` (MetaRec only): runs each iteration's tasks (`run_tasks(params, specs)`,
    `close()`); default `LocalRunner` on the problem's task context. `strategy`: how the
    data-parallel processes share a batch (`metarec.parallel`; default `SingleProcess`).
    `callbacks`: `metarec.callbacks.Callback`s, called in order during `fit`.
    """

    def __init__(
        self,
        problem: Problem,
        run_dir: str | RunDir,
        runner: Any = None,
        *,
        strategy: Strategy | None = None,
        callbacks: Sequence[Callback] = (),
    ):
        self.problem = problem
        self.cfg = cfg = problem.cfg
        self.strategy = strategy if strategy is not None else SingleProcess()
        self.callbacks = list(callbacks)
        self.run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.out = self.run.uri
        self.model = problem.model
        self.optimizer = make_optimizer(self.model, cfg)
        self.state = RunState()
        self.sampler = None if cfg.method == "target_only" else TaskSampler.from_config(cfg, problem.windows)
        self.target_rng = np.random.default_rng(cfg.seed)  # target-only batches
        self.similarity: SimilarityState = {}  # rescale.smoothing's per-source averages
        self.runner = None
        if cfg.method == "metarec":
            self.runner = runner if runner is not None else LocalRunner(problem.task_context())

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        run_dir: str | RunDir,
        runner_factory: Callable[[Problem], Any] | None = None,
        *,
        strategy: Strategy | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> "Trainer":
        """Build the problem of `cfg` and, for MetaRec, the runner `runner_factory(problem)`."""
        problem = build_problem(cfg)
        runner = runner_factory(problem) if runner_factory is not None and cfg.method == "metarec" else None
        return cls(problem, run_dir, runner, strategy=strategy, callbacks=callbacks)

    # ------------------------------------------------------------------ steps

    def _target_only_step(self, step: int) -> dict[str, float]:
        windows = self.problem.windows[self.problem.target]
        if self.cfg.train.batch_order == "epoch":
            rows = epoch_order_rows(len(windows), self.cfg.train.batch_size, step, self.cfg.seed)
        else:
            rows = windows.sample_rows(self.target_rng, self.cfg.train.batch_size)
        inputs, labels = windows.batch(self.strategy.shard(rows))
        params = dict(self.model.named_parameters())
        parts = domain_loss(self.model, params, self.problem.target, inputs.to(self.problem.device), labels.to(self.problem.device), target=self.problem.target, fused_ce=True)
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        return self._finish_step(parts.total, step, {"target_loss": parts.rec.detach()})

    def _joint_step(self, step: int) -> dict[str, float]:
        shard = self.strategy.shard
        specs = [replace(s, source_rows=shard(s.source_rows), target_rows=shard(s.target_rows))
                 for s in self.sampler.sample(step)]
        params = dict(self.model.named_parameters())
        loss, stats = joint_loss(self.model, params, specs, self.problem.task_context())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self._finish_step(loss, step, stats)

    def _finish_step(self, loss: torch.Tensor, step: int, stats: dict[str, Any]) -> dict[str, float]:
        """Average over the processes, check, clip (`train.grad_clip`), step; tensor stats
        come to the host in one transfer."""
        self.strategy.sync_grads(self.model.parameters(), step)
        clip_check_step(dict(self.model.named_parameters()), self.optimizer, self.cfg.train.grad_clip, step, loss=loss)
        keys = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
        loss_value, *values = torch.stack([loss.detach(), *(stats[k] for k in keys)]).cpu().tolist()
        return {"loss": loss_value, **stats, **dict(zip(keys, values))}

    def _meta_step(self, step: int) -> dict[str, Any]:
        specs = self.sampler.sample(step)
        theta = {n: p.detach() for n, p in self.model.named_parameters()}
        results = self.runner.run_tasks(theta, specs)
        self.optimizer.zero_grad(set_to_none=True)
        params = dict(self.model.named_parameters())
        stats = apply_meta_update(params, self.optimizer, results, self.cfg, step, reduce=getattr(self.runner, "reduce", None),
                                  similarity=self.similarity)
        self.similarity = stats.pop("similarity")
        return stats

    def step(self, step: int) -> dict[str, Any]:
        self.model.train()
        if self.cfg.method == "target_only":
            return self._target_only_step(step)
        if self.cfg.method == "joint":
            return self._joint_step(step)
        return self._meta_step(step)

    # ------------------------------------------------------------ checkpoints

    def _state_payload(self) -> dict[str, Any]:
        return {"run": self.state.to_json(), "sampler": self.sampler.state_dict() if self.sampler else None, "target_rng": self.target_rng.bit_generator.state, "config": self.cfg.to_dict(),
                "similarity": self.similarity,
                DATA_KEY: data_fingerprint(self.problem.domains)}

    def resume(self, run: RunDir | None = None) -> bool:
        """Restore the newest complete step checkpoint of `run` (default: this run); False if none."""
        run = run or self.run
        root = run.checkpoints_uri
        ckpt = run.latest_step_checkpoint()
        if ckpt is None:
            if run.step_checkpoints():
                raise CheckpointError(f"{root}: every step checkpoint is torn or unreadable; nothing to resume from")
            return False
        self.restore(ckpt, root, where=run.uri)
        return True

    def restore(self, ckpt: Checkpoint, root: str, where: str) -> None:
        """Parameters, optimizer, sampler, RNGs and counters from a step checkpoint
        (errors name `where`, the run, and `root`, its checkpoints)."""
        check_data(ckpt.state, data_fingerprint(self.problem.domains), root)
        restore_model(self.model, ckpt.params, where)
        if ckpt.optimizer is None:
            raise CheckpointError(f"{where}: step checkpoint has no optimizer state")
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
            similarity = check_similarity_state(ckpt.state.get("similarity", {}))  # absent in runs before rescale.smoothing
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise CheckpointError(f"{root}: corrupted run state in the newest step checkpoint ({type(err).__name__}: {quote(str(err))})") from None
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)
        self.state = run
        self.similarity = similarity

    # ------------------------------------------------------------------- loop

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train from the current state to `train.max_steps` (or an early stop), then test;
        returns the final metrics. `resume`: first restore this run's newest step checkpoint
        (a state restored before the call, `resume(run)` or `restore`, is continued too)."""
        cfg = self.cfg
        if resume:
            self.resume()  # refuses a checkpoint it cannot continue before anything is written
        self.run.write_config(cfg)
        if self.state.step:  # resumed here, or restored before `fit` (a restarted Ray Train worker)
            _log(f"resumed {self.out} at step {self.state.step}")
        bar = tqdm(total=cfg.train.max_steps, initial=self.state.step, disable=not cfg.train.progress, desc=f"{cfg.name} [{cfg.method}]", dynamic_ncols=True)
        while self.state.step < cfg.train.max_steps:
            step = self.state.step
            for callback in self.callbacks:
                callback.on_step_begin(step, self)
            t_step = time.perf_counter()
            replaced = getattr(self.runner, "worker_replacements", 0)
            info = self.step(step)
            self.state.train_seconds += time.perf_counter() - t_step
            self.state.step = step + 1
            row = {"step": step + 1, **{k: v for k, v in info.items() if isinstance(v, (int, float, dict))}}
            if getattr(self.runner, "worker_replacements", 0) > replaced:  # Ray workers lost this step
                row["worker_replacements"] = self.runner.worker_replacements - replaced
            for callback in self.callbacks:
                callback.on_step_row(row, self)
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
                if val["NDCG@10"] > self.state.best_ndcg or cfg.data.train_on_validation:  # a refit keeps the last step
                    self.state.best_ndcg, self.state.best_step, self.state.best_val = val["NDCG@10"], step + 1, val
                    self.state.evals_since_best = 0
                    self.run.save_best(self.model, self._state_payload())
                else:
                    self.state.evals_since_best += 1
                    stop = self.state.evals_since_best >= cfg.train.patience
                _log(f"step {step + 1}: val NDCG@10 {val['NDCG@10']:.5f} (best {self.state.best_ndcg:.5f} @ {self.state.best_step})")
            self.state.history.append(row)
            if "val" in row:
                self.run.write_history(self.state.history)
            if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
                self.run.write_history(self.state.history)
                self.run.save_step(step + 1, self.model, self.optimizer, self._state_payload(), cfg.train.keep_checkpoints)
            if "val" in row:
                for callback in self.callbacks:
                    callback.on_eval(row, self)
            for callback in self.callbacks:
                callback.on_step_end(row, self)
            if stop:
                _log(f"early stop at step {step + 1}: no improvement in {cfg.train.patience} evaluations")
                break
        bar.close()
        self.run.write_history(self.state.history)
        return self.finish()

    def finish(self) -> dict[str, Any]:
        self.run.restore_best(self.model)
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
        self.run.write_metrics(metrics)
        if self.runner is not None:
            self.runner.close()
        return metrics


def _weights_over_time(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"step": r["step"], **r["weights"]} for r in history if isinstance(r.get("weights"), dict)]


def train(cfg: Config, out_dir: str, *, resume: bool = False, runner_factory=None, callbacks: Sequence[Callback] = (),
          refuse_existing: bool = False) -> dict[str, Any]:
    """Train per `cfg` into `out_dir` in this process (`metarec.launch.fit_in_run_dir`, which
    opens the run directory); returns the final metrics the run directory records.
    `refuse_existing`: refuse a directory holding a started run."""
    from metarec.launch import fit_in_run_dir

    return fit_in_run_dir(cfg, out_dir, resume=resume, refuse_existing=refuse_existing, runner_factory=runner_factory, callbacks=callbacks)
