"""Replacing a checkpoint (`best/` after every better evaluation, a step checkpoint on a
replay) is one atomic step for readers, and a kill in the middle of it loses nothing."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from metarec import fs
from metarec.checkpoint import load_checkpoint, save_checkpoint
from metarec.cli import cli

MAX_STEPS = 8


def write_config(path: Path, root: str) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "name": "swap", "seed": 1,
        "data": {"root": root, "target": "target", "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": MAX_STEPS, "eval_every": 2,
                  "patience": 100, "checkpoint_every": 4},
        "vq": {"heads": 2},
    }))
    return path


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_kill_between_the_two_renames_of_the_best_swap_loses_nothing(tiny_domains, tmp_path):
    config, run = write_config(tmp_path / "c.yaml", tiny_domains), tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", str(config), "--out", str(run)])
    assert result.exit_code == 0, result.output
    best = run / "checkpoints" / "best"
    want = snapshot(best)
    test_metrics = json.loads((run / "metrics.json").read_text())["test"]
    # The state a kill between the renames of a replace leaves: best/ moved aside as its
    # previous version, the new version complete in its temp sibling, no best/.
    old = run / "checkpoints" / f".best.old-{'b' * 32}"
    best.rename(old)
    shutil.copytree(old, run / "checkpoints" / f".best.tmp-{'c' * 32}")
    # A reader still finds the run's best checkpoint.
    evaluated = CliRunner().invoke(cli, ["evaluate", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output[evaluated.output.index("{"):]) == test_metrics
    # The next start restores it instead of deleting it as a stale temp entry.
    (run / "metrics.json").unlink()
    resumed = CliRunner().invoke(cli, ["train", str(config), "--out", str(run), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "restored" in resumed.output and snapshot(best) == want
    assert not [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((run / "metrics.json").read_text())["test"] == test_metrics


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_reader_never_sees_a_missing_or_mixed_checkpoint_while_it_is_replaced(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fs, "_exchange", lambda a, b: False)
    model = torch.nn.Linear(64, 64)
    uri = str(tmp_path / "checkpoints" / "best")

    def save(version: int) -> None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float(version))
        save_checkpoint(uri, model, None, {"version": version})

    save(0)
    swaps, done, errors = 300, threading.Event(), []

    def writer():
        try:
            for version in range(1, swaps + 1):
                save(version)
        except BaseException as err:  # noqa: BLE001 - reported by the test
            errors.append(err)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    reads, seen = 0, set()
    try:
        while not done.is_set() or reads == 0:
            ckpt = load_checkpoint(uri)  # raises CheckpointError if it finds no checkpoint
            version = ckpt.state["version"]
            assert all(bool((t == float(version)).all()) for t in ckpt.params.values()), f"state of version {version} with other tensors"
            reads, seen = reads + 1, seen | {version}
    finally:
        thread.join()
    assert not errors and reads > 0
    assert load_checkpoint(uri).state["version"] == swaps
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["best"]
