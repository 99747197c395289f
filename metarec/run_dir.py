"""The run directory: its layout, reading and writing its files, and the lock.

Every file name of a run directory appears here and nowhere else; the trainer, the
commands (`evaluate`, `recommend`, `plot`, `compare`), `tune` and the benchmarks ask
`RunDir` for what they need (docs/design.md §7 describes the layout):

    RUN_DIR/
      config.yaml          the validated config the run trains with
      history.jsonl        one JSON row per step (losses; `val` metrics at evaluations)
      metrics.json         the final summary: best validation, test metrics, timings
      checkpoints/best/    parameters of the best validation step
      checkpoints/step-N/  resumable checkpoints (parameters, optimizer, RNG, counters)
      .lock                held while a `train` writes the directory (local only)

A checkpoint directory's own files are `metarec.checkpoint`'s business.

`open_run(out, cfg, resume=..., refuse_existing=...)` is the one door into a run
directory for training; everything below happens under its lock and *before* anything
is written:

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
  left by a kill during an atomic write are deleted, except that a `.NAME.old-*` whose
  `NAME` is missing (a replace killed between its renames) is renamed back first.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import yaml

from metarec import fs
from metarec.checkpoint import Checkpoint, load_checkpoint, restore_model, save_checkpoint
from metarec.config import Config, absolute_data_root, config_from_dict, dump_config, load_yaml
from metarec.errors import CheckpointError, ConfigError, MetaRecError, bounded, quote

LOCK_FILE = ".lock"
CONFIG_FILE = "config.yaml"
HISTORY_FILE = "history.jsonl"
METRICS_FILE = "metrics.json"
CHECKPOINTS_DIR = "checkpoints"
BEST = "best"
STARTED_MARKERS = (HISTORY_FILE, METRICS_FILE, CHECKPOINTS_DIR)
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Keys that runs written before they were removed from the config still hold in their
# config.yaml; dropped on reading when they hold their old default (fault injection is
# the test-only METAREC_TEST_FAIL_TASK_ONCE now: metarec.ray.driver).
_RETIRED_KEYS = {("ray", "fail_task_once"): [], ("ray", "fail_iteration"): None}

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
})

_STALE_TEMP = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{32}$")


class RunLockedError(ConfigError):
    """Another process is training into the same run directory."""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ layout


def step_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, uri) of the `step-N` checkpoint directories under `root`, ascending."""
    if not fs.exists(root):
        return []
    found = []
    for name in fs.listdir(root):
        m = _STEP_DIR.match(name)
        if m:
            found.append((int(m.group(1)), f"{root}/{name}"))
    return sorted(found)


class RunDir:
    """The files of one run directory `uri` (a local path or an object-store URI)."""

    def __init__(self, uri: str):
        uri = fs.local_path(uri)
        self.uri = uri.rstrip("/") or uri

    def __str__(self) -> str:
        return self.uri

    def _join(self, *parts: str) -> str:
        return fs.join(self.uri, *parts)

    @property
    def config_uri(self) -> str:
        return self._join(CONFIG_FILE)

    @property
    def history_uri(self) -> str:
        return self._join(HISTORY_FILE)

    @property
    def metrics_uri(self) -> str:
        return self._join(METRICS_FILE)

    @property
    def checkpoints_uri(self) -> str:
        return self._join(CHECKPOINTS_DIR)

    @property
    def best_uri(self) -> str:
        return self._join(CHECKPOINTS_DIR, BEST)

    def step_uri(self, step: int) -> str:
        return self._join(CHECKPOINTS_DIR, f"step-{step:08d}")

    # ------------------------------------------------------------ config

    def write_config(self, cfg: Config) -> None:
        """config.yaml: `cfg` with a local `data.root` made absolute, so that the run names its
        data wherever it is evaluated from."""
        fs.makedirs(self.uri)
        fs.atomic_write_bytes(self.config_uri, dump_config(_with_absolute_root(cfg)).encode())

    def has_config(self) -> bool:
        return fs.exists(self.config_uri)

    def read_config(self) -> Config:
        """The validated config the run was trained with; CheckpointError if there is none."""
        uri = self.config_uri
        if not fs.exists(uri):
            raise CheckpointError(f"{self.uri}: not a run directory (no {CONFIG_FILE})")
        try:
            raw = load_yaml(fs.read_text(uri))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{uri}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{uri}: not valid YAML: {bounded(str(err), 300)}") from None
        return config_from_dict(_drop_retired_keys(raw), uri)

    # ------------------------------------------------------------ history and metrics

    def write_history(self, rows: list[dict[str, Any]]) -> None:
        fs.atomic_write_bytes(self.history_uri, "".join(json.dumps(r) + "\n" for r in rows).encode())

    def read_history(self) -> list[dict[str, Any]]:
        """The rows of the history; MetaRecError names the file (and line) if missing or malformed."""
        uri = self.history_uri
        if not fs.exists(uri):
            raise MetaRecError(f"{uri}: no training history (is {self.uri} a run directory?)")
        rows = []
        for number, line in enumerate(fs.read_text(uri).splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MetaRecError(f"{uri}, line {number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise MetaRecError(f"{uri}, line {number}: expected an object with an integer 'step'")
            rows.append(row)
        if not rows:
            raise MetaRecError(f"{uri}: empty training history")
        return rows

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        fs.atomic_write_bytes(self.metrics_uri, json.dumps(metrics, indent=1).encode())

    def finished(self) -> bool:
        """True once the run wrote its final metrics (all steps or early stop, then the test)."""
        return fs.exists(self.metrics_uri)

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(fs.read_bytes(self.metrics_uri))

    # ------------------------------------------------------------ checkpoints

    def save_best(self, model: torch.nn.Module, state: dict[str, Any]) -> None:
        """Parameters (no optimizer state) as `checkpoints/best`."""
        save_checkpoint(self.best_uri, model, None, state)

    def save_step(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  state: dict[str, Any], keep: int) -> None:
        """A resumable `checkpoints/step-N`; then delete all but the newest `keep` of them."""
        save_checkpoint(self.step_uri(step), model, optimizer, state)
        for _step, uri in self.step_checkpoints()[:-keep]:
            fs.remove(uri)

    def step_checkpoints(self) -> list[tuple[int, str]]:
        """(step, uri) of the step checkpoints, ascending."""
        return step_checkpoints(self.checkpoints_uri)

    def latest_step_checkpoint(self) -> Checkpoint | None:
        """The newest complete step checkpoint; torn ones are skipped with a warning."""
        for _step, uri in reversed(self.step_checkpoints()):
            try:
                return load_checkpoint(uri)
            except CheckpointError as err:
                warnings.warn(f"skipping torn checkpoint: {err}", stacklevel=2)
        return None

    def load_best(self) -> Checkpoint:
        return load_checkpoint(self.best_uri)

    def restore_best(self, model: torch.nn.Module, *, subset: bool = False, data: dict[str, str] | None = None) -> None:
        """Copy the best checkpoint's parameters into `model` (the one way to restore a run's
        model). `subset`: `model` holds only some of the run's tensors (a target-only model
        for serving); the checkpoint's other tensors are ignored. A tensor `model` has and
        the checkpoint lacks, or of another shape, is a CheckpointError either way.
        `data`: the fingerprint (`metarec.data.domain.data_fingerprint`) of the data about to
        be used with the model, refused if the run was trained on other data."""
        best = self.load_best()
        if data is not None:
            check_data(best.state, data, self.best_uri)
        params = best.params
        if subset:
            wanted = dict(model.named_parameters()).keys()
            params = {k: v for k, v in params.items() if k in wanted}
        restore_model(model, params, self.best_uri)


DATA_KEY = "data"  # a checkpoint state's record of the data the run trained on


def check_data(state: dict[str, Any], data: dict[str, str], where: str) -> None:
    """Refuse `data` (domain name -> data sha256) if a checkpoint `state` recorded other data for
    any of its domains (checkpoints written before runs recorded their data are not checked)."""
    recorded = state.get(DATA_KEY)
    if not isinstance(recorded, dict):
        return
    for name, sha in sorted(data.items()):
        if name in recorded and recorded[name] != sha:
            raise CheckpointError(f"{where}: the run was trained on other data: domain {quote(name)} had sha256 "
                                  f"{str(recorded[name])[:12]}…, the prepared domain now has {sha[:12]}… "
                                  "(prepared again, or another data.root); use the data the run was trained on")


def _with_absolute_root(cfg: Config) -> Config:
    raw = cfg.to_dict()
    absolute_data_root(raw)
    return cfg if raw == cfg.to_dict() else config_from_dict(raw)


def _drop_retired_keys(raw: Any) -> Any:
    """`raw` without `_RETIRED_KEYS` that still hold their old default (older runs' config.yaml)."""
    if not isinstance(raw, dict):
        return raw
    for (section, key), default in _RETIRED_KEYS.items():
        values = raw.get(section)
        if isinstance(values, dict) and key in values and values[key] == default:
            del values[key]
    return raw


# ------------------------------------------------------------------ lock


_HELD_LOCKS: set[str] = set()  # the lock files this process holds


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
        _HELD_LOCKS.add(path)
        yield
    finally:
        _HELD_LOCKS.discard(path)
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def release_held_locks() -> None:
    """Remove the lock files this process holds, for an exit that skips `run_lock`'s own
    cleanup (`os._exit` in metarec.ray.raylet_watch); the kernel drops the flocks with the process."""
    for path in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.unlink(path)


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
    if CHECKPOINTS_DIR in names and not fs.listdir(fs.join(out, CHECKPOINTS_DIR)):
        names.discard(CHECKPOINTS_DIR)
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
    run = RunDir(out)
    if not fs.isdir(out) or not run.has_config():
        what = "does not exist" if not fs.exists(out) else f"holds no run (no {CONFIG_FILE})"
        raise CheckpointError(f"{out}: nothing to resume: the directory {what}; train without --resume to start a run")
    stored = _with_absolute_root(run.read_config())
    cfg = _with_absolute_root(cfg)  # a relative data.root means the same data only from the same directory
    changed = changed_keys(stored, cfg)
    refused = [k for k in changed if k not in RESUMABLE_KEYS]
    if refused:
        old, new = _flatten(stored.to_dict()), _flatten(cfg.to_dict())
        detail = ", ".join(f"{k}: {quote(old.get(k), 40)} -> {quote(new.get(k), 40)}" for k in refused[:5])
        more = f" and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise ConfigError(f"{out}: cannot resume with a changed config ({detail}{more}); only "
                          f"{', '.join(sorted(RESUMABLE_KEYS))} may change on resume")
    if not run.step_checkpoints() and run.finished():
        raise CheckpointError(f"{out}: the run has finished and kept no step checkpoint (train.checkpoint_every="
                              f"{stored.train.checkpoint_every}), so there is nothing to resume; "
                              "use `metarec evaluate` or train into another --out")
    done = _steps_done(run)
    if cfg.train.max_steps < done:
        raise ConfigError(f"{out}: cannot resume with train.max_steps={cfg.train.max_steps}: the run has already done "
                          f"{done} steps (a resume never drops steps); pass train.max_steps >= {done}")
    if run.finished():
        _check_finished(run, stored, cfg)
    if changed:
        _log(f"resume {out}: applying {', '.join(changed)} (recorded in {CONFIG_FILE})")


def _steps_done(run: RunDir) -> int:
    """Steps the run has recorded: its history's last step (else its newest step checkpoint's)."""
    try:
        return max(r["step"] for r in run.read_history())
    except MetaRecError:
        checkpoints = run.step_checkpoints()
        return checkpoints[-1][0] if checkpoints else 0


def _check_finished(run: RunDir, stored: Config, cfg: Config) -> None:
    """Refuse to resume a finished run that `cfg` would not train further (it would only
    replay its last steps and rewrite its results)."""
    try:
        steps = int(run.read_metrics()["steps"])
    except (ValueError, KeyError, TypeError, OSError):
        return  # unreadable final metrics: the resume recomputes them
    if steps >= cfg.train.max_steps:
        raise CheckpointError(f"{run.uri}: the run has finished ({steps} of train.max_steps={cfg.train.max_steps} steps); "
                              "nothing to resume, nothing was changed (raise train.max_steps to train it further)")
    if steps < stored.train.max_steps and cfg.train.patience <= stored.train.patience:
        raise CheckpointError(f"{run.uri}: the run has finished: it stopped early at step {steps} (no improvement in "
                              f"train.patience={stored.train.patience} evaluations); nothing to resume, nothing was changed "
                              "(raise train.patience to train it further)")


def clean_stale_temp(out: str) -> list[str]:
    """Delete hidden temp siblings of interrupted atomic writes; return what was deleted.

    A replace killed between its two renames left its entry missing and the previous
    version as `.NAME.old-*` (the only complete copy): that one is renamed back first."""
    removed = []
    for folder in (out, fs.join(out, CHECKPOINTS_DIR)):
        if not fs.isdir(folder):
            continue
        for name in fs.listdir(folder, include_hidden=True):
            m = _STALE_TEMP.match(name)
            if m and m.group(1) == "old" and not fs.is_uri(folder):
                entry = name[1 : name.rindex(".old-")]
                if not os.path.exists(os.path.join(folder, entry)):
                    os.rename(fs.swap_leftovers(os.path.join(folder, entry))[0], os.path.join(folder, entry))
                    _log(f"restored {fs.join(folder, entry)} from its previous version, left by an interrupted replace")
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
    out = fs.local_path(out)
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
