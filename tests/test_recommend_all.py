"""`metarec recommend --all-users`: every target user's top-k into one Parquet file, locally,
on S3 and with Ray Data (the same rows)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from metarec import fs
from metarec.cli import cli
from metarec.config import config_from_dict
from metarec.data.domain import Domain, load_item_map
from metarec.errors import MetaRecError
from metarec.recommend import recommend
from metarec.recommend_all import ChunkScorer, recommend_all_users
from metarec.train import train
from test_recommend import MAX_LEN, _prepare


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A tiny MetaRec run on 'shop' (40 users, 30 items with keys 'sku-...', users 'cust-...')."""
    base = tmp_path_factory.mktemp("recommend_all")
    _prepare(str(base / "prepared"))
    cfg = config_from_dict({
        "name": "tiny",
        "data": {"root": str(base / "prepared"), "target": "shop", "sources": ["src-a", "src-b"], "max_len": MAX_LEN},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 16, "max_steps": 4, "eval_every": 2, "progress": False, "device": "cpu"},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 2},
    })
    train(cfg, str(base / "run"))
    return str(base / "run")


@pytest.fixture(scope="module")
def local_output(run_dir, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("out") / "top.parquet")
    summary = recommend_all_users(run_dir, out, k=5, batch_size=7)  # 40 users: 5 chunks of 7 and one of 5
    assert summary == {"out": out, "target": "shop", "users": 40, "k": 5}
    return out


def _domain(run_dir):
    root = f"{run_dir}/../prepared"
    return Domain.load(root, "shop"), load_item_map(root, "shop")


def test_one_row_per_user_as_recommend_user_gives_it(run_dir, local_output):
    domain, key_to_id = _domain(run_dir)
    table = pq.read_table(local_output)
    assert table.schema.names == ["user", "items", "scores"]
    assert table.column("user").to_pylist() == domain.users
    for user, seq, items, scores in zip(domain.users, domain.sequences, table.column("items").to_pylist(),
                                        table.column("scores").to_pylist()):
        single = recommend(run_dir, user=user, k=5)["items"]
        assert items == [it["item"] for it in single]
        np.testing.assert_allclose(scores, [it["score"] for it in single], rtol=1e-5, atol=1e-6)
        assert len(items) == 5 and not {key_to_id[i] for i in items} & set(seq.tolist())  # history excluded
        assert scores == sorted(scores, reverse=True)


def test_k_beyond_the_catalogue_keeps_every_unseen_item(run_dir, tmp_path):
    domain, key_to_id = _domain(run_dir)
    out = str(tmp_path / "all.parquet")
    recommend_all_users(run_dir, out, k=10_000, batch_size=16)
    for seq, items in zip(domain.sequences, pq.read_table(out).column("items").to_pylist()):
        assert sorted(items) == sorted(set(key_to_id) - {k for k, i in key_to_id.items() if i in set(seq.tolist())})


def test_a_failure_leaves_the_previous_output_and_no_temp_file(run_dir, tmp_path, monkeypatch):
    out = tmp_path / "top.parquet"
    out.write_bytes(b"previous")
    calls = []

    def failing(self, users):
        calls.append(users.num_rows)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(self, users)

    real = ChunkScorer.top_k
    monkeypatch.setattr(ChunkScorer, "top_k", failing)
    result = CliRunner().invoke(cli, ["recommend", run_dir, "--all-users", "--out", str(out), "--batch-size", "10"])
    assert result.exit_code == 2 and "disk full" in result.output and "Traceback" not in result.output, result.output
    assert out.read_bytes() == b"previous" and os.listdir(tmp_path) == ["top.parquet"]


def test_cli_writes_and_reports(run_dir, tmp_path, local_output):
    out = tmp_path / "sub" / "top.parquet"
    result = CliRunner().invoke(cli, ["recommend", run_dir, "--all-users", "--out", str(out), "-k", "5", "--batch-size", "7"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"out": str(out), "target": "shop", "users": 40, "k": 5}
    assert pq.read_table(out).equals(pq.read_table(local_output))


@pytest.mark.parametrize("args,message", [
    (["--all-users"], "give --out"),
    (["--all-users", "--out", "x.parquet", "--user", "cust-1"], "no --user or --history"),
    (["--user", "cust-1", "--out", "x.parquet"], "go with --all-users"),
    (["--all-users", "--out", "x.parquet", "--workers", "2"], "with --ray or --ray-address"),
    (["--all-users", "--out", "x.parquet", "-k", "0"], "k must be >= 1"),
    (["--all-users", "--out", "x.parquet", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_cli_refuses_bad_combinations(run_dir, tmp_path, args, message):
    result = CliRunner().invoke(cli, ["recommend", run_dir, *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_out_that_is_a_directory_is_refused(run_dir, tmp_path):
    with pytest.raises(MetaRecError, match="is a directory"):
        recommend_all_users(run_dir, str(tmp_path))


def test_s3_output(run_dir, local_output, moto_s3):
    out = "s3://metarec-test/serving/top.parquet"
    recommend_all_users(run_dir, out, k=5, batch_size=7)
    assert fs.listdir("s3://metarec-test/serving", include_hidden=True) == ["top.parquet"]
    with fs.open_input_file(out) as file:
        assert pq.read_table(file).equals(pq.read_table(local_output))


@pytest.mark.ray
def test_ray_data_output_is_identical_to_the_local_one(run_dir, local_output, private_ray, tmp_path):
    out = tmp_path / "ray.parquet"
    summary = recommend_all_users(run_dir, str(out), k=5, batch_size=7, use_ray=True, workers=2)
    assert summary["users"] == 40
    assert pq.read_table(out).equals(pq.read_table(local_output))
    assert os.listdir(tmp_path) == ["ray.parquet"]  # Ray Data's parts merged and removed


def test_merge_puts_ray_parts_back_in_chunk_order(tmp_path):
    import pyarrow as pa

    from metarec.recommend_all import CHUNK, merge_parts

    def part(chunks: list[int]) -> pa.Table:
        return pa.table({"user": [f"u{c}" for c in chunks], "items": [[f"i{c}"] for c in chunks],
                         "scores": pa.array([[float(c)] for c in chunks], pa.list_(pa.float32())), CHUNK: chunks})

    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(part([3, 4]), parts / "a.parquet")  # file names out of chunk order
    pq.write_table(part([0, 0, 1]), parts / "b.parquet")
    pq.write_table(part([2]), parts / "c.parquet")
    pq.write_table(part([]), parts / "d.parquet")
    merge_parts(str(parts), str(tmp_path / "out.parquet"), n_users=6)
    merged = pq.read_table(tmp_path / "out.parquet")
    assert merged.column_names == ["user", "items", "scores"]
    assert merged.column("user").to_pylist() == ["u0", "u0", "u1", "u2", "u3", "u4"]

    pq.write_table(part([5, 2]), parts / "c.parquet")  # a part whose chunks go backwards
    with pytest.raises(MetaRecError, match="out of order"):
        merge_parts(str(parts), str(tmp_path / "bad.parquet"), n_users=7)
    pq.write_table(part([2]), parts / "c.parquet")
    with pytest.raises(MetaRecError, match="6 rows for 7 users"):
        merge_parts(str(parts), str(tmp_path / "bad.parquet"), n_users=7)
    assert sorted(os.listdir(tmp_path)) == ["out.parquet", "parts"]  # nothing half-written
