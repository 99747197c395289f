"""Checkpoints: safetensors for tensors + JSON for everything else. Never pickle.

A checkpoint is a directory (a run's `best` or `step-N`: `metarec.run_dir`) holding
- `tensors.safetensors`: model parameters (`param/<name>`), optimizer state
  (`optim/<name>/<key>`) and the torch RNG state (`rng/torch`);
- `state.json`: counters, best-so-far, sampler/numpy RNG state, optimizer
  hyper-parameters, the sha256 of `tensors.safetensors` (checked on every load: a
  flipped bit is a CheckpointError, and a resume falls back to the previous step
  checkpoint), and `"complete": true` written last.
It is written into a temporary sibling and renamed into place, so a reader sees
either the whole checkpoint or none; a directory without a readable, complete
`state.json` (a torn write from another tool, a disk that filled up) is skipped with
a warning by `RunDir.latest_step_checkpoint`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metarec import fs
from metarec.errors import CheckpointError, quote

TENSORS = "tensors.safetensors"
STATE = "state.json"
TENSORS_SHA256 = "tensors_sha256"  # state.json's checksum of tensors.safetensors, verified on every load


@dataclass
class Checkpoint:
    params: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    torch_rng: torch.Tensor | None
    state: dict[str, Any]


def _optimizer_to_flat(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict() into tensors keyed by parameter *name* and a JSON part."""
    sd = optimizer.state_dict()
    flat: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        name = names[pid]
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                flat[f"optim/{name}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": [names[p] for p in g["params"]]} for g in sd["param_groups"]]
    return flat, {"scalars": scalars, "param_groups": groups}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict, order: list[str]) -> dict:
    index = {name: i for i, name in enumerate(order)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if not key.startswith("optim/"):
            continue
        _, rest = key.split("/", 1)
        name, sub = rest.rsplit("/", 1)
        state.setdefault(index[name], {})[sub] = value
    for name, scal in meta["scalars"].items():
        state.setdefault(index[name], {}).update(scal)
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    uri: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict[str, Any],
) -> None:
    """Write a checkpoint atomically to `uri` (local path or s3://)."""
    names = {}
    ordered = []
    for name, p in model.named_parameters():
        ordered.append(name)
        names[id(p)] = name
    tensors = {f"param/{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters()}
    full_state = dict(state)
    if optimizer is not None:
        pid_names = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                pid_names[len(pid_names)] = names[id(p)]
        flat, meta = _optimizer_to_flat(optimizer, pid_names)
        tensors.update(flat)
        full_state["optimizer"] = meta
        full_state["optimizer_order"] = list(pid_names.values())
    tensors["rng/torch"] = torch.get_rng_state()
    blob = st_save(tensors)
    full_state[TENSORS_SHA256] = hashlib.sha256(blob).hexdigest()
    full_state["complete"] = True
    with fs.atomic_dir(uri, replace=True, last=(STATE,)) as tmp:
        fs.write_bytes(f"{tmp}/{TENSORS}", blob)
        fs.write_bytes(f"{tmp}/{STATE}", json.dumps(full_state, indent=1, sort_keys=True).encode())


def load_checkpoint(uri: str) -> Checkpoint:
    """Read a checkpoint; CheckpointError names what is missing or broken."""
    state_uri = f"{uri}/{STATE}"
    try:  # both files of one version, even while a save replaces the checkpoint
        files = fs.read_dir_files(uri, (STATE, TENSORS))
    except FileNotFoundError:
        raise CheckpointError(f"{uri}: no checkpoint here (expected {STATE} and {TENSORS})") from None
    except OSError as err:
        raise CheckpointError(f"{uri}: unreadable checkpoint: {err}") from None
    try:
        state = json.loads(files[STATE])
    except ValueError as err:
        raise CheckpointError(f"{uri}: unreadable checkpoint: {err}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_uri}: expected a JSON object, got {type(state).__name__}")
    if not state.get("complete"):
        raise CheckpointError(f"{uri}: incomplete checkpoint (no 'complete' marker)")
    recorded = state.get(TENSORS_SHA256)  # absent in checkpoints written before it was recorded
    if recorded is not None and hashlib.sha256(files[TENSORS]).hexdigest() != recorded:
        raise CheckpointError(f"{uri}/{TENSORS}: sha256 does not match the one {STATE} records (the tensors were modified or corrupted)")
    try:
        tensors = st_load(files[TENSORS])
    except (ValueError, OSError, SafetensorError) as err:
        raise CheckpointError(f"{uri}: unreadable checkpoint: {err}") from None
    params = {k[len("param/") :]: v for k, v in tensors.items() if k.startswith("param/")}
    optim = None
    if "optimizer" in state:
        try:
            optim = _optimizer_from_flat(tensors, state["optimizer"], state["optimizer_order"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"{uri}: corrupted optimizer state ({type(err).__name__}: {quote(str(err))})") from None
    return Checkpoint(params=params, optimizer=optim, torch_rng=tensors.get("rng/torch"), state=state)


def check_optimizer_state(saved: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, where: str) -> None:
    """Refuse saved optimizer state that does not fit `model` (detected now, not at the next step):
    other parameter groups, or a per-parameter tensor whose shape is not its parameter's."""
    groups = optimizer.param_groups
    if len(saved["param_groups"]) != len(groups) or any(
        len(s["params"]) != len(g["params"]) for s, g in zip(saved["param_groups"], groups)
    ):
        raise CheckpointError(f"{where}: optimizer state does not match the model's parameter groups")
    params = [p for g in groups for p in g["params"]]
    names = {id(p): n for n, p in model.named_parameters()}
    for index, entry in saved["state"].items():
        if not isinstance(index, int) or not 0 <= index < len(params):
            raise CheckpointError(f"{where}: optimizer state for an unknown parameter {quote(index)}")
        param = params[index]
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                raise CheckpointError(f"{where}: optimizer tensor {names.get(id(param), index)}/{key} has shape "
                                      f"{tuple(value.shape)}, the parameter has {tuple(param.shape)}")


def restore_model(model: torch.nn.Module, params: dict[str, torch.Tensor], where: str) -> None:
    own = dict(model.named_parameters())
    missing = sorted(set(own) - set(params))
    extra = sorted(set(params) - set(own))
    if missing or extra:
        raise CheckpointError(f"{where}: checkpoint does not match the model (missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != params[name].shape:
                raise CheckpointError(f"{where}: tensor {name} has shape {tuple(params[name].shape)}, model expects {tuple(p.shape)}")
            p.copy_(params[name].to(p.device))
