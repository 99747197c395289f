"""Fixed-seed CPU runs give bit-identical results across refactors.

The digests below were recorded from the code before the issue-13 refactor (run
directory, Problem and Trainer split). Each run trains a few steps of one method on the
tiny synthetic domains and digests what it leaves in its run directory: every tensor of
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

# recorded on the unrefactored code (main 4aac6b1), CPU, one torch thread
RECORDED = {
    "target_only": {
        "tensors": "23bd984d688e8ec6128e0b21cc8d3df58da4875f8b2acfe8cd971ea1c66dd548",
        "history": "e7095ff70e3d7b17ca54a8d67d7cb9b023b215ba80287602c85fd9fb0717aecf",
        "metrics": "7457e121a91fadf43f75c3137eec19d1e23836cfa52327a713a527142dc109f4",
        "files": "31d8ec0f190de91c25ec896a898c1a296c644d86f0cd094936344b0ca37688ce",
    },
    "joint": {
        "tensors": "62e2841e67fc77edd06d5c331a46abf6971c2d6e446d05f8e0d061d5341ac497",
        "history": "23ceb8f146a0db7ad453686e9d0c7a267785866d2433a29c364a4e924384df2f",
        "metrics": "8d97716d6741bbb34119889a00e2415a334146a98bb01ba4030cc29f3ae330d8",
        "files": "31d8ec0f190de91c25ec896a898c1a296c644d86f0cd094936344b0ca37688ce",
    },
    "metarec": {
        "tensors": "6c368d325132826d8814e285e0bfb91eb3fa291814ad555da313da1c2cc0c5ff",
        "history": "d664c9632eea95e7b299cbca872d0b7492f8eb79f3d2224373c9f2a176929d88",
        "metrics": "9359f102221da3a153365b0ea09b8fb4247da5daea7ab74b4891e9c9c8d4b797",
        "files": "31d8ec0f190de91c25ec896a898c1a296c644d86f0cd094936344b0ca37688ce",
    },
    "metarec_first_order_unclipped": {
        "tensors": "e606449d86a53a93dd7e674b4b11915854c4a02b9080317c8a9ddfffaf016d4c",
        "history": "362bbb2647f954588e9d6c71ca25772f4325f592d64f9103e14194ccf0863988",
        "metrics": "5a2f4a26c535ea9205e35eef8aa7a89201a21c0752d629924d42ff5a067ba04a",
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(_config(root, method), str(out))
    finally:
        torch.set_num_threads(threads)
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
