"""How a run starts: the one place that opens the run directory, picks the mode and
builds the runner (docs/design.md §6). `metarec train`, `metarec tune`'s trials and
`metarec demo` all start their runs here.

Modes: `local` (the Trainer with the in-process runner), `driver` (MetaRec's tasks in
Ray actors, the driver steps), `collective` (MetaRec on Ray Train workers that
all-reduce) and `ray_train` (target-only and joint data-parallel on Ray Train workers).
`pick_mode` turns the user's choice (`--ray`, `--ray-train`) and the config into one.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from metarec import fs
from metarec.callbacks import Callback
from metarec.config import Config
from metarec.errors import ConfigError
from metarec.run_dir import open_run

MODES = ("local", "driver", "collective", "ray_train")


def pick_mode(cfg: Config, *, ray: bool = False, ray_train: bool = False) -> str:
    """`ray_train` (--ray-train): the training loop on Ray Train workers (collective for
    MetaRec); `ray` (--ray, --ray-address): MetaRec's tasks on Ray per `ray.mode`; a
    target-only or joint run with `ray` alone has no tasks to send and runs locally."""
    if ray_train:
        return "collective" if cfg.method == "metarec" else "ray_train"
    if ray and cfg.method == "metarec":
        return cfg.ray.mode
    return "local"


def run(
    cfg: Config,
    out: str,
    mode: str = "local",
    address: str | None = None,
    workers: int | None = None,
    resume: bool = False,
    *,
    refuse_existing: bool = True,
    check_capacity: bool = True,
    callbacks: Sequence[Callback] = (),
    config_path: str | None = None,
) -> dict[str, Any]:
    """Train `cfg` into the run directory `out` in `mode` (one of MODES); returns the
    final metrics. `address`: a Ray cluster (default: a private local Ray); `workers`
    (an explicit --workers) sets `ray.num_workers`: on Ray Train it must fit, the driver
    runner on a local Ray lowers it to what fits (with a notice); `check_capacity=False`
    skips the placement check where the workers' resources are already reserved (a Tune
    trial); `config_path` names the config in the CPU-time warning of a local run;
    `callbacks` (local and driver modes: they run in this process) go to the Trainer."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
    if callbacks and mode in ("collective", "ray_train"):
        raise ValueError(f"mode {mode!r} runs the Trainer on Ray Train workers: no callbacks from this process")
    out = fs.local_path(out)  # file:// is a local path: same lock and atomic writes
    if workers is not None:
        if workers < 1:
            raise ConfigError(f"--workers {workers}: the number of Ray workers must be at least 1")
        cfg.ray.num_workers = workers
    if mode in ("collective", "ray_train"):
        from metarec.ray.ray_train import fit_with_ray_train

        local = _connect(cfg, address, exact=workers is not None, check=check_capacity)
        with open_run(out, cfg, resume=resume, refuse_existing=refuse_existing):
            return fit_with_ray_train(cfg, out, local=local, resume=resume)
    if config_path is not None:
        from metarec.runtime import cpu_time_warning

        warning = cpu_time_warning(cfg, config_path)
        if warning:
            print(warning, file=sys.stderr)
    runner_factory = None
    if mode == "driver":
        from metarec.ray.driver import ray_runner_factory

        _connect(cfg, address, exact=False, check=check_capacity)
        runner_factory = ray_runner_factory(address=address)
    return fit_in_run_dir(cfg, out, resume=resume, refuse_existing=refuse_existing, runner_factory=runner_factory, callbacks=callbacks)


def fit_in_run_dir(cfg: Config, out: str, *, resume: bool = False, refuse_existing: bool = False,
                   runner_factory: Callable | None = None, callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """The Trainer of `cfg` in the opened (locked, checked: `metarec.run_dir.open_run`) run
    directory `out`; returns the final metrics. `runner_factory(problem)`: MetaRec's runner
    (default: in-process); `callbacks`: the Trainer's (`metarec.callbacks`)."""
    from metarec.train import Trainer

    out = fs.local_path(out)
    with open_run(out, cfg, resume=resume, refuse_existing=refuse_existing):
        return Trainer.from_config(cfg, out, runner_factory, callbacks=callbacks).fit(resume=resume)


def _connect(cfg: Config, address: str | None, *, exact: bool, check: bool) -> bool:
    """Connect to Ray (or start a private local Ray) and, with `check`, make sure it can
    place the workers (metarec.ray.capacity); `exact` (an explicit --workers): refuse
    rather than lower the count. True for a local Ray."""
    from metarec.ray.capacity import fit_ray_workers
    from metarec.ray.session import connect

    address = address or os.environ.get("RAY_ADDRESS")
    connect(address)
    if check:
        where = f"the Ray cluster at {address}" if address else "this machine's local Ray"
        notice = fit_ray_workers(cfg, local=not (address or exact), where=where)
        if notice:
            print(notice, file=sys.stderr)
    return not address
