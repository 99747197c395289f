"""Search-space files for `metarec tune` (docs/design.md §6, "Tune").

A space file is YAML:

```yaml
name: tune_video
base_config: configs/metarec_video.yaml   # absolute, or relative to the space file's dir or any parent
overrides: {train.max_steps: 3000}        # dotted config keys fixed for every trial
num_samples: 16
metric: NDCG@10                           # target validation metric, maximised
scheduler: {grace_period: 2, reduction_factor: 2}   # ASHA, counted in evaluations
max_failures: 2
max_concurrent_trials: null               # null = as many as the resources allow
runner: local                             # local | ray (source tasks in Ray actors inside the trial)
trial_resources: {CPU: 1, GPU: 0}         # the trial's driver bundle
storage_path: null                        # default runs/tune (a dir or s3://...)
seed: null                                # seed of the sampler (default: the base config's seed)
params:
  rescale.tau: {loguniform: [0.05, 5.0]}
  vq.heads: {choice: [1, 2, 4, 8]}
  meta.inner_lr: {loguniform: [1.0e-3, 1.0e-1]}
  train.lr: {loguniform: [3.0e-4, 3.0e-3]}
  meta.inner_steps: {choice: [1, 2]}
```

Everything is checked when the file is loaded, before any trial starts: unknown keys
(with the nearest valid one), empty or inverted ranges, non-positive log bounds, empty
choice lists, `vq.heads` values that do not divide `model.hidden`, unknown
distributions, a refit (`data.train_on_validation`, which trains on the validation items
trials are ranked by), and the base config with every corner of the space (each choice,
both ends of each range). Every error is a `ConfigError` that names the file and the key.
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from metarec.config import (
    Config,
    absolute_data_root,
    config_from_dict,
    format_validation_error,
    leaf_field,
    load_yaml,
    parse_override,
    set_dotted,
    suggest_key,
)
from metarec.errors import ConfigError
from metarec.eval import METRIC_KS

DISTRIBUTIONS = ("loguniform", "uniform", "choice", "randint")
VAL_METRICS = tuple(f"{m}@{k}" for m in ("NDCG", "Recall") for k in METRIC_KS) + ("MRR",)
SWEEP_OWNED_KEYS = ("train.max_steps", "train.eval_every", "train.checkpoint_every")
REFIT_KEY = "data.train_on_validation"  # a refit trains on the validation items a sweep ranks by
_MAX_CORNERS = 1024  # beyond this many corner combinations, corners are checked one parameter at a time


# ------------------------------------------------------------------ parameters


@dataclass(frozen=True)
class Param:
    """One tuned config key and its distribution: `loguniform`/`uniform` [low, high],
    `randint` [low, high) (integers, high exclusive as in Ray Tune), or `choice` [values]."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def ray_domain(self):
        """The Ray Tune sampling domain of this parameter."""
        from ray import tune as ray_tune

        if self.kind == "choice":
            return ray_tune.choice(list(self.values))
        return getattr(ray_tune, self.kind)(*self.values)

    def corners(self) -> tuple[Any, ...]:
        """Extreme values: every choice, both ends of a range (randint: the largest integer below high)."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values

    def support(self) -> tuple[Any, ...] | None:
        """Every value the parameter can take, if finitely many (choice, randint)."""
        if self.kind == "choice":
            return self.values
        if self.kind == "randint":
            return tuple(range(self.values[0], self.values[1]))
        return None


def check_config_key(key: str, where: str) -> None:
    """ConfigError unless `key` is a dotted leaf key of the run config."""
    if not isinstance(key, str) or leaf_field(key) is None:
        hint = suggest_key(str(key))
        raise ConfigError(f"{where}: unknown config key '{key}'" + (f" (did you mean '{hint}'?)" if hint else ""))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _as_number(v: Any) -> Any:
    """YAML reads `1e-3` (no dot) as a string: accept numeric strings as floats."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


_REFIT_IN_SWEEP = (
    "a refit trains on the validation items, so every trial would be ranked on items it trained on; "
    "search without it, then refit the pick (`metarec train` with data.train_on_validation: true and the pick's best step as train.max_steps)"
)


def parse_param(key: str, spec: Any, where: str) -> Param:
    """Validate one `params` entry (`{distribution: arguments}`) of a space file."""
    here = f"{where}: params.{key}"
    check_config_key(key, f"{where}: params")
    if key in SWEEP_OWNED_KEYS:
        raise ConfigError(f"{here}: '{key}' is fixed for a sweep (ASHA counts evaluations); set it under overrides")
    if key == REFIT_KEY:
        raise ConfigError(f"{here}: {_REFIT_IN_SWEEP}")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(f"{here}: expected one distribution, e.g. {{loguniform: [0.1, 1.0]}} or {{choice: [1, 2]}}, got {spec!r}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        raise ConfigError(f"{here}: unknown distribution '{kind}' (use one of {', '.join(DISTRIBUTIONS)})" + (f"; did you mean '{close[0]}'?" if close else ""))
    if not isinstance(args, list) or not args:
        raise ConfigError(f"{here}: {kind} needs a non-empty list, got {args!r}")
    if kind == "choice":
        return Param(key, kind, tuple(args))
    args = [_as_number(a) for a in args]
    if len(args) != 2 or not all(_is_number(a) for a in args):
        raise ConfigError(f"{here}: {kind} needs [low, high] (two numbers), got {args!r}")
    low, high = args
    if low >= high:
        raise ConfigError(f"{here}: empty range [{low}, {high}] (need low < high)")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{here}: loguniform bounds must be positive, got [{low}, {high}]")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ConfigError(f"{here}: randint bounds must be integers, got {args!r}")
    if kind in ("uniform", "loguniform") and leaf_field(key).annotation is int:
        raise ConfigError(f"{here}: '{key}' is an integer; use choice or randint, not {kind}")
    return Param(key, kind, (low, high))


# ------------------------------------------------------------------ the file


class _Scheduler(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_period: int = Field(1, ge=1, description="evaluations before ASHA may stop a trial")
    reduction_factor: float = Field(2.0, gt=1)


class _Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")
    CPU: float = Field(1.0, gt=0)
    GPU: float = Field(0.0, ge=0)


class _SpaceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    base_config: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    num_samples: int = Field(8, ge=1)
    metric: str = "NDCG@10"
    scheduler: _Scheduler = Field(default_factory=_Scheduler)
    max_failures: int = Field(2, ge=0)
    max_concurrent_trials: int | None = Field(None, ge=1)
    runner: Literal["local", "ray"] = "local"
    trial_resources: _Resources = Field(default_factory=_Resources)
    storage_path: str | None = None
    seed: int | None = None
    params: dict[str, Any]


@dataclass
class SearchSpace:
    """A validated space file. `base` is the base config mapping with `overrides` applied
    and a local `data.root` made absolute (trials run in their own working directories)."""

    path: str
    name: str
    base: dict[str, Any]
    params: dict[str, Param]
    num_samples: int
    metric: str
    grace_period: int
    reduction_factor: float
    max_failures: int
    max_concurrent_trials: int | None
    runner: str
    trial_resources: dict[str, float]
    storage_path: str | None
    seed: int
    base_config_path: str

    def config(self, *layers: dict[str, Any]) -> Config:
        """The run config of a trial: base + overrides, then each mapping of dotted keys in
        `layers` (the sampled parameters, then any sweep-owned settings)."""
        raw = copy.deepcopy(self.base)
        for layer in layers:
            for key, value in layer.items():
                set_dotted(raw, key, value, f"{self.path}: {key}")
        return config_from_dict(raw, f"{self.path} (trial {layers[0] if layers else {}})")

    @property
    def base_config(self) -> Config:
        return config_from_dict(copy.deepcopy(self.base), self.base_config_path)

    @property
    def max_evaluations(self) -> int:
        """Evaluations of a full trial (ASHA's max_t): every eval_every steps and at the last step."""
        t = self.base_config.train
        return math.ceil(t.max_steps / t.eval_every)


def _find_base_config(space_path: Path, base: str) -> Path:
    """`base` if absolute, else the first of space dir / base, parent / base, ... that exists."""
    candidate = Path(base).expanduser()
    if candidate.is_absolute():
        if candidate.is_file():
            return candidate
        raise ConfigError(f"{space_path}: base_config '{base}' not found")
    directory = space_path.resolve().parent
    for root in (directory, *directory.parents):
        if (root / candidate).is_file():
            return root / candidate
    raise ConfigError(f"{space_path}: base_config '{base}' not found next to the space file or in any parent directory")


def _check_heads(space: SearchSpace, where: str) -> None:
    """Name the `vq.heads` values of the space that do not divide `model.hidden`."""
    heads = space.params.get("vq.heads")
    if heads is None or not space.base_config.vq.enabled:
        return
    hidden_param = space.params.get("model.hidden")
    hiddens = (hidden_param.support() or hidden_param.corners()) if hidden_param else (space.base_config.model.hidden,)
    values = heads.support() or heads.corners()
    bad = sorted({h for h in values for d in hiddens if not isinstance(h, int) or not isinstance(d, int) or d % h})
    if bad:
        raise ConfigError(f"{where}: params.vq.heads: {bad} do not divide model.hidden={'/'.join(map(str, hiddens))} of the base config")


def _check_corners(space: SearchSpace) -> None:
    """Validate the base config with every combination of extreme values (or, if too many, each alone)."""
    keys = list(space.params)
    corner_values = [space.params[k].corners() for k in keys]
    if math.prod(len(c) for c in corner_values) <= _MAX_CORNERS:
        for combo in itertools.product(*corner_values):
            space.config(dict(zip(keys, combo)))
    else:
        for key, values in zip(keys, corner_values):
            for value in values:
                space.config({key: value})


def _suggest_space_key(loc: str) -> str:
    """Nearest field name of a space file to the last part of `loc` ('' if none is close)."""
    fields = list(_SpaceFile.model_fields) + list(_Scheduler.model_fields) + list(_Resources.model_fields)
    close = difflib.get_close_matches(loc.rsplit(".", 1)[-1], fields, n=1)
    return close[0] if close else ""


def load_space(path: str | os.PathLike, sets: tuple[str, ...] | list[str] = ()) -> SearchSpace:
    """Read and fully validate a space file (see the module docstring); raises ConfigError.

    `sets`: `--set KEY=VALUE` overrides (parsed as in `metarec train --set`) applied after
    the file's `overrides`; a tuned parameter cannot be set."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise ConfigError(f"{where}: space file not found")
    try:
        raw = load_yaml(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping at the top level")
    try:
        spec = _SpaceFile.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, where, _suggest_space_key)) from None
    if spec.metric not in VAL_METRICS:
        raise ConfigError(f"{where}: metric '{spec.metric}' is not a validation metric (one of {', '.join(VAL_METRICS)})")
    if not spec.params:
        raise ConfigError(f"{where}: params is empty: nothing to tune")

    base_path = _find_base_config(path, spec.base_config)
    try:
        base = load_yaml(base_path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{base_path}: not valid YAML: {err}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"{base_path}: expected a mapping at the top level")
    for key, value in spec.overrides.items():
        check_config_key(key, f"{where}: overrides")
        set_dotted(base, key, value, f"{where}: overrides: {key}")
    for text in sets:
        parts, value = parse_override(text)
        key = ".".join(parts)
        check_config_key(key, f"--set {text!r}")
        if key in spec.params:
            raise ConfigError(f"--set {text!r}: '{key}' is a tuned parameter of {where}; remove it from params to fix it")
        set_dotted(base, key, value, f"--set {text!r}")
    absolute_data_root(base)
    params = {key: parse_param(key, value, where) for key, value in spec.params.items()}
    base_cfg = config_from_dict(copy.deepcopy(base), f"{base_path} (with the overrides of {where}" + (f" and --set {' '.join(sets)})" if sets else ")"))

    space = SearchSpace(
        path=where,
        name=path.stem if spec.name is None else spec.name,
        base=base,
        params=params,
        num_samples=spec.num_samples,
        metric=spec.metric,
        grace_period=spec.scheduler.grace_period,
        reduction_factor=spec.scheduler.reduction_factor,
        max_failures=spec.max_failures,
        max_concurrent_trials=spec.max_concurrent_trials,
        runner=spec.runner,
        trial_resources=spec.trial_resources.model_dump(),
        storage_path=spec.storage_path,
        seed=base_cfg.seed if spec.seed is None else spec.seed,
        base_config_path=str(base_path),
    )
    if base_cfg.data.train_on_validation:
        raise ConfigError(f"{base_path} (with the overrides of {where}" + (f" and --set {' '.join(sets)}" if sets else "") + f"): {REFIT_KEY} is true: {_REFIT_IN_SWEEP}")
    _check_heads(space, where)
    _check_corners(space)
    return space
