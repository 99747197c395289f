"""`metarec tune SPACE`: a Ray Tune sweep over τ, VQ heads, α, β (docs/design.md §6, "Tune").

Each trial trains one MetaRec run (`metarec.train.train`) into
`<experiment>/<trial_id>/run/` and, after every validation, reports the target
validation metrics with a Tune checkpoint holding the run's `step-N` and `best`
checkpoints (`train.checkpoint_every` is set to `train.eval_every`, so every report has
one). ASHA (mode max, time in evaluations) stops weak trials early. A restored trial
(after a failure or `--resume`) replaces its run's checkpoints with the Tune checkpoint
and continues from it, so its reports go on where they stopped. `--resume` restores the
whole experiment (`Tuner.restore`): finished trials are not run again. Before that, the
store's seal is checked (`tune.seal`): a store this user's sweep did not write, or one
altered since, is refused before anything in it is unpickled.

At the end the experiment directory gets `results.json` / `results.md` (one row per
trial: sampled parameters, best validation metric, test metrics, evaluations),
`best_config.yaml` (ready for `metarec train`) and `sweep.png` (validation metric vs τ,
coloured by heads; needs matplotlib).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import pyarrow.fs as pafs

from metarec import fs
from metarec.callbacks import Callback
from metarec.config import NAME_PATTERN, dump_config
from metarec.errors import ConfigError, MetaRecError, quote
from metarec.run_dir import METRICS_FILE, RunDir
from tune.progress import TrialProgress
from tune.seal import SealCallback, verify, write_seal
from tune.space import SearchSpace, load_space

DEFAULT_STORAGE = "runs/tune"
RUN = "run"  # a trial's metarec run directory, inside its Tune trial directory
STATUS_COMPLETED, STATUS_STOPPED, STATUS_ERROR = "completed", "stopped early", "error"


def _copy_tree(src: str, dest: str) -> None:
    """Copy directory `src` to `dest` (each a local path or URI)."""
    src_fs, src_path = fs.resolve(src)
    dest_fs, dest_path = fs.resolve(dest)
    dest_fs.create_dir(dest_path, recursive=True)
    pafs.copy_files(src_path, dest_path, source_filesystem=src_fs, destination_filesystem=dest_fs)


# ---------------------------------------------------------------- the trial


def trial_run_dir(experiment_uri: str, trial_id: str) -> str:
    return fs.join(experiment_uri, trial_id, RUN)


def _trial_dirname(trial) -> str:
    return trial.trial_id


class TuneReport(Callback):
    """The trial's Trainer callback: after every validation, report the validation metrics
    (`metric` and its best so far) to Tune with a checkpoint of the run `run_dir`'s state."""

    def __init__(self, run_dir: str, metric: str):
        self.run_dir, self.metric = run_dir, metric

    def on_eval(self, row: dict[str, Any], trainer) -> None:
        from ray import tune as ray_tune

        step, metric = row["step"], self.metric
        evals = [r for r in trainer.state.history if "val" in r]
        best = max(evals, key=lambda r: r["val"][metric])
        metrics = {**{k: v for k, v in row["val"].items() if k != "n_users"}, "step": step, f"best_{metric}": best["val"][metric], "best_step": best["step"]}
        run = RunDir(self.run_dir)
        step_dirs = dict(run.step_checkpoints())
        if step not in step_dirs:  # the last step of a run that is not a multiple of eval_every
            ray_tune.report(metrics)
            return
        staging = tempfile.mkdtemp(prefix="metarec-tune-")
        try:  # the checkpoints folder, as Tune's checkpoint: the newest step-N and best
            _copy_tree(step_dirs[step], os.path.join(staging, os.path.basename(step_dirs[step])))
            _copy_tree(run.best_uri, os.path.join(staging, os.path.basename(run.best_uri)))
            ray_tune.report(metrics, checkpoint=ray_tune.Checkpoint.from_directory(staging))
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def metarec_trial(config: dict[str, Any], *, space: SearchSpace, experiment_uri: str) -> None:
    """Tune function trainable: train the trial's config; continue from Tune's checkpoint if restored."""
    from ray import tune as ray_tune

    from metarec import launch
    from metarec.ray.session import set_worker_threads

    set_worker_threads(space.trial_resources["CPU"])
    trial_id = ray_tune.get_context().get_trial_id()
    run_dir = trial_run_dir(experiment_uri, trial_id)
    evals = space.base_config.train.eval_every
    cfg = space.config(config, {"name": f"{space.name}-{trial_id}", "train.checkpoint_every": evals, "train.progress": False})
    if RunDir(run_dir).finished():
        # The trial ran to its end (test metrics written) but an interrupt came before Tune
        # saved that in the experiment state, so `--resume` hands it back: a finished run is
        # never trained or rewritten again; its reports are already in Tune's results.
        return
    ckpt_root = RunDir(run_dir).checkpoints_uri
    fs.remove(ckpt_root)  # Tune's checkpoint (or none) is the trial's state, not what a killed attempt left
    checkpoint = ray_tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as local:
            _copy_tree(local, ckpt_root)
    # runner: ray = the driver runner; Ray is up in the trial and its workers join the
    # trial's placement group, which already holds their resources
    launch.run(
        cfg,
        run_dir,
        "driver" if space.runner == "ray" else "local",
        resume=checkpoint is not None,
        refuse_existing=False,
        check_capacity=False,
        callbacks=[TuneReport(run_dir, space.metric)],
    )


def trial_resources(space: SearchSpace):
    """Placement group of a trial: its driver bundle, plus one bundle per Ray source worker."""
    from ray import tune as ray_tune

    driver = {k: v for k, v in space.trial_resources.items() if v}
    bundles = [driver]
    if space.runner == "ray":
        r = space.base_config.ray
        worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
        bundles += [worker] * r.num_workers
    return ray_tune.PlacementGroupFactory(bundles, strategy="PACK")


# ---------------------------------------------------------------- the tuner


def _check_data(space: SearchSpace) -> None:
    data = space.base_config.data
    for name in (data.target, *data.sources):
        if not fs.exists(fs.join(data.root, name, "manifest.json")):
            raise ConfigError(f"{space.base_config_path}: data.root: no prepared domain '{name}' under {data.root} (run `metarec prepare` first)")


def _storage(uri: str) -> tuple[pafs.FileSystem | None, str]:
    """(storage_filesystem, storage path) for Ray: a local absolute path, or a URI's file system and path."""
    if fs.is_uri(uri):
        return fs.resolve(uri)
    return None, os.path.abspath(os.path.expanduser(uri))


def _unfinished_trials(experiment_path: str, filesystem: pafs.FileSystem | None) -> int:
    """Trials that the saved experiment state (what `--resume` continues) has not finished.

    After Ctrl-C, Tune marks every trial terminated in memory but saves them as pending,
    so the saved state is the one to ask."""
    from ray import tune as ray_tune

    analysis = ray_tune.ExperimentAnalysis(experiment_path, storage_filesystem=filesystem)
    return sum(t.status not in ("TERMINATED", "ERROR") for t in analysis.trials)


def search_algorithm(space: SearchSpace):
    """Random search seeded by the space, running at most `max_concurrent_trials` trials at once.

    The limit goes to the generator itself: Tune ignores `TuneConfig.max_concurrent_trials`
    when the search algorithm is a `BasicVariantGenerator` (it only warns)."""
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=space.seed, max_concurrent=space.max_concurrent_trials or 0)


def _tuner(space: SearchSpace, experiment_uri: str, storage_uri: str, name: str, num_samples: int, resume: bool):
    from ray import tune as ray_tune
    from ray.tune.schedulers import ASHAScheduler

    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(metarec_trial, space=space, experiment_uri=experiment_uri),
        trial_resources(space),
    )
    filesystem, storage_path = _storage(storage_uri)
    if resume:
        _, experiment_path = _storage(experiment_uri)
        return ray_tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True, storage_filesystem=filesystem)
    scheduler = ASHAScheduler(
        metric=space.metric,
        mode="max",
        time_attr="training_iteration",
        max_t=space.max_evaluations + 1,  # a trial ends by itself after its last evaluation (and writes its test metrics)
        grace_period=space.grace_period,
        reduction_factor=space.reduction_factor,
    )
    return ray_tune.Tuner(
        trainable,
        param_space={key: p.ray_domain() for key, p in space.params.items()},
        tune_config=ray_tune.TuneConfig(
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=search_algorithm(space),
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=ray_tune.RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray_tune.FailureConfig(max_failures=space.max_failures),
            checkpoint_config=ray_tune.CheckpointConfig(num_to_keep=2),
            callbacks=[TrialProgress(space.metric, list(space.params)), SealCallback(experiment_uri)],
        ),
    )


# ---------------------------------------------------------------- results


def _trial_row(result, space: SearchSpace, experiment_uri: str) -> dict[str, Any]:
    """One results row: sampled parameters, best validation metric, test metrics, evaluations."""
    from metarec.evaluate import evaluate_run

    trial_id = os.path.basename(result.path.rstrip("/"))
    run_dir = trial_run_dir(experiment_uri, trial_id)
    metrics = result.metrics or {}
    row: dict[str, Any] = {
        "trial_id": trial_id,
        "params": {k: result.config.get(k) for k in space.params},
        f"best_val_{space.metric}": metrics.get(f"best_{space.metric}"),
        "best_step": metrics.get("best_step"),
        "evals": metrics.get("training_iteration", 0),
        "run_dir": run_dir,
    }
    if result.error is not None:
        row.update(status=STATUS_ERROR, test=None, test_source=None, error=str(result.error).strip().splitlines()[-1])
        return row
    run = RunDir(run_dir)
    if run.finished():  # the trial ran to its end (all steps, or patience)
        row.update(status=STATUS_COMPLETED, test=run.read_metrics()["test"], test_source=METRICS_FILE)
    else:  # stopped by ASHA (possibly at a rung on its last evaluation) before it could test: test its best checkpoint now
        row.update(status=STATUS_STOPPED, test=evaluate_run(run_dir), test_source="best checkpoint (evaluate_run)")
    return row


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.5f}".rstrip("0").rstrip(".")
    return "" if value is None else str(value)


def results_markdown(rows: list[dict[str, Any]], space: SearchSpace, experiment_uri: str) -> str:
    best_col = f"best_val_{space.metric}"
    cols = ["trial_id", "status", *space.params, best_col, "test NDCG@10", "test Recall@10", "test MRR", "evals"]
    lines = [f"# Tune sweep `{space.name}`", "", f"- experiment: `{experiment_uri}`", f"- space: `{space.path}` (base config `{space.base_config_path}`)",
             f"- ASHA on validation {space.metric} (max), grace {space.grace_period}, reduction {space.reduction_factor}, max_t {space.max_evaluations} evaluations",
             "- test metrics of early-stopped trials are recomputed from their best checkpoint", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in sorted(rows, key=lambda r: -(r[best_col] if r[best_col] is not None else -1.0)):
        test = r["test"] or {}
        cells = [r["trial_id"], r["status"], *(r["params"][k] for k in space.params), r[best_col],
                 test.get("NDCG@10"), test.get("Recall@10"), test.get("MRR"), r["evals"]]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(rows: list[dict[str, Any]], space: SearchSpace) -> bytes | None:
    """PNG of the best validation metric vs τ, one colour per heads value (None without matplotlib or τ)."""
    from metarec.plots import draw_scatter

    if "rescale.tau" not in space.params:
        return None
    best_col = f"best_val_{space.metric}"
    done = [r for r in rows if r[best_col] is not None]
    groups = {}
    for heads in sorted({r["params"].get("vq.heads") for r in done}, key=str):
        pts = [r for r in done if r["params"].get("vq.heads") == heads]
        label = f"heads={heads}" if "vq.heads" in space.params else None
        groups[label] = ([r["params"]["rescale.tau"] for r in pts], [r[best_col] for r in pts])
    try:
        return draw_scatter(groups, xlabel="τ (rescale.tau)", ylabel=f"best validation {space.metric}", title=space.name, log_x=True)
    except MetaRecError:  # matplotlib is not importable: no plot
        return None


def write_outputs(rows: list[dict[str, Any]], space: SearchSpace, experiment_uri: str) -> dict[str, Any]:
    """results.json/.md, best_config.yaml and sweep.png in the experiment directory; returns the summary."""
    best_col = f"best_val_{space.metric}"
    fs.atomic_write_bytes(fs.join(experiment_uri, "results.json"), (json.dumps(rows, indent=1) + "\n").encode())
    fs.atomic_write_bytes(fs.join(experiment_uri, "results.md"), results_markdown(rows, space, experiment_uri).encode())
    scored = [r for r in rows if r[best_col] is not None]
    summary: dict[str, Any] = {
        "experiment": experiment_uri,
        "trials": len(rows),
        "completed": sum(r["status"] == STATUS_COMPLETED for r in rows),
        "early_stopped": sum(r["status"] == STATUS_STOPPED for r in rows),
        "errored": sum(r["status"] == STATUS_ERROR for r in rows),
        "results": fs.join(experiment_uri, "results.json"),
        "best_trial": None,
        "best_config": None,
        "plot": None,
    }
    if scored:
        best = max(scored, key=lambda r: r[best_col])
        cfg = space.config(best["params"], {"name": f"{space.name}-best"})
        header = f"# best trial {best['trial_id']} of sweep {space.name} ({experiment_uri}): validation {space.metric} {best[best_col]:.5f}\n"
        best_config = fs.join(experiment_uri, "best_config.yaml")
        fs.atomic_write_bytes(best_config, (header + dump_config(cfg)).encode())
        summary.update(best_trial=best["trial_id"], best_params=best["params"], **{best_col: best[best_col]}, best_test=best["test"], best_run_dir=best["run_dir"], best_config=best_config)
    png = plot_sweep(rows, space)
    if png is not None:
        summary["plot"] = fs.join(experiment_uri, "sweep.png")
        fs.atomic_write_bytes(summary["plot"], png)
    return summary


# ---------------------------------------------------------------- entry point


def run_sweep(
    space_path: str,
    *,
    num_samples: int | None = None,
    ray_address: str | None = None,
    storage_path: str | None = None,
    name: str | None = None,
    resume: bool = False,
    overrides: tuple[str, ...] | list[str] = (),
) -> dict[str, Any]:
    """Validate the space, run (or `resume`) the sweep, write the result files; returns a summary.

    `storage_path`: CLI > space file > `runs/tune`; the experiment is `<storage_path>/<name>`.
    Ray: joins `ray_address`, or starts a local instance (127.0.0.1, no dashboard) and
    shuts it down at the end; an already initialised Ray is used as is.
    `overrides`: `--set KEY=VALUE` strings applied to every trial's config after the
    space file's `overrides` (e.g. a smaller `train.max_steps`); pass the same ones with
    `resume`.
    """
    from ray import tune as ray_tune

    from metarec.ray.session import connect

    space = load_space(space_path, overrides)
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--num-samples: must be >= 1, got {num_samples}")
    _check_data(space)
    where = "--name" if name is not None else f"{space_path}: name"
    name = space.name if name is None else name
    if not re.fullmatch(NAME_PATTERN, name):
        raise ConfigError(f"{where} {quote(name)}: an experiment name is one directory under the storage path "
                          "(letters, digits, '.', '_', '-'; no '/', not starting with '.')")
    storage_uri = fs.local_path(storage_path or space.storage_path or DEFAULT_STORAGE)
    if not fs.is_uri(storage_uri):
        storage_uri = os.path.abspath(os.path.expanduser(storage_uri))
    experiment_uri = fs.join(storage_uri, name)
    filesystem, experiment_path = _storage(experiment_uri)
    exists = ray_tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem)
    if resume and not exists:
        raise ConfigError(f"{experiment_uri}: no sweep to resume here (check --storage-path and --name)")
    if not resume and exists:
        raise ConfigError(f"{experiment_uri}: already holds a sweep; pass --resume to continue it or --name for a new one")

    if resume:
        verify(experiment_uri)  # before Tune unpickles anything of the store

    import ray

    started = not ray.is_initialized()
    connect(ray_address)
    fitted = False
    try:
        tuner = _tuner(space, experiment_uri, storage_uri, name, num_samples or space.num_samples, resume)
        try:
            grid = tuner.fit()
            fitted = True
        finally:
            write_seal(experiment_uri)
    finally:
        if started:
            from metarec.ray.session import shutdown

            shutdown(keep_logs=not fitted)  # a local instance's logs are kept if the sweep failed
    unfinished = _unfinished_trials(experiment_path, filesystem)
    if unfinished:  # Ctrl-C: Tune saved the state and returned early
        raise MetaRecError(
            f"{experiment_uri}: sweep interrupted with {unfinished} unfinished trials; "
            f"continue it with: metarec tune {space_path} --resume --storage-path {storage_uri} --name {name}"
            + "".join(f" --set {text}" for text in overrides)
        )
    rows = [_trial_row(result, space, experiment_uri) for result in grid]
    return write_outputs(rows, space, experiment_uri)
