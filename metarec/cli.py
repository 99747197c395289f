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
    from metarec.ray import raylet_watch

    raylet_watch.enable()  # if the raylet of a local Ray instance dies: one line, exit 2
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
    _shutdown_ray(keep_logs=code not in (0, 128 + signal.SIGTERM))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _shutdown_ray(*, keep_logs: bool) -> None:
    """Stop the Ray processes this command started (os._exit would skip Ray's atexit hook
    and leave its agents orphaned) and, unless `keep_logs` (the command failed), delete the
    local instance's session folder; a no-op when Ray was never used."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            from metarec.ray.session import shutdown

            shutdown(keep_logs=keep_logs)
        except Exception as err:  # noqa: BLE001 - exiting anyway; say why Ray may linger
            print(f"warning: ray.shutdown() failed: {err}", file=sys.stderr)


@cli.command()
@click.argument("input_uri")
@click.option("--format", "fmt", type=click.Choice(["sequences", "interactions", "recbole"]), default="sequences", show_default=True,
              help="recbole: NAME.inter, or the NAME.train/.valid/.test.inter split triple")
@click.option("--name", required=True, help="domain name (directory under --out)")
@click.option("--out", "out_root", required=True, help="root of prepared domains (local dir or s3://...)")
@click.option("--user-col", default=None, help="user column [interactions: user; recbole: user_id]")
@click.option("--item-col", default=None, help="item column [interactions: item; recbole: item_id]")
@click.option("--time-col", default=None, help="timestamp column [interactions: timestamp; recbole: timestamp if present]")
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
    from metarec import fs, launch

    cfg = _load(config_path, overrides)
    out_dir = fs.local_path(out_dir or f"runs/{cfg.name}")  # file:// is a local path (lock, atomic renames)
    mode = launch.pick_mode(cfg, ray=bool(use_ray or ray_address), ray_train=use_ray_train)
    metrics = launch.run(cfg, out_dir, mode, address=ray_address, workers=workers, resume=resume, config_path=config_path)
    click.echo(json.dumps({"run_dir": out_dir, "best_step": metrics["best_step"], "test": metrics["test"]}, indent=1))


@cli.command()
@click.argument("run_dir")
@_user_errors
def evaluate(run_dir):
    """Recompute RUN_DIR's test metrics from its best checkpoint; print them as JSON."""
    from metarec.evaluate import evaluate_run

    click.echo(json.dumps(evaluate_run(run_dir), indent=1))


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True)
@click.option("--baseline", default=None, help="the run the others are compared with (default: the first)")
@click.option("--json", "as_json", is_flag=True, help="print the table and intervals as JSON")
@click.option("--seed", type=int, default=0, show_default=True, help="seed of the bootstrap resampling")
@_user_errors
def compare(run_dirs, baseline, as_json, seed):
    """Test metrics of RUN_DIRS (local or s3://) side by side, with each run's paired difference
    from the baseline and its 95% bootstrap interval over the target's test users."""
    from metarec.compare import compare_runs, format_table

    result = compare_runs(list(run_dirs), baseline=baseline, seed=seed)
    click.echo(json.dumps(result, indent=1) if as_json else format_table(result))


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
@click.option("--all-users", is_flag=True, help="top-k of every target user into the Parquet file --out")
@click.option("--out", default=None, help="with --all-users: the Parquet file to write (local or s3://)")
@click.option("-k", "k", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=None, help="with --all-users: users per chunk [train.eval_batch_size]")
@click.option("--ray", "use_ray", is_flag=True, help="with --all-users: score with Ray Data on a local Ray")
@click.option("--ray-address", default=None, help="with --all-users: score with Ray Data on a Ray cluster (auto or ADDRESS)")
@click.option("--workers", type=int, default=None, help="with --ray: scoring actors [one per GPU, else per CPU]")
@_user_errors
def recommend(run_dir, user, history, all_users, out, k, batch_size, use_ray, ray_address, workers):
    """Top-k items for a user, a history, or every target user (--all-users), from RUN_DIR's best checkpoint."""
    from metarec.errors import MetaRecError
    from metarec.recommend import recommend as top_k

    if all_users:
        from metarec.recommend_all import recommend_all_users

        if user is not None or history is not None or out is None:
            raise MetaRecError("--all-users writes every user's top-k to --out PATH.parquet; give --out, and no --user or --history")
        if workers is not None and not (use_ray or ray_address):
            raise MetaRecError("--workers sets the Ray Data scoring actors: give it with --ray or --ray-address")
        click.echo(json.dumps(recommend_all_users(run_dir, out, k=k, batch_size=batch_size, use_ray=use_ray,
                                                  ray_address=ray_address, workers=workers), indent=1))
        return
    if out is not None or use_ray or ray_address or batch_size is not None or workers is not None:
        raise MetaRecError("--out, --batch-size, --ray, --ray-address and --workers go with --all-users")
    if (user is None) == (history is None):
        raise MetaRecError("give exactly one of --user ID or --history \"i1 i2 ...\" (or --all-users --out PATH.parquet)")
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
