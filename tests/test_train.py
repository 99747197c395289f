"""End-to-end training through the API and the CLI on tiny synthetic domains."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from metarec.config import config_from_dict
from metarec.errors import CheckpointError, DataError, NonFiniteError
from metarec.evaluate import evaluate_run
from metarec.train import Trainer, train

METAREC = [sys.executable, "-m", "metarec.cli"]


def tiny_config(root, sources=(), **train_over):
    train_cfg = {"batch_size": 16, "max_steps": 12, "eval_every": 4, "patience": 5, "progress": False, "lr": 3e-3}
    train_cfg.update(train_over)
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"root": root, "target": "target", "sources": list(sources), "max_len": 8},
        "model": {"hidden": 16, "blocks": 1, "dropout": 0.1},
        "train": train_cfg,
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 2},
    }


def test_target_only_run_dir_and_evaluate(tiny_domains, tmp_path):
    out = tmp_path / "run"
    metrics = train(config_from_dict(tiny_config(tiny_domains)), str(out))
    for name in ("config.yaml", "history.jsonl", "metrics.json", "checkpoints/best/tensors.safetensors"):
        assert (out / name).is_file(), name
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["best_step"] in (4, 8, 12)
    assert set(on_disk["test"]) >= {"NDCG@10", "Recall@10", "MRR"}
    assert 0 <= on_disk["test"]["NDCG@10"] <= on_disk["test"]["Recall@10"] <= 1
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in history] == list(range(1, 13))
    assert [r["step"] for r in history if "val" in r] == [4, 8, 12]
    best_val = max(r["val"]["NDCG@10"] for r in history if "val" in r)
    assert on_disk["val"]["NDCG@10"] == pytest.approx(best_val)
    # the best checkpoint reproduces the recorded test metrics
    again = evaluate_run(str(out))
    for key in ("NDCG@10", "Recall@10", "MRR"):
        assert again[key] == pytest.approx(metrics["test"][key], abs=1e-7)
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["target"] == "target"


def test_refit_trains_every_step_and_tests_the_last_one(tiny_domains, tmp_path):
    """data.train_on_validation: the target's validation items become training labels
    (never its test items), the sources' do not, and the run keeps the last step instead
    of the best validation."""

    def labelled(windows):
        _, labels = windows.batch(np.arange(len(windows)))
        return sorted(labels[labels != 0].tolist())

    raw = tiny_config(tiny_domains, sources=("src-a",), max_steps=12, eval_every=1, patience=2)
    plain_trainer = Trainer.from_config(config_from_dict(raw), str(tmp_path / "plain"))
    plain = plain_trainer.problem
    raw["data"]["train_on_validation"] = True
    trainer = Trainer.from_config(config_from_dict(raw), str(tmp_path / "refit"))
    refit = trainer.problem
    _, val_targets = refit.domains["target"].eval_examples("val")
    assert labelled(refit.windows["target"]) == sorted(labelled(plain.windows["target"]) + val_targets.tolist())
    assert labelled(refit.windows["src-a"]) == labelled(plain.windows["src-a"])
    plain_metrics = plain_trainer.fit()
    assert plain_trainer.state.step < 12 and plain_metrics["best_step"] < plain_trainer.state.step  # patience 2 stops it
    metrics = trainer.fit()
    assert trainer.state.step == 12 and metrics["best_step"] == 12  # but never a refit


def test_training_lowers_the_target_loss(tiny_domains, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_domains, max_steps=40, eval_every=40))
    trainer = Trainer.from_config(cfg, str(tmp_path / "run"))
    trainer.fit()
    losses = [r["loss"] for r in trainer.state.history]
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5


@pytest.mark.parametrize("method_over", [{}, {"meta": {"enabled": False, "tasks_per_iter": 2}}])
def test_joint_and_metarec_runs_record_weights(tiny_domains, tmp_path, method_over):
    raw = tiny_config(tiny_domains, sources=("src-a", "src-b"), max_steps=6, eval_every=3)
    raw.update(method_over)
    cfg = config_from_dict(raw)
    metrics = train(cfg, str(tmp_path / "run"))
    assert metrics["method"] == cfg.method
    if cfg.method == "metarec":
        assert len(metrics["source_weights"]) == 6
        first = metrics["source_weights"][0]
        assert set(first) == {"step", "src-a", "src-b"}
    else:
        assert metrics["source_weights"] == []


def test_nan_loss_stops_with_named_error(tiny_domains, tmp_path):
    trainer = Trainer.from_config(config_from_dict(tiny_config(tiny_domains)), str(tmp_path / "run"))
    with torch.no_grad():
        trainer.model.encoder.parameters().__next__().fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="iteration 0"):
        trainer.fit()


def test_evaluate_missing_checkpoint(tiny_domains, tmp_path):
    with pytest.raises(CheckpointError, match="not a run directory"):
        evaluate_run(str(tmp_path / "nothing"))
    out = tmp_path / "run"
    train(config_from_dict(tiny_config(tiny_domains, max_steps=4)), str(out))
    import shutil

    shutil.rmtree(out / "checkpoints" / "best")
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        evaluate_run(str(out))


def _write_cfg(tmp_path, raw):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_train_evaluate_and_refuse_overwrite(tiny_domains, tmp_path):
    cfg = _write_cfg(tmp_path, tiny_config(tiny_domains, max_steps=4))
    out = tmp_path / "run"
    res = subprocess.run([*METAREC, "train", str(cfg), "--out", str(out), "--set", "train.max_steps=4"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    res = subprocess.run([*METAREC, "evaluate", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["NDCG@10"] == pytest.approx(printed["test"]["NDCG@10"], abs=1e-7)
    before = (out / "metrics.json").read_bytes()
    res = subprocess.run([*METAREC, "train", str(cfg), "--out", str(out)], capture_output=True, text=True)
    assert res.returncode == 2 and "already holds a run" in res.stderr and "Traceback" not in res.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_cli_unknown_key_is_one_line(tiny_domains, tmp_path):
    cfg = _write_cfg(tmp_path, tiny_config(tiny_domains))
    res = subprocess.run([*METAREC, "train", str(cfg), "--set", "vq.haeds=2", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0
    assert "vq.haeds" in res.stderr and "vq.heads" in res.stderr
    assert not (tmp_path / "r").exists()


def test_cli_prepare_reports_bad_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 1 2 3\n2 4 x 5\n")
    res = subprocess.run([*METAREC, "prepare", "--name", "bad", "--out", str(tmp_path / "p"), str(bad)], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "bad.txt" in res.stderr and "line 2" in res.stderr
    assert not (tmp_path / "p" / "bad").exists()


def test_missing_domain_names_the_path(tmp_path):
    with pytest.raises(DataError) as e:
        train(config_from_dict(tiny_config(str(tmp_path / "empty"))), str(tmp_path / "run"))
    assert "target" in str(e.value) and "prepare" in str(e.value)
    assert not (Path(tmp_path) / "run" / "metrics.json").exists()
