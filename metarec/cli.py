"""`metarec` command line. User-facing errors print as one line, exit status 2."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys

import click

from metarec.errors import MetaRecError, bounded, describe_os_error


def _user_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MetaRecError as err:
            click.echo(f"error: {bounded(str(err))}", err=True)
            sys.exit(2)
        except OSError as err:  # disk full, permission denied, a file where a directory belongs...
            click.echo(f"error: {bounded(describe_os_error(err))}", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="metarec")
def cli() -> None:
    """metarec: meta-training for transferable sequential recommendation (MetaRec)."""


def main() -> None:
    """Console entry point.

    Exits with os._exit after flushing: with torch and pyarrow both loaded, the
    interpreter's teardown sometimes aborts ("terminate called without an active
    exception", apache/arrow#34314) after the work has finished and its output is
    written, which would turn a successful command into exit status 134.
    """
    code = 0
    terminated: list[int] = []

    def on_sigterm(signum, _frame):  # clean up Ray on kill too
        terminated.append(signum)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        cli.main(standalone_mode=True)
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        if not terminated:
            import traceback

            traceback.print_exc()
        code = 1
    if terminated:  # 143 however the exit surfaced (ray.get turns the SystemExit into SystemExit(1))
        code = 128 + terminated[0]
    _shutdown_ray()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _shutdown_ray() -> None:
    """Stop the Ray processes this command started (os._exit would skip Ray's atexit hook
    and leave its agents orphaned); a no-op when Ray was never used."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
            from metarec.runners.ray_sessions import forget

            forget()  # nothing of this driver's local Ray instance is left to reap
        except Exception as err:  # noqa: BLE001 - exiting anyway; say why Ray may linger
            print(f"warning: ray.shutdown() failed: {err}", file=sys.stderr)


@cli.command()
@click.argument("input_uri")
@click.option("--format", "fmt", type=click.Choice(["sequences", "interactions"]), default="sequences", show_default=True)
@click.option("--name", required=True, help="domain name (directory under --out)")
@click.option("--out", "out_root", required=True, help="root of prepared domains (local dir or s3://...)")
@click.option("--user-col", default="user", show_default=True)
@click.option("--item-col", default="item", show_default=True)
@click.option("--time-col", default="timestamp", show_default=True)
@click.option("--rating-col", default=None, help="rating column (with --min-rating)")
@click.option("--min-rating", type=float, default=None, help="keep interactions with rating >= this")
@click.option("--min-user", type=int, default=0, show_default=True, help="k-core: min interactions per user")
@click.option("--min-item", type=int, default=0, show_default=True, help="k-core: min interactions per item")
@click.option("--overwrite", is_flag=True, help="replace an existing, different domain of the same name")
@_user_errors
def prepare(input_uri, fmt, name, out_root, user_col, item_col, time_col, rating_col, min_rating, min_user, min_item, overwrite):
    """Prepare INPUT_URI (file or s3:// URI) as domain NAME under --out."""
    from metarec.data.prepare import prepare_domain

    path = prepare_domain(
        input_uri, out_root, name, fmt,
        user_col=user_col, item_col=item_col, time_col=time_col, rating_col=rating_col,
        min_rating=min_rating, min_user=min_user, min_item=min_item, overwrite=overwrite,
    )
    from metarec import fs

    click.echo(fs.read_bytes(f"{path}/manifest.json").decode())


def _load(config_path, overrides):
    from metarec.config import load_config

    return load_config(config_path, overrides)


@cli.command()
@click.argument("config_path", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a config key, e.g. --set train.lr=3e-4")
@click.option("--out", "out_dir", default=None, help="run directory (local or s3://); default runs/<name>")
@click.option("--resume", is_flag=True, help="continue from the newest complete checkpoint in the run directory")
@click.option("--ray", "use_ray", is_flag=True, help="run source tasks in Ray actors on a local Ray instance")
@click.option("--ray-address", default=None, help="join a Ray cluster (auto or ADDRESS) and run source tasks there")
@click.option("--ray-train", "use_ray_train", is_flag=True,
              help="run the whole training loop on Ray Train workers: baselines data-parallel, MetaRec collective")
@click.option("--workers", type=int, default=None, help="Ray workers (sets ray.num_workers; must fit the cluster)")
@_user_errors
def train(config_path, overrides, out_dir, resume, use_ray, ray_address, use_ray_train, workers):
    """Train per CONFIG_PATH into a run directory (config, history, metrics, checkpoints)."""
    from metarec.fs import local_path
    from metarec.train import train as run_training

    cfg = _load(config_path, overrides)
    out_dir = local_path(out_dir or f"runs/{cfg.name}")  # file:// is a local path (lock, atomic renames)
    if workers is not None:
        _set_workers(cfg, workers)
    if use_ray_train or ((use_ray or ray_address) and cfg.method == "metarec" and cfg.ray.mode == "collective"):
        metrics = _train_on_ray_train(cfg, out_dir, resume, ray_address, exact_workers=workers is not None)
        click.echo(json.dumps({"run_dir": out_dir, "best_step": metrics["best_step"], "test": metrics["test"]}, indent=1))
        return
    from metarec.runtime import cpu_time_warning

    warning = cpu_time_warning(cfg, config_path)
    if warning:
        click.echo(warning, err=True)
    runner_factory = None
    if use_ray or ray_address:
        from metarec.runners.ray_runner import ray_runner_factory

        if cfg.method == "metarec":
            _fit_ray_workers(cfg, ray_address)
        runner_factory = ray_runner_factory(address=ray_address)
    metrics = run_training(cfg, out_dir, resume=resume, runner_factory=runner_factory, refuse_existing=True)
    click.echo(json.dumps({"run_dir": out_dir, "best_step": metrics["best_step"], "test": metrics["test"]}, indent=1))


def _set_workers(cfg, workers: int) -> None:
    from metarec.errors import ConfigError

    if workers < 1:
        raise ConfigError(f"--workers {workers}: the number of Ray workers must be at least 1")
    cfg.ray.num_workers = workers


def _train_on_ray_train(cfg, out_dir, resume, ray_address, *, exact_workers: bool) -> dict:
    """`--ray-train` (or `ray.mode: collective`): the training loop on Ray Train workers."""
    from metarec.run_dir import open_run
    from metarec.ray_train import fit_with_ray_train

    local = _fit_ray_workers(cfg, ray_address, exact=exact_workers)
    with open_run(out_dir, cfg, resume=resume, refuse_existing=True):
        return fit_with_ray_train(cfg, out_dir, local=local, resume=resume)


def _fit_ray_workers(cfg, ray_address, exact: bool = False) -> bool:
    """Connect to Ray now and check that it can place the workers (metarec.runners.capacity);
    `exact` (an explicit --workers): refuse rather than lower the count. True for a local Ray."""
    from metarec.runners.capacity import fit_ray_workers
    from metarec.runners.ray_runner import connect

    address = ray_address or os.environ.get("RAY_ADDRESS")
    connect(ray_address)
    where = f"the Ray cluster at {address}" if address else "this machine's local Ray"
    notice = fit_ray_workers(cfg, local=not (address or exact), where=where)
    if notice:
        click.echo(notice, err=True)
    return not address


@cli.command()
@click.argument("run_dir")
@_user_errors
def evaluate(run_dir):
    """Recompute RUN_DIR's test metrics from its best checkpoint; print them as JSON."""
    from metarec.evaluate import evaluate_run

    click.echo(json.dumps(evaluate_run(run_dir), indent=1))


@cli.command()
@click.option("--out", "out_dir", default="runs/demo", show_default=True, help="where data, runs and demo.json go")
@click.option("--quick", is_flag=True, help="shorter budget (CI)")
@click.option("--seed", type=int, default=0, show_default=True)
@_user_errors
def demo(out_dir, quick, seed):
    """Synthetic multi-domain problem: target-only LRURec vs MetaRec, side by side."""
    from metarec.demo import format_table, run_demo

    table = run_demo(out_dir, quick=quick, seed=seed)
    click.echo(format_table(table))
    click.echo(f"runs, plots and demo.json under {out_dir}")


@cli.command()
@click.argument("run_dir")
@click.option("--user", default=None, help="a user id of the target domain (original key)")
@click.option("--history", default=None, help='item keys, oldest first, e.g. "i1 i2 i3"')
@click.option("-k", "k", type=int, default=10, show_default=True)
@_user_errors
def recommend(run_dir, user, history, k):
    """Top-k items for a user or a history, from RUN_DIR's best checkpoint."""
    from metarec.errors import MetaRecError, bounded, describe_os_error
    from metarec.recommend import recommend as top_k

    if (user is None) == (history is None):
        raise MetaRecError("give exactly one of --user ID or --history \"i1 i2 ...\"")
    click.echo(json.dumps(top_k(run_dir, user=user, history=history.split() if history is not None else None, k=k), indent=1))


@cli.command()
@click.argument("run_dir")
@_user_errors
def plot(run_dir):
    """(Re)draw RUN_DIR's training curves and source-weight heatmap as PNG."""
    from metarec.plots import plot_run

    for path in plot_run(run_dir):
        click.echo(path)


@cli.command()
@click.argument("space", type=click.Path(dir_okay=False))
@click.option("--num-samples", type=int, default=None, help="trials (default: the space file's num_samples)")
@click.option("--ray-address", default=None, help="join a Ray cluster (auto or ADDRESS); default: local Ray")
@click.option("--storage-path", default=None, help="where Tune keeps trial results (dir or s3://)")
@click.option("--name", default=None, help="experiment name (default: the space file's name)")
@click.option("--resume", is_flag=True, help="continue an interrupted sweep (Tuner.restore; give the same --set)")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a key of every trial's config, e.g. --set train.max_steps=200")
@_user_errors
def tune(space, num_samples, ray_address, storage_path, name, resume, overrides):
    """Ray Tune sweep over tau, VQ heads and the inner/outer learning rates.

    Prints a line per trial report (stderr) besides Ray's status tables."""
    from tune.sweep import run_sweep

    summary = run_sweep(space, num_samples=num_samples, ray_address=ray_address, storage_path=storage_path, name=name, resume=resume, overrides=overrides)
    click.echo(json.dumps(summary, indent=1))


if __name__ == "__main__":  # pragma: no cover
    main()
