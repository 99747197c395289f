"""Fixed-seed CPU runs give bit-identical results across refactors.

The digests below were recorded from the code before the issue-13 refactor (run
directory, Problem and Trainer split), and re-recorded once since (see RECORDED).
Each run trains a few steps of one method on the tiny synthetic domains and digests what it leaves in its run directory: every tensor of
the final step checkpoint (parameters, optimizer state, RNG state) byte for byte, the
non-timing columns of `history.jsonl` and `metrics.json` (losses, weights and metrics
at full float precision), and the list of files in the run directory. A change that
alters any bit of the training, or the run layout, fails here.

If a change is *meant* to alter the numbers, re-record with `METAREC_RECORD_DIGESTS=1`
and say so in the commit message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load

from metarec.config import config_from_dict
from metarec.train import train

STEPS = 6
TIMING_KEYS = {"train_seconds", "eval_seconds", "eval_users_per_s", "task_seconds"}

METHODS = {
    "target_only": {"sources": []},
    "joint": {"sources": ["src-a", "src-b"], "meta": {"enabled": False, "tasks_per_iter": 2}},
    "metarec": {"sources": ["src-a", "src-b"], "meta": {"tasks_per_iter": 2}},
    "metarec_first_order_unclipped": {"sources": ["src-a", "src-b"], "grad_clip": None,
                                      "meta": {"tasks_per_iter": 3, "first_order": True, "persist_shared": 0.5}},
}

# re-recorded (CPU, one torch thread) when issue 10 changed the dropout masks' random
# stream (metarec/models/dropout.py), the LRU scan's rounding and AdamW to torch's fused
# kernel; before that they held unchanged from the unrefactored code (main 4aac6b1)
# through the issue-13 refactor
RECORDED = {
    "target_only": {
        "tensors": "b17140f0ad8d16fe292224f53f63185e6369c55d314b021d347f94966caeedc9",
        "history": "4c819cfb649e39bc09f7c3a22477e39946554c45bcba450b2986e0febf01a250",
        "metrics": "10a680131130522309f534564ce237ae50378c92e53a1734c2cd2ccd484ac2d4",
        "files": "31d8ec0f190de91c25ec896a898c1a296c644d86f0cd094936344b0ca37688ce",
    },
    "joint": {
        "tensors": "884a64ac8b33b9f4497fe096d86886bd0059aab011e2f51478e76d41539b5280",
        "history": "0fdfbadd4837f45f97f232c0f44dafbff93ed3086e17f27a481e2b91e0e29c57",
        "metrics": "b5b448d8cef3de5eeacc8a59af3bc5dca984d5f569317ace370b13e212cc121b",
        "files": "31d8ec0f190de91c25ec896a898c1a296c644d86f0cd094936344b0ca37688ce",
    },
    "metarec": {
        "tensors": "ff1254d6441701ca48a927ea67d981a242c7b9b734483c0053cf8ae8e36da8a1",
        "history": "00f393c943aa72cc5e6b81ddea35c3517d6a13b6acdcb93ec289f00ee0729e96",
        "metrics": "f32acd188f7aa971ef90a87dd1d05637fa956a22a70c24ef962e0d1a771c7de3",
        "files": "31d8ec0f190de91c25ec896a898c1a296c644d86f0cd094936344b0ca37688ce",
    },
    "metarec_first_order_unclipped": {
        "tensors": "950331592b3ce54a823a45cf624e147f0611bbd64cd0103d3a55c743409e5b8c",
        "history": "4e06aba7e15cb10e59b19343097b71fae2447585d0898191cdef65d93490f390",
        "metrics": "0eb8a0b42662b7bc8a9060b27c76c815d521ea4c9be922c2aa66347391a5ff53",
        "files": "31d8ec0f190de91c25ec896a898c1a296c644d86f0cd094936344b0ca37688ce",
    },
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
        "meta": over.get("meta", {"tasks_per_iter": 2}),
    })


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _without_timing(value, rounded: bool = False):
    """`value` without its timing keys; the reported source weights rounded to 12 digits:
    `meta.outer.task_weight` sums over a set of tensor names, whose order (string hashing)
    changes from one process to the next, and so may the last bit of that sum. The
    weights that enter the update are per tensor and exact: the tensor digest covers them."""
    if isinstance(value, dict):
        return {k: _without_timing(v, rounded or k in ("weights", "source_weights"))
                for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v, rounded) for v in value]
    if rounded and isinstance(value, float):
        return float(f"{value:.12g}")
    return value


def _float_repr(value):
    """JSON with every float as its exact repr (json already round-trips floats exactly)."""
    return json.dumps(value, sort_keys=True).encode()


def run_digests(root: str, out: Path, method: str) -> dict[str, str]:
    train(_config(root, method), str(out))  # on one torch thread (tests/conftest.py)
    step_dir = out / "checkpoints" / f"step-{STEPS:08d}"
    tensors = st_load((step_dir / "tensors.safetensors").read_bytes())
    tensor_digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        tensor_digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        tensor_digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    return {
        "tensors": tensor_digest.hexdigest(),
        "history": _sha(_float_repr(_without_timing(history))),
        "metrics": _sha(_float_repr(_without_timing(metrics))),
        "files": _sha("\n".join(files).encode()),
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_fixed_seed_run_is_bit_identical_to_the_recorded_one(tiny_domains, tmp_path, method):
    got = run_digests(tiny_domains, tmp_path / "run", method)
    if os.environ.get("METAREC_RECORD_DIGESTS"):
        print(f"\n{method!r}: {json.dumps(got)},")
        return
    assert got == RECORDED[method]
