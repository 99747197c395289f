"""Run configuration: a YAML file validated by pydantic.

Unknown keys are an error that names the key and suggests the nearest valid one.
`--set a.b=value` overrides are applied to the raw mapping before validation, so they
are checked exactly like keys in the file.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo

from metarec import fs
from metarec.errors import ConfigError, bounded, quote


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$"  # a run or domain name: also a path component
MAX_SEQ_LEN = 100_000  # beyond any sequence model's window; larger values only exhaust memory
MAX_HIDDEN = 4096  # 16x the widest sequential recommenders; one LRU block is then 0.4 GB of float32
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]{1,3})$"
TARGET_ONLY_LR = 1e-3  # train.lr default without sources: the target-only search on amazon-scientific (9.9e-4)
TRANSFER_LR = 2.7e-3  # with sources: the MetaRec search there (joint training's: 2.9e-3)


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping holds one key twice."""


class UniqueKeyLoader(yaml.SafeLoader):
    """`yaml.SafeLoader` that refuses a mapping holding one key twice (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, mark = self.construct_object(key_node, deep=deep), key_node.start_mark
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error follows
                    continue
                seen[key] = mark.line + 1
                if first is not None:
                    raise DuplicateKeyError(f"line {mark.line + 1}, column {mark.column + 1}: duplicate key {quote(key)} (first on line {first})")
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """YAML text as Python data: safe tags only, no duplicate keys."""
    return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _allows_bool(annotation: Any) -> bool:
    import typing

    if annotation is bool:
        return True
    return any(_allows_bool(a) for a in typing.get_args(annotation) if not isinstance(a, str))


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_as_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """`true` is not 1 (pydantic's lax mode would take it as one): a number field refuses booleans."""
        if isinstance(value, bool) and not _allows_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, not a boolean")
        return value


class DataConfig(_Section):
    """Which prepared domains a run reads (a config without sources trains target-only)."""

    root: str = Field(".cache/prepared", description="directory (or s3:// URI) holding prepared domains DIR/NAME")
    target: str = Field(..., pattern=NAME_PATTERN, description="name of the target domain")
    sources: list[Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(default_factory=list, description="source domains; empty = target-only")
    max_len: int = Field(50, ge=2, le=MAX_SEQ_LEN, description="input window length (LRURec: 50, 200 for MovieLens)")
    source_max_len: int | None = Field(None, ge=2, le=MAX_SEQ_LEN, description="window length for source domains (default: max_len)")
    target_users: int | None = Field(None, ge=10, description="seeded subsample of target users (reduced protocol)")
    subsample_seed: int | None = Field(None, ge=0, le=2**32 - 1, description="seed of the target_users subsample (default: seed)")
    subsample_items: Literal["keep", "compact"] = Field(
        "keep", description="after target_users: keep every item ID, or compact to the items the subsample holds"
    )
    source_sampling: Literal["uniform", "proportional"] = Field(
        "uniform", description="how tasks draw their source: uniform, or proportional to its number of training windows"
    )
    first_item_label: bool = Field(
        False, description="also train on each sequence's first item, predicted from the all-padding input before it (LRURec's training windows)"
    )
    train_on_validation: bool = Field(
        False,
        description="refit: also train on each target user's validation item. Validation then scores items the run trained on, so the run "
        "trains exactly train.max_steps (take it from the best step of a run without this) and tests the last step's weights; "
        "`metarec tune` refuses it (search first, then refit the pick)",
    )

    @model_validator(mode="after")
    def _check_domains(self) -> "DataConfig":
        if self.target in self.sources:
            raise ValueError(f"data.sources: the target {self.target!r} is also listed as a source")
        dupes = sorted({s for s in self.sources if self.sources.count(s) > 1})
        if dupes:
            raise ValueError(f"data.sources: listed more than once: {dupes}")
        return self


class ModelConfig(_Section):
    """The sequential recommender f = f_m ∘ f_e (docs/design.md §2)."""

    backbone: Literal["lru", "sasrec", "gru4rec"] = Field("lru", description="lru (LRURec), sasrec or gru4rec")
    hidden: int = Field(64, ge=2, le=MAX_HIDDEN, description=f"embedding and hidden size d (at most {MAX_HIDDEN})")
    blocks: int = Field(2, ge=1, le=1024, description="backbone layers")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout probability")
    attn_heads: int = Field(2, ge=1, le=65536, description="attention heads (sasrec only)")


class TrainConfig(_Section):
    """The optimizer, the budget, evaluation and checkpoints."""

    batch_size: int = Field(256, ge=1, le=10_000_000, description="target windows per step (per task for MetaRec)")
    lr: float | None = Field(
        None, gt=0,
        description=f"outer learning rate beta (target-only/joint: the only lr); default {TARGET_ONLY_LR:g} target-only, {TRANSFER_LR:g} with sources (MetaRec, joint; each searched on amazon-scientific)",
    )
    weight_decay: float = Field(0.01, ge=0, description="decoupled weight decay (adamw) or L2 penalty (adam, sgd)")
    batch_order: Literal["random", "epoch"] = Field(
        "epoch", description="target batches: epoch (every target window once per epoch, reshuffled, as LRURec's data loader; the default, +2.5% and +9.6% test NDCG@10 on two targets) or random (each drawn anew); source batches are random"
    )
    decay_bias_and_norm: bool = Field(
        True, description="weight decay on biases and LayerNorm weights too (false: only on the other tensors, as LRURec's code)"
    )
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="adamw, adam, or sgd (reproduces the paper's Eq. 8)")
    grad_clip: float | None = Field(5.0, gt=0, description="global gradient-norm clip (null: none)")
    max_steps: int = Field(2000, ge=1, le=10**12, description="optimizer steps (meta iterations for MetaRec)")
    eval_every: int = Field(200, ge=1, description="validate every N steps")
    patience: int = Field(10, ge=1, description="evaluations without improvement before early stop")
    eval_batch_size: int = Field(256, ge=1, le=10_000_000, description="users per evaluation chunk")
    eval_exclude_history: bool = Field(True, description="rank without the items of the input window")
    source_negatives: int = Field(0, ge=0, description="sampled-softmax negatives for source domains; 0 = full softmax")
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="auto | cpu | cuda | cuda:N")
    checkpoint_every: int = Field(0, ge=0, description="write a resumable checkpoint every N steps (0 = only best)")
    keep_checkpoints: int = Field(2, ge=1, description="step checkpoints kept (the newest)")
    progress: bool = Field(True, description="print a line per validation on stderr")


class VQConfig(_Section):
    """Multi-head vector quantization of source items onto the target table (docs/design.md §3)."""

    enabled: bool = Field(True, description="quantize source item embeddings onto the target's table")
    heads: int = Field(8, ge=1, le=65536, description="VQ heads (must divide model.hidden)")
    source_output: Literal["quantized", "raw"] = Field("quantized", description="source output matrix: quantized or raw")
    weight: float = Field(1.0, ge=0, description="coefficient of L_vq in the source loss")
    chunk_size: int = Field(4096, ge=1, description="rows per similarity chunk (memory O(chunk x K_t))")


class MetaConfig(_Section):
    """Meta transfer (docs/design.md §4); enabled: false trains jointly. The defaults here, in
    vq and rescale, and the backbone's dropout and batch are what the searches on amazon-scientific
    chose, confirmed on amazon-video-games (docs/design.md §4 item 6)."""

    enabled: bool = Field(True, description="MetaRec; false = joint training on sources and target")
    tasks_per_iter: int = Field(3, ge=1, le=100_000, description="n: source tasks per meta iteration")
    inner_steps: int = Field(1, ge=1, le=100_000, description="inner-loop SGD steps per task")
    inner_lr: float = Field(0.29, gt=0, description="inner learning rate alpha")
    first_order: bool = Field(False, description="drop the second-order terms of the meta gradient")
    source_params: Literal["persist_inner", "meta_only"] = Field(
        "persist_inner", description="source tables keep their inner-loop updates (persist_inner) or take only the outer step (meta_only)"
    )
    persist_shared: float = Field(
        0.5, ge=0, le=1,
        description="fraction of the rescale-weighted inner-loop change the shared tensors keep after the outer step (0 = paper)",
    )
    source_grad: float = Field(
        3.0, ge=0, le=100,
        description="weight mu of the rescale-weighted source gradient (theta - phi_i) / alpha added to the outer gradient of the shared tensors (0, with persist_shared 0: the paper's update)",
    )
    source_batch_size: int | None = Field(64, ge=1, le=10_000_000, description="source windows per task (null: train.batch_size)")


class RescaleConfig(_Section):
    """Per-layer, similarity-based rescaling of the meta gradients (docs/design.md Eq. (7))."""

    enabled: bool = Field(True, description="softmax-weight the tasks per tensor; false = plain mean")
    tau: float = Field(0.82, gt=0, description="softmax temperature")
    direction: Literal["source_descent", "paper_literal"] = Field(
        "source_descent", description="similarity of the target gradient with theta - phi (source_descent) or phi - theta (paper_literal)"
    )
    signal: Literal["cosine", "target_gain", "source_fit"] = Field(
        "cosine",
        description="what Eq. (7)'s softmax weighs: the paper's per-tensor cosine (Eq. 6); target_gain: how much the task's inner step lowered the target loss on its target batch, L_target(theta) - L_target(phi_i) without dropout; source_fit: minus the task's source loss at theta (a source the model predicts better weighs more). The last two are the same for every tensor of the task and are standardized over the iteration's tasks",
    )
    smoothing: float = Field(
        0.0, ge=0, lt=1,
        description="beta of each source's moving average of its similarity relative to the iteration's other tasks, used in the softmax instead of the iteration's own similarity (0 = the paper's per-iteration similarity)",
    )


class RayConfig(_Section):
    """Ray workers (`metarec train --ray`, `--ray-train`)."""

    mode: Literal["driver", "collective"] = Field(
        "driver", description="MetaRec on Ray: the driver combines the gradients (driver), or the workers all-reduce them (collective)"
    )
    num_workers: int = Field(2, ge=1, le=100_000, description="SourceTaskWorker actors (driver) or Ray Train workers (collective, --ray-train)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs each worker reserves")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves (and its torch threads)")
    max_task_retries: int = Field(3, ge=0, description="re-runs of a task lost with its worker (Ray Train: restarts of the group) before the run stops")


class Config(_Section):
    """A run: its name, seed and one section per concern."""

    name: str = Field("metarec", pattern=NAME_PATTERN, description="run name (default run directory runs/NAME)")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of every RNG of the run (numpy needs 0..2^32-1)")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    vq: VQConfig = Field(default_factory=VQConfig)
    meta: MetaConfig = Field(default_factory=MetaConfig)
    rescale: RescaleConfig = Field(default_factory=RescaleConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_heads(self) -> "Config":
        if self.vq.enabled and self.model.hidden % self.vq.heads:
            raise ValueError(f"vq.heads: {self.vq.heads} does not divide model.hidden={self.model.hidden}")
        if self.model.backbone == "sasrec" and self.model.hidden % self.model.attn_heads:
            raise ValueError(f"model.attn_heads: {self.model.attn_heads} does not divide model.hidden={self.model.hidden}")
        return self

    @model_validator(mode="after")
    def _default_lr(self) -> "Config":
        if self.train.lr is None:
            self.train.lr = TARGET_ONLY_LR if self.method == "target_only" else TRANSFER_LR
        return self

    @property
    def method(self) -> str:
        """'target_only' without sources, 'joint' with meta disabled, else 'metarec'."""
        if not self.data.sources:
            return "target_only"
        return "metarec" if self.meta.enabled else "joint"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# ---------------------------------------------------------------- key handling


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def config_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, FieldInfo]:
    """Every dotted key of the run config, sections and leaves, each before its children -> its field."""
    fields = {}
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        fields[dotted] = field
        if _is_section(field.annotation):
            fields.update(config_fields(field.annotation, dotted + "."))
    return fields


def leaf_field(key: str) -> FieldInfo | None:
    """The pydantic field of the dotted leaf `key` (None for a section or no such key)."""
    field = config_fields().get(key)
    return None if field is None or _is_section(field.annotation) else field


def suggest_key(key: str) -> str:
    """Nearest valid dotted key to `key` ('' if none is close)."""
    valid = list(config_fields())
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:
        leaf = key.rsplit(".", 1)[-1]
        match = [k for k in valid if k.rsplit(".", 1)[-1] in difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1, cutoff=0.6)]
    return match[0] if match else ""


def format_validation_error(err: ValidationError, source: str, suggest: Callable[[str], str] = suggest_key) -> str:
    """One line naming `source` and every key pydantic refused: unknown (with `suggest`'s
    nearest valid key), missing, or an invalid value (and the value given)."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            hint = suggest(loc)
            msg = f"{source}: unknown key {quote(loc)}" + (f" (did you mean '{hint}'?)" if hint else "")
        elif e["type"] == "missing":
            msg = f"{source}: missing required key '{loc}'"
        else:
            where = f" '{loc}'" if loc else ""
            text = e["msg"].removeprefix("Value error, ")
            got = f" (got {quote(e['input'])})" if loc and not isinstance(e.get("input"), (dict, list)) else ""
            msg = f"{source}: invalid value for{where}: {text}{got}" if loc else f"{source}: {text}"
        lines.append(msg)
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b=value' -> (['a', 'b'], yaml-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {quote(text)}: expected KEY=VALUE, e.g. --set train.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {quote(text)}: empty key")
    try:
        return key.split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {quote(text)}: value is not valid YAML ({bounded(str(err), 200)})") from None


def set_dotted(raw: dict[str, Any], key: str, value: Any, where: str = "config") -> None:
    """raw[a][b] = value for key 'a.b', creating missing sections; ConfigError (naming `where`)
    if a section on the way holds a value instead of a mapping."""
    node = raw
    *sections, leaf = key.split(".")
    for part in sections:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {quote(part)} is not a section")
        node = child
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply `--set KEY=VALUE` strings to the raw config mapping (before validation)."""
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(raw, ".".join(path), value, f"--set {quote(text)}")
    return raw


def absolute_data_root(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with a local `data.root` made absolute (in place), for processes that run in
    another working directory (Ray workers, Tune trials); URIs are left alone."""
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str) and not fs.is_uri(data["root"]):
        data["root"] = os.path.abspath(os.path.expanduser(fs.local_path(data["root"])))
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply `--set` overrides, validate."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, not a config file")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = load_yaml(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start}: {err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {bounded(str(err), 300)}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror or err})") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config sections at the top level, got {'a list' if isinstance(raw, list) else quote(raw, 40)}")
    raw = apply_overrides(raw, overrides)
    return config_from_dict(raw, str(path))


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
