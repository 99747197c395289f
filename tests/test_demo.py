"""`metarec demo --quick`: the README's main job, end to end through the CLI, on an
install without matplotlib (the whole package blocked): the table still prints, the
plots are a one-line note. (With matplotlib the demo's figures are `plot_run`'s,
tested in test_plots.py; CI's README demo command runs with it.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
DEMO_WITHOUT_MATPLOTLIB = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); import no_matplotlib; no_matplotlib.block(); "
    "from metarec.cli import main; sys.argv[0] = 'metarec'; main()"
)


@pytest.mark.slow
def test_demo_quick_prints_its_table_and_writes_its_runs(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run(
        [sys.executable, "-c", DEMO_WITHOUT_MATPLOTLIB, str(TESTS), "demo", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=1800,  # hang guard: 14 min seen under load
    )
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.splitlines()
    assert lines[0].split() == ["method", "NDCG@10", "Recall@10", "MRR"]
    assert lines[1].startswith("target_only") and lines[2].startswith("metarec")
    table = json.loads((out / "demo.json").read_text())
    # the table printed is the one written (which method wins is within noise at this size: not asserted)
    for line, method in zip(lines[1:3], ("target_only", "metarec")):
        printed = [float(v) for v in line.split()[1:]]
        assert printed == pytest.approx([table[method][k] for k in ("NDCG@10", "Recall@10", "MRR")], abs=1e-4)
        assert all(0.0 <= v <= 1.0 for v in printed)

    # the difference comes with its noise estimate, from per-user ranks that reproduce the test metrics
    c = table["comparison"]
    assert c["base"] == pytest.approx(table["target_only"]["NDCG@10"], abs=1e-9)
    assert c["run"] == pytest.approx(table["metarec"]["NDCG@10"], abs=1e-9)
    assert c["difference"] == pytest.approx(c["run"] - c["base"], abs=1e-9)
    assert c["ci95"][0] < c["difference"] < c["ci95"][1] and c["n_users"] == table["metarec"]["n_users"]
    assert lines[3].startswith("MetaRec vs target-only NDCG@10: ") and "95% interval [" in lines[3]
    assert "paired bootstrap over" in lines[3]

    # no matplotlib: one note per method, no traceback, no figures
    notes = [line for line in res.stderr.splitlines() if line.startswith("note: no plots (plotting needs matplotlib")]
    assert len(notes) == 2 and "Traceback" not in res.stderr
    for method in ("target_only", "metarec"):
        metrics = json.loads((out / method / "metrics.json").read_text())
        assert metrics["test"]["NDCG@10"] == pytest.approx(table[method]["NDCG@10"], abs=1e-9)
        assert (out / method / "history.jsonl").is_file() and (out / method / "checkpoints" / "best").is_dir()
        assert not list((out / method).glob("*.png"))
