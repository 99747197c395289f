"""Opening a run directory for training: lock it, decide what a start or a resume may do.

`open_run(out, cfg, resume=..., refuse_existing=...)` is the one door into a run
directory; everything below happens under its lock and *before* anything is written:

- Lock (local directories): `OUT/.lock`, held with `flock(LOCK_EX | LOCK_NB)` for the
  whole run, so a second `train` on the same directory refuses at once. The kernel
  drops the lock when its process dies, however it dies (a SIGKILLed run leaves a
  stale `.lock` file that the next run simply locks again). Object stores (`s3://`,
  `gs://`) have no such lock: there the run directory is not locked, and two runs
  writing one URI is the user's to avoid (documented in the README).
- A new run (`refuse_existing`, the CLI) refuses a directory that holds a *started*
  run: one with `history.jsonl`, `metrics.json` or a checkpoint. A run that failed
  before its first evaluation or checkpoint left at most `config.yaml`, so repeating
  the command just starts it again.
- A resume refuses a directory with nothing to resume, a finished run that kept no
  step checkpoint (it would retrain from scratch and replace `best/`), and a config
  that differs from the run's `config.yaml` in any key outside `RESUMABLE_KEYS`
  (named in one line). A change of a resumable key is applied and recorded, since
  the trainer writes the config it uses to `config.yaml`.
- Stale hidden temp entries (`.step-N.tmp-*`, `.best.old-*`, `.history.jsonl.tmp-*`...)
  left by a kill during an atomic write are deleted.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from metarec import fs
from metarec.checkpoint import step_checkpoints
from metarec.config import Config, load_run_config
from metarec.errors import CheckpointError, ConfigError, quote

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
STARTED_MARKERS = ("history.jsonl", "metrics.json", "checkpoints")

# Keys a resume may change. They steer how long and how observably the run goes on, or
# where it computes, never what an optimizer step does: the learning rate, for one, is
# refused (the optimizer state holds the old one, so changing it would be a new run).
RESUMABLE_KEYS = frozenset({
    "name",
    "train.max_steps",
    "train.patience",
    "train.progress",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.eval_batch_size",
    "train.device",
    "ray.num_workers",
    "ray.cpus_per_worker",
    "ray.gpus_per_worker",
    "ray.max_task_retries",
    "ray.fail_task_once",
    "ray.fail_iteration",
})

_STALE_TEMP = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{32}$")


class RunLockedError(ConfigError):
    """Another process is training into the same run directory."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ lock


@contextlib.contextmanager
def run_lock(out: str) -> Iterator[None]:
    """Hold `OUT/.lock` exclusively (local directories; a no-op for URIs)."""
    if fs.is_uri(out):
        yield
        return
    path = os.path.join(out, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(f"{out}: run directory is in use by another metarec process"
                                 f" ({_holder(path)}); wait for it to finish or pass another --out") from None
        try:  # the holder before us may have unlinked the file we opened: lock the current one
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            pid = f.read().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "pid unknown"


# ------------------------------------------------------------------ state of a run directory


def run_started(out: str) -> bool:
    """True if `out` holds a run that got past its start (history, metrics or a checkpoint)."""
    if not fs.isdir(out):
        return False
    names = set(fs.listdir(out))
    if "checkpoints" in names and not fs.listdir(fs.join(out, "checkpoints")):
        names.discard("checkpoints")
    return any(m in names for m in STARTED_MARKERS)


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def changed_keys(old: Config, new: Config) -> list[str]:
    a, b = _flatten(old.to_dict()), _flatten(new.to_dict())
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def check_resume(out: str, cfg: Config) -> None:
    """Raise unless `out` holds a run that `cfg` may resume (module docstring)."""
    if not fs.isdir(out) or not fs.exists(fs.join(out, CONFIG_FILE)):
        what = "does not exist" if not fs.exists(out) else "holds no run (no config.yaml)"
        raise CheckpointError(f"{out}: nothing to resume: the directory {what}; train without --resume to start a run")
    stored = load_run_config(out)
    changed = changed_keys(stored, cfg)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        old, new = _flatten(stored.to_dict()), _flatten(cfg.to_dict())
        detail = ", ".join(f"{k}: {quote(old.get(k), 40)} -> {quote(new.get(k), 40)}" for k in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise ConfigError(f"{out}: cannot resume with a changed config ({detail}{more}); only "
                          f"{', '.join(sorted(RESUMABLE_KEYS))} may change on resume")
    if not step_checkpoints(fs.join(out, "checkpoints")) and fs.exists(fs.join(out, "metrics.json")):
        raise CheckpointError(f"{out}: the run has finished and kept no step checkpoint (train.checkpoint_every="
                              f"{stored.train.checkpoint_every}), so there is nothing to resume; "
                              "use `metarec evaluate` or train into another --out")
    if changed:
        _log(f"resume {out}: applying {', '.join(changed)} (recorded in {CONFIG_FILE})")


def clean_stale_temp(out: str) -> list[str]:
    """Delete hidden temp siblings of interrupted atomic writes; return what was deleted."""
    removed = []
    for folder in (out, fs.join(out, "checkpoints")):
        if not fs.isdir(folder):
            continue
        for name in fs.listdir(folder, include_hidden=True):
            if _STALE_TEMP.match(name):
                fs.remove(fs.join(folder, name))
                removed.append(fs.join(folder, name))
    if removed:
        _log(f"removed {len(removed)} stale temp entr{'y' if len(removed) == 1 else 'ies'} of an interrupted write under {out}")
    return removed


@contextlib.contextmanager
def open_run(out: str, cfg: Config, *, resume: bool = False, refuse_existing: bool = False) -> Iterator[None]:
    """Lock `out` and check it for a start or a resume (module docstring); yield under the lock."""
    out = out.rstrip("/") or out
    if fs.exists(out) and not fs.isdir(out):
        raise ConfigError(f"{out}: is a file, not a run directory; pass another --out")
    if resume and not fs.exists(out):
        check_resume(out, cfg)  # raises: nothing to resume
    created = not fs.exists(out)
    try:
        fs.makedirs(out)
    except OSError as err:
        raise ConfigError(f"{out}: cannot create the run directory ({err.strerror or err})") from None
    try:
        with run_lock(out):
            if resume:
                check_resume(out, cfg)
            elif refuse_existing and run_started(out):
                raise ConfigError(f"{out}: run directory already holds a run; pass --resume to continue it or --out for a new one")
            clean_stale_temp(out)
            yield
    finally:
        if created and fs.isdir(out) and not fs.listdir(out, include_hidden=True):
            fs.remove(out)  # refused before writing anything: leave no trace
