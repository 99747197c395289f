"""`metarec demo --quick`: the README's main job, end to end through the CLI."""

import json
import subprocess
import sys

import pytest


def test_demo_quick_metarec_beats_target_only(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-m", "metarec.cli", "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["method", "NDCG@10", "Recall@10", "MRR"]
    assert lines[1].startswith("target_only") and lines[2].startswith("metarec")
    table = json.loads((out / "demo.json").read_text())
    assert table["metarec"]["NDCG@10"] > table["target_only"]["NDCG@10"], table
    # the table printed is the one written
    assert float(lines[2].split()[1]) == pytest.approx(table["metarec"]["NDCG@10"], abs=1e-4)
    for method in ("target_only", "metarec"):
        assert (out / method / "metrics.json").is_file()
        assert (out / method / "training_curves.png").is_file()  # the test extra brings matplotlib
    assert (out / "metarec" / "source_weights.png").is_file()
