"""The CPU run-time warning of `metarec train` (metarec.runtime)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from metarec.cli import cli
from metarec.config import load_config
from metarec.runtime import cpu_time_warning, projected_cpu_seconds

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CPU = ["--set", "train.device=cpu"]


@pytest.mark.parametrize("name", ["metarec_video", "target_only_video"])
def test_reference_configs_warn_on_cpu_and_point_to_their_cpu_twin(name):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path, ["train.device=cpu"])
    assert projected_cpu_seconds(cfg) > 3600
    warning = cpu_time_warning(cfg, str(path))
    assert warning.startswith("warning: on CPU this run may take about ") and "\n" not in warning
    assert warning.endswith(f"for a CPU-sized run use {CONFIGS / f'{name}_cpu.yaml'}")


@pytest.mark.parametrize("name", ["metarec_video_cpu", "target_only_video_cpu"])
def test_cpu_configs_do_not_warn(name):
    path = CONFIGS / f"{name}.yaml"
    cfg = load_config(path)
    assert projected_cpu_seconds(cfg) < 3600
    assert cpu_time_warning(cfg, str(path)) is None


def test_reference_metarec_config_projects_near_the_measured_10_s_per_step():
    cfg = load_config(CONFIGS / "metarec_video.yaml", ["train.device=cpu"])
    assert 8 < projected_cpu_seconds(cfg) / cfg.train.max_steps < 12


def test_no_warning_off_cpu_or_for_a_small_budget():
    cfg = load_config(CONFIGS / "metarec_video.yaml", ["train.device=cuda"])
    assert cpu_time_warning(cfg, None) is None
    cfg = load_config(CONFIGS / "metarec_video.yaml", ["train.device=cpu", "train.max_steps=100"])
    assert cpu_time_warning(cfg, None) is None


def test_train_prints_the_warning_before_it_starts(tmp_path):
    """The line comes first; the run then fails on the missing data as usual (exit 2)."""
    path = CONFIGS / "target_only_video.yaml"
    result = CliRunner().invoke(cli, ["train", str(path), *CPU, "--set", f"data.root={tmp_path}", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("warning: on CPU this run may take about 3 h")
    assert lines[0].endswith("target_only_video_cpu.yaml") and lines[1].startswith("error: ")
