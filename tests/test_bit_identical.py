"""Fixed-seed CPU runs reproduce the recorded reference run across refactors.

Each run trains a few steps of one method on the tiny synthetic domains and compares
what it leaves in its run directory with the reference recorded in
`tests/data/fixed_seed/METHOD.{safetensors,json}`: every tensor of the final step
checkpoint (parameters, optimizer state, RNG state), the non-timing columns of
`history.jsonl` and `metrics.json` (losses, weights, metrics), and the list of files in
the run directory. The file list, the RNG state, every count and every name must be
equal; floats must agree to float32 rounding across CPUs (`RTOL`, `ATOL`): the last bits
of a float32 result depend on the CPU and the torch build's kernels (the SHA-256 digests
this test held until 2026-12 matched on one machine and failed on another), while a
change to the training moves the numbers by orders of magnitude more.

If a change is *meant* to alter the numbers, re-record with `METAREC_RECORD_DIGESTS=1`
and say so in the commit message.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from metarec.config import config_from_dict
from metarec.train import train

STEPS = 6
TIMING_KEYS = {"train_seconds", "eval_seconds", "eval_users_per_s", "task_seconds"}
REFERENCE = Path(__file__).parent / "data" / "fixed_seed"
RTOL, ATOL = 1e-4, 1e-4  # ATOL: 3% of one AdamW step (lr 3e-3); a real change moves values by whole steps

METHODS = {
    "target_only": {"sources": []},
    "joint": {"sources": ["src-a", "src-b"], "meta": {"enabled": False, "tasks_per_iter": 2}},
    # the paper's update (meta.source_grad 0, the default until the source term became it)
    "metarec": {"sources": ["src-a", "src-b"], "meta": {"tasks_per_iter": 2, "source_grad": 0.0}},
    "metarec_first_order_unclipped": {"sources": ["src-a", "src-b"], "grad_clip": None,
                                      "meta": {"tasks_per_iter": 3, "first_order": True, "persist_shared": 0.5, "source_grad": 0.0}},
    # the paper's update plus the rescaled source term (meta.source_grad 3, the default)
    "metarec_default": {"sources": ["src-a", "src-b"], "meta": {"tasks_per_iter": 2}},
}


def _config(root: str, method: str):
    over = METHODS[method]
    return config_from_dict({
        "name": f"bits-{method}",
        "seed": 3,
        "data": {"root": root, "target": "target", "sources": over["sources"], "max_len": 8},
        "model": {"hidden": 16, "blocks": 1, "dropout": 0.1},
        "train": {"batch_size": 16, "max_steps": STEPS, "eval_every": 3, "patience": 5, "progress": False,
                  "lr": 3e-3, "device": "cpu", "checkpoint_every": STEPS, "keep_checkpoints": 1,
                  "grad_clip": over.get("grad_clip", 5.0)},
        "vq": {"heads": 2},
        # the defaults when the references were recorded (the searched ones came later)
        "meta": {"inner_lr": 0.01, "persist_shared": 0.0, "source_batch_size": None, **over.get("meta", {"tasks_per_iter": 2})},
        "rescale": {"tau": 1.0},
    })


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def run_outputs(root: str, out: Path, method: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(final step checkpoint tensors, {history, metrics, files}) of one fixed-seed run."""
    train(_config(root, method), str(out))  # on one torch thread (tests/conftest.py)
    step_dir = out / "checkpoints" / f"step-{STEPS:08d}"
    tensors = st_load((step_dir / "tensors.safetensors").read_bytes())
    record = {
        "history": _without_timing([json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]),
        "metrics": _without_timing(json.loads((out / "metrics.json").read_text())),
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()),
    }
    return tensors, record


def assert_close_tree(got, want, where: str = "") -> None:
    """Same structure, keys, names and counts; floats within RTOL/ATOL."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close_tree(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close_tree(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, bool) and isinstance(got, (int, float)):
        assert math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("method", list(METHODS))
def test_fixed_seed_run_matches_the_recorded_one(tiny_domains, tmp_path, method):
    tensors, record = run_outputs(tiny_domains, tmp_path / "run", method)
    if os.environ.get("METAREC_RECORD_DIGESTS"):
        REFERENCE.mkdir(parents=True, exist_ok=True)
        (REFERENCE / f"{method}.safetensors").write_bytes(st_save(tensors))
        (REFERENCE / f"{method}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        return
    want = st_load((REFERENCE / f"{method}.safetensors").read_bytes())
    assert sorted(tensors) == sorted(want)
    for name, ref in want.items():
        got = tensors[name]
        assert (got.dtype, got.shape) == (ref.dtype, ref.shape), name
        if ref.is_floating_point():
            torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(got, ref), name
    assert_close_tree(record, json.loads((REFERENCE / f"{method}.json").read_text()), method)
