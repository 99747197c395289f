"""Paired comparison of two runs with a bootstrap interval (metarec.compare)."""

from __future__ import annotations

import numpy as np
import pytest

from metarec.compare import format_comparison, ndcg_at_10, paired_bootstrap


def test_ndcg_at_10_per_user():
    np.testing.assert_allclose(ndcg_at_10([1, 3, 10, 11, 500]), [1.0, 0.5, 1 / np.log2(11), 0.0, 0.0])


def test_bootstrap_interval_brackets_the_difference_and_shrinks_with_more_users():
    rng = np.random.default_rng(0)
    base = rng.random(300)
    other = base + 0.05 + rng.normal(0, 0.2, 300)
    diff, lower, upper = paired_bootstrap(base, other, seed=1)
    assert diff == pytest.approx((other - base).mean())
    assert lower < diff < upper
    assert lower > 0  # a clear gain: the interval excludes 0
    assert paired_bootstrap(base, other, seed=1) == (diff, lower, upper)  # seeded
    big_base = rng.random(3000)
    big_other = big_base + 0.05 + rng.normal(0, 0.2, 3000)
    _, big_lower, big_upper = paired_bootstrap(big_base, big_other, seed=1)
    assert big_upper - big_lower < (upper - lower) / 2  # ~ 1/sqrt(10)


def test_no_difference_gives_an_interval_around_zero():
    rng = np.random.default_rng(2)
    base = rng.random(500)
    other = base + rng.normal(0, 0.1, 500) - 0.0  # noise only
    diff, lower, upper = paired_bootstrap(base, other - (other - base).mean())
    assert abs(diff) < 1e-12 and lower < 0 < upper


def test_format_says_whether_the_interval_includes_zero():
    c = {"metric": "NDCG@10", "difference": 0.0012, "relative": 0.033, "ci95": [-0.001, 0.0035], "n_users": 300}
    line = format_comparison(c, "MetaRec vs target-only")
    assert line == ("MetaRec vs target-only NDCG@10: +0.0012 (+3.3%), 95% interval [-0.0010, +0.0035] "
                    "(includes 0: within noise; paired bootstrap over 300 test users)")
    c["ci95"] = [0.0002, 0.0035]
    assert "(excludes 0;" in format_comparison(c, "x")


def test_unpaired_arrays_are_rejected():
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap(np.zeros(3), np.zeros(4))


# ------------------------------------------------------------------ `metarec compare` on trained runs


TINY_RUN = {
    "data": {"target": "target", "max_len": 6},
    "model": {"hidden": 16, "blocks": 1},
    "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": 6, "eval_every": 3},
    "vq": {"heads": 2},
    "meta": {"tasks_per_iter": 2},
}


def _train_tiny(root: str, out, **data) -> str:
    """`metarec train` of a tiny config into `out` (through the CLI)."""
    import copy

    import yaml

    raw = copy.deepcopy(TINY_RUN)
    raw["name"] = out.name
    raw["data"].update(root=root, **data)
    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = _invoke("train", config, "--out", out)
    assert result.exit_code == 0, result.output
    return str(out)


@pytest.fixture(scope="module")
def tiny_runs(tiny_domains_module, tmp_path_factory):
    """Runs on the tiny domains: target-only and MetaRec on 'target', target-only on 'src-b',
    and target-only on a 30-user subsample of 'target'."""
    base = tmp_path_factory.mktemp("runs")
    return {
        "target_only": _train_tiny(tiny_domains_module, base / "target_only"),
        "metarec": _train_tiny(tiny_domains_module, base / "metarec", sources=["src-a", "src-b"]),
        "other_target": _train_tiny(tiny_domains_module, base / "other_target", target="src-b"),
        "subsample": _train_tiny(tiny_domains_module, base / "subsample", target_users=30),
    }


def _invoke(*args):
    from click.testing import CliRunner

    from metarec.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


def test_compare_prints_both_runs_and_the_interval(tiny_runs):
    import json

    base, run = tiny_runs["target_only"], tiny_runs["metarec"]
    result = _invoke("compare", base, run, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert [r["run"] for r in out["runs"]] == [base, run] and out["baseline"] == base and out["target"] == "target"
    for row in out["runs"]:  # the best checkpoint's test metrics, as the run recorded them
        recorded = json.loads(open(f"{row['run']}/metrics.json").read())["test"]
        for metric in ("NDCG@10", "Recall@10", "MRR", "n_users"):
            assert row["metrics"][metric] == pytest.approx(recorded[metric], abs=1e-12)
    (diff,) = out["differences"]
    for metric in ("NDCG@10", "Recall@10", "MRR"):
        d = diff[metric]
        assert d["difference"] == pytest.approx(out["runs"][1]["metrics"][metric] - out["runs"][0]["metrics"][metric], abs=1e-12)
        assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
        assert d["excludes_zero"] == (not d["ci95"][0] <= 0 <= d["ci95"][1])
        assert d["n_users"] == out["n_users"] == out["runs"][0]["metrics"]["n_users"]

    table = _invoke("compare", base, run)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["run", "NDCG@10", "Recall@10", "MRR"]
    assert lines[1].startswith(base) and lines[1].endswith("(baseline)") and lines[2].startswith(run)
    assert f"{out['runs'][1]['metrics']['NDCG@10']:.4f}" in lines[2]
    assert lines[3].startswith(f"difference from {base}, 95% paired bootstrap interval over {out['n_users']} test users")
    d = diff["NDCG@10"]
    assert lines[5].startswith(run) and f"{d['difference']:+.4f} [{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]" in lines[5]

    swapped = json.loads(_invoke("compare", base, run, "--baseline", run, "--json").output)
    assert swapped["baseline"] == run and swapped["differences"][0]["run"] == base
    assert swapped["differences"][0]["NDCG@10"]["difference"] == pytest.approx(-d["difference"], abs=1e-12)


@pytest.mark.parametrize("other,named", [("other_target", "data.target: 'src-b' vs 'target'"),
                                         ("subsample", "target subsample")])
def test_compare_refuses_runs_on_other_test_users(tiny_runs, other, named):
    result = _invoke("compare", tiny_runs["target_only"], tiny_runs[other])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert named in lines[0] and tiny_runs[other] in lines[0]


def test_compare_needs_two_runs(tiny_runs):
    result = _invoke("compare", tiny_runs["metarec"])
    assert result.exit_code == 2 and "at least two different runs" in result.output


def test_compare_runs_on_s3(tiny_runs, moto_s3):
    import json
    import os

    from metarec import fs

    uris = []
    for key in ("target_only", "metarec"):
        local = tiny_runs[key]
        for folder, _dirs, files in os.walk(local):
            for file in files:
                path = os.path.join(folder, file)
                fs.write_bytes(f"s3://metarec-test/runs/{key}/{os.path.relpath(path, local)}", open(path, "rb").read())
        uris.append(f"s3://metarec-test/runs/{key}")
    on_s3 = json.loads(_invoke("compare", *uris, "--json").output)
    local = json.loads(_invoke("compare", tiny_runs["target_only"], tiny_runs["metarec"], "--json").output)
    assert [r["run"] for r in on_s3["runs"]] == uris
    assert [r["metrics"] for r in on_s3["runs"]] == [r["metrics"] for r in local["runs"]]
    assert on_s3["differences"][0]["NDCG@10"] == local["differences"][0]["NDCG@10"]
