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


def test_demo_quick_metarec_beats_target_only(tmp_path):
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
    assert table["metarec"]["NDCG@10"] > table["target_only"]["NDCG@10"], table
    # the table printed is the one written
    assert float(lines[2].split()[1]) == pytest.approx(table["metarec"]["NDCG@10"], abs=1e-4)

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
        assert (out / method / "metrics.json").is_file()
        assert not list((out / method).glob("*.png"))
