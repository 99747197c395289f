"""`metarec plot`: training curves and the source-weight heatmap of a run directory."""

from __future__ import annotations

import io
import json
import os
from contextlib import redirect_stderr

import numpy as np
import pytest
from click.testing import CliRunner

from metarec import fs
from metarec.cli import cli as main
from metarec.config import config_from_dict
from metarec.data.synthetic import generate_domains
from metarec.errors import MetaRecError
from metarec.plots import CURVES_FILE, WEIGHTS_FILE, loss_series, plot_run, rolling_mean, weight_matrix

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path: str) -> np.ndarray:
    from matplotlib.image import imread

    data = fs.read_bytes(path)
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas
    return image


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    """A tiny MetaRec run and a tiny target-only run trained by the real trainer."""
    from metarec.train import train

    base = tmp_path_factory.mktemp("plots")
    root = generate_domains(
        base / "prepared",
        names=("src-a", "src-b", "target"),
        n_users={"src-a": 60, "src-b": 50, "target": 30},
        n_items={"src-a": 40, "src-b": 36, "target": 24},
        seq_len={"src-a": 10, "src-b": 10, "target": 6},
        n_concepts=6,
    )
    out = {}
    for method, sources in (("metarec", ["src-a", "src-b"]), ("target_only", [])):
        cfg = config_from_dict({
            "name": method,
            "data": {"root": root, "target": "target", "sources": sources, "max_len": 5},
            "model": {"hidden": 16, "blocks": 1},
            "train": {"batch_size": 16, "max_steps": 4, "eval_every": 2, "progress": False, "device": "cpu"},
            "vq": {"heads": 2},
            "meta": {"tasks_per_iter": 2},
        })
        out[method] = str(base / method)
        train(cfg, out[method])
    return out


def test_metarec_run_gets_curves_and_heatmap(runs):
    run = runs["metarec"]
    paths = plot_run(run)
    assert paths == [f"{run}/{CURVES_FILE}", f"{run}/{WEIGHTS_FILE}"]
    curves, heatmap = (_assert_png(p) for p in paths)
    assert curves.shape[1] > heatmap.shape[0]  # the heatmap is a wide strip, the curves a two-panel figure


def test_target_only_run_gets_no_heatmap(runs):
    run = runs["target_only"]
    assert plot_run(run) == [f"{run}/{CURVES_FILE}"]
    _assert_png(f"{run}/{CURVES_FILE}")
    assert not os.path.exists(f"{run}/{WEIGHTS_FILE}")


def test_cli_plot_prints_paths(runs):
    result = CliRunner().invoke(main, ["plot", runs["target_only"]])
    assert result.exit_code == 0, result.output
    assert result.output.split() == [f"{runs['target_only']}/{CURVES_FILE}"]


def test_weight_matrix_bins_and_marks_unsampled_sources():
    rows = [
        {"step": 1, "weights": {"a": 0.2, "b": 0.8}},
        {"step": 2, "weights": {"a": 0.4, "c": 0.6}},
        {"step": 3, "loss": 1.0},  # no weights: not a column
        {"step": 4, "weights": {"b": 0.3, "c": 0.7}},
        {"step": 5, "weights": {"b": 0.5, "c": 0.5}},
    ]
    sources, edges, matrix = weight_matrix(rows, max_columns=2)
    assert sources == ["a", "b", "c"]
    np.testing.assert_allclose(edges, [0.5, 3.5, 5.5])  # a bin starts at its first weighted step
    np.testing.assert_allclose(matrix, [[0.3, np.nan], [0.8, 0.4], [0.6, 0.6]])

    _sources, edges, matrix = weight_matrix(rows)  # fewer rows than the column limit: one per iteration
    assert matrix.shape == (3, 4)
    np.testing.assert_allclose(edges, [0.5, 1.5, 3.5, 4.5, 5.5])


def test_loss_series_and_rolling_mean():
    rows = [{"step": s, "loss": float(s), "target_loss": float(s)} for s in range(1, 4)]
    assert list(loss_series(rows)) == ["target_loss"]  # target-only: `loss` repeats target_loss
    rows = [{"step": s, "loss": 2.0 * s, "target_loss": float(s), "source_loss": 3.0} for s in range(1, 4)]
    series = loss_series(rows)
    assert list(series) == ["loss", "target_loss", "source_loss"]
    np.testing.assert_array_equal(series["loss"][1], [2.0, 4.0, 6.0])

    values = np.array([1.0, 3.0, 5.0, 7.0, 20.0])
    expected = [np.mean(values[max(0, i - 2) : i + 1]) for i in range(values.size)]
    np.testing.assert_allclose(rolling_mean(values, 3), expected)


def test_crafted_history_on_s3(moto_s3):
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, 301):
        w = rng.dirichlet([1.0, 1.0])
        row = {"step": step, "weights": {"books": w[0], "music": w[1]}, "target_loss": 3.0 - step / 200, "source_loss": 4.0, "vq_loss": 0.01}
        if step % 50 == 0:
            row["val"] = {"NDCG@10": step / 1000}
        rows.append(row)
    run = "s3://plots/run"
    fs.write_bytes(f"{run}/history.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    paths = plot_run(run)
    assert paths == [f"{run}/{CURVES_FILE}", f"{run}/{WEIGHTS_FILE}"]
    for path in paths:
        assert fs.read_bytes(path).startswith(PNG_MAGIC)


def test_bad_history(tmp_path):
    with pytest.raises(MetaRecError, match="history.jsonl"):
        plot_run(str(tmp_path))
    (tmp_path / "history.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss":\n')
    with pytest.raises(MetaRecError, match="line 2"):
        plot_run(str(tmp_path))


def test_missing_matplotlib_is_one_line_not_a_traceback(runs, no_matplotlib):
    """Without matplotlib at all: plot_run raises MetaRecError, `metarec plot` prints one
    line and exits 2, the demo's plot step prints a one-line note, the sweep has no plot."""
    with pytest.raises(ModuleNotFoundError):
        import matplotlib  # noqa: F401  (the blocker works)
    for run in runs.values():
        for name in (CURVES_FILE, WEIGHTS_FILE):
            if os.path.exists(f"{run}/{name}"):
                os.remove(f"{run}/{name}")
        with pytest.raises(MetaRecError, match=r"needs matplotlib.*pip install matplotlib"):
            plot_run(run)
        assert not os.path.exists(f"{run}/{CURVES_FILE}")

    result = CliRunner().invoke(main, ["plot", runs["metarec"]])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: plotting needs matplotlib")
    assert "Traceback" not in result.output

    from metarec import demo

    err = io.StringIO()
    with redirect_stderr(err):
        demo._plot(runs["target_only"])
    assert err.getvalue().startswith("note: no plots (plotting needs matplotlib") and err.getvalue().count("\n") == 1
