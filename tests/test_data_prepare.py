"""Readers, `prepare_domain` and the file layer (`metarec.fs`), local and on S3 (moto)."""

from __future__ import annotations

import gzip
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metarec import fs
from metarec.data.domain import Domain, load_domains, load_item_map
from metarec.data.prepare import prepare_domain
from metarec.errors import DataError


def write(path, text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return str(path)


def leftovers(root) -> list[str]:
    """Everything under root, hidden temp dirs included ([] if root does not exist)."""
    return sorted(os.listdir(root)) if os.path.exists(root) else []


def as_lists(domain: Domain) -> list[list[int]]:
    return [s.tolist() for s in domain.sequences]


def original_keys(root, name) -> list[list[str]]:
    key_of = {v: k for k, v in load_item_map(root, name).items()}
    return [[key_of[i] for i in seq] for seq in as_lists(Domain.load(root, name))]


# ------------------------------------------------------------------ sequences: malformed input

BAD_SEQUENCES = [
    ("", ["empty file"]),
    ("\n  \n\t\n", ["empty file"]),
    ("1 2 3\n2 4 x5 6\n", ["line 2", "'x5'", "non-integer"]),
    ("1 2 3.5\n", ["line 1", "'3.5'", "non-integer"]),
    ("1 2 3\n2 4 0 6\n", ["line 2", "'0'", "non-positive"]),
    ("1 2 3\n\n3 -4 5\n", ["line 3", "'-4'", "non-positive"]),
    ("1 2 3\n2\n3 4 5\n", ["line 2", "user 2 has no items"]),
    ("1 2 3\n2 12345678901234567890123\n", ["line 2", "too large"]),
]


@pytest.mark.parametrize("text,expected", BAD_SEQUENCES)
def test_malformed_sequences_raise_naming_file_and_line_and_leave_nothing(tmp_path, text, expected):
    src = write(tmp_path / "bad.txt", text)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare_domain(src, out, "bad")
    message = str(err.value)
    assert src in message
    for part in expected:
        assert part in message
    assert leftovers(out) == []


def test_missing_input_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        prepare_domain(tmp_path / "nope.txt", tmp_path / "out", "x")
    assert leftovers(tmp_path / "out") == []


# ------------------------------------------------------------------ interactions: malformed input


def test_missing_column_names_it_and_lists_available(tmp_path):
    src = write(tmp_path / "events.csv", "uid,item,timestamp\n1,2,3\n")
    with pytest.raises(DataError) as err:
        prepare_domain(src, tmp_path / "out", "x", "interactions")
    message = str(err.value)
    assert src in message and "'user'" in message and "available: uid, item, timestamp" in message
    assert leftovers(tmp_path / "out") == []


def test_missing_column_in_parquet(tmp_path):
    src = str(tmp_path / "events.parquet")
    pq.write_table(pa.table({"user": ["a"], "item": ["b"]}), src)
    with pytest.raises(DataError, match=r"no column 'timestamp' \(available: user, item\)") as err:
        prepare_domain(src, tmp_path / "out", "x", "interactions")
    assert src in str(err.value)


def test_empty_interaction_file(tmp_path):
    src = write(tmp_path / "events.csv", "")
    with pytest.raises(DataError, match="empty file") as err:
        prepare_domain(src, tmp_path / "out", "x", "interactions")
    assert src in str(err.value)
    assert leftovers(tmp_path / "out") == []


def test_malformed_json_line_names_the_line(tmp_path):
    lines = ['{"user": 1, "item": 5, "timestamp": 1}', '{"user": 1, "item": 6, "timestamp": 2}',
             '{"user": 2, "item": 5, "timestamp": 3', '{"user": 2, "item": 6, "timestamp": 4}']
    src = write(tmp_path / "events.jsonl.gz", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        prepare_domain(src, tmp_path / "out", "x", "interactions")
    message = str(err.value)
    assert src in message and "line 3" in message and "malformed JSON" in message
    assert leftovers(tmp_path / "out") == []


def test_no_user_left_after_filtering(tmp_path):
    src = write(tmp_path / "seqs.txt", "1 1 2\n2 3 4\n")
    with pytest.raises(DataError, match="no user left after filtering") as err:
        prepare_domain(src, tmp_path / "out", "x", min_user=5)
    assert src in str(err.value)
    assert leftovers(tmp_path / "out") == []


def test_null_key_names_the_row(tmp_path):
    src = str(tmp_path / "events.parquet")
    pq.write_table(pa.table({"user": ["a", None, "b"], "item": ["x", "y", "z"], "timestamp": [1, 2, 3]}), src)
    with pytest.raises(DataError, match=r"row 2: missing value in column 'user'"):
        prepare_domain(src, tmp_path / "out", "x", "interactions")


# ------------------------------------------------------------------ output directory handling


def test_output_holding_a_different_domain_is_refused(tmp_path):
    out = tmp_path / "out"
    first = prepare_domain(write(tmp_path / "a.txt", "1 1 2 3\n2 2 3\n"), out, "d")
    manifest = json.loads((out / "d" / "manifest.json").read_text())
    with pytest.raises(DataError) as err:
        prepare_domain(write(tmp_path / "b.txt", "1 3 2 1\n2 2 3\n"), out, "d")
    assert first in str(err.value) and "--overwrite" in str(err.value)
    assert json.loads((out / "d" / "manifest.json").read_text()) == manifest
    assert leftovers(out) == ["d"]

    prepare_domain(tmp_path / "b.txt", out, "d", overwrite=True)
    assert as_lists(Domain.load(out, "d")) == [[3, 2, 1], [2, 3]]
    assert leftovers(out) == ["d"]


def test_preparing_the_same_domain_again_is_a_no_op(tmp_path):
    out = tmp_path / "out"
    src = write(tmp_path / "a.txt", "1 1 2 3\n2 2 3\n")
    prepare_domain(src, out, "d")
    stamp = os.stat(out / "d" / "data.parquet").st_mtime_ns
    assert prepare_domain(src, out, "d") == fs.join(out, "d")
    assert os.stat(out / "d" / "data.parquet").st_mtime_ns == stamp
    assert leftovers(out) == ["d"]


def test_directory_that_is_not_a_domain_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    (out / "d" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared domain"):
        prepare_domain(write(tmp_path / "a.txt", "1 1 2\n"), out, "d")
    assert (out / "d" / "notes.txt").read_text() == "mine"


def test_invalid_domain_name(tmp_path):
    with pytest.raises(DataError, match="invalid domain name"):
        prepare_domain(write(tmp_path / "a.txt", "1 1 2\n"), tmp_path / "out", "../escape")


# ------------------------------------------------------------------ round trips


def test_dense_sequences_round_trip_with_original_ids(tmp_path):
    text = "1 3 1 2\n2 4 3\n7 2 2 1 4\n"
    out = tmp_path / "out"
    prepare_domain(write(tmp_path / "s.txt", text), out, "s")
    domain = Domain.load(out, "s")
    assert domain.users == ["1", "2", "7"]
    assert as_lists(domain) == [[3, 1, 2], [4, 3], [2, 2, 1, 4]]
    assert domain.n_items == 4
    assert load_item_map(out, "s") == {"1": 1, "2": 2, "3": 3, "4": 4}
    manifest = domain.manifest
    assert (manifest["n_users"], manifest["n_items"], manifest["n_interactions"], manifest["format_version"]) == (3, 4, 9, 1)
    schema = pq.read_schema(out / "s" / "data.parquet")
    assert schema.field("user").type == pa.string() and schema.field("items").type == pa.list_(pa.int32())


def test_sparse_sequence_ids_are_reindexed_by_first_appearance(tmp_path):
    out = tmp_path / "out"
    prepare_domain(write(tmp_path / "s.txt", "5 40 10 40\n6 7 10\n"), out, "s")
    assert as_lists(Domain.load(out, "s")) == [[1, 2, 1], [3, 2]]
    assert load_item_map(out, "s") == {"40": 1, "10": 2, "7": 3}
    assert original_keys(out, "s") == [["40", "10", "40"], ["7", "10"]]


def test_repeated_user_lines_are_concatenated(tmp_path):
    out = tmp_path / "out"
    prepare_domain(write(tmp_path / "s.txt", "1 1\n2 2\n1 3\n1 2\n"), out, "s")
    domain = Domain.load(out, "s")
    assert domain.users == ["1", "2"] and as_lists(domain) == [[1, 3, 2], [2]]


def test_kcore_on_sequences_reaches_a_fixpoint(tmp_path):
    # min_item=2 drops item 9 -> user 3 is left with 1 item < min_user=2 -> dropped -> item 5 falls to 1 -> dropped
    # -> user 1 falls to 2 items (kept). Needs more than one round.
    out = tmp_path / "out"
    prepare_domain(write(tmp_path / "s.txt", "1 1 2 5\n2 1 2\n3 5 9\n"), out, "s", min_user=2, min_item=2)
    domain = Domain.load(out, "s")
    assert domain.users == ["1", "2"] and as_lists(domain) == [[1, 2], [1, 2]] and domain.n_items == 2


EVENTS = [  # user, item, timestamp, rating
    ("u1", "A", 30, 5), ("u1", "B", 10, 4), ("u2", "A", 5, 1), ("u1", "C", 20, 5), ("u2", "B", 7, 5),
    ("u2", "C", 7, 4), ("u3", "D", 1, 5), ("u4", "A", 2, 5), ("u2", "A", 9, 5), ("u4", "E", 3, 5),
]
# rating >= 3 drops (u2, A, 5); k-core (2, 2): D and E appear once -> dropped; u3 then has 0 events, u4 has 1 -> dropped.
# Chronological, stable on ties (u2: B and C both at 7, file order B then C).
EXPECTED_KEYS = [["B", "C", "A"], ["B", "C", "A"]]


def _check_events_domain(out, name):
    domain = Domain.load(out, name)
    assert domain.users == ["u1", "u2"]
    assert original_keys(out, name) == EXPECTED_KEYS
    assert load_item_map(out, name) == {"B": 1, "C": 2, "A": 3}
    timestamps = pq.read_table(out / name / "data.parquet").column("timestamps").to_pylist()
    assert timestamps == [[10, 20, 30], [7, 7, 9]]


def test_csv_interactions_sort_rating_threshold_and_kcore(tmp_path):
    text = "user,item,timestamp,rating\n" + "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in EVENTS)
    out = tmp_path / "out"
    prepare_domain(write(tmp_path / "ev.csv", text), out, "csv", "interactions",
                   rating_col="rating", min_rating=3, min_user=2, min_item=2)
    _check_events_domain(out, "csv")


def test_csv_without_filters_keeps_everything_in_time_order(tmp_path):
    text = "user,item,timestamp,rating\n" + "".join(f"{u},{i},{t},{r}\n" for u, i, t, r in EVENTS)
    out = tmp_path / "out"
    prepare_domain(write(tmp_path / "ev.csv", text), out, "csv", "interactions")
    assert original_keys(out, "csv") == [["B", "C", "A"], ["A", "B", "C", "A"], ["D"], ["A", "E"]]


def test_gzipped_json_lines(tmp_path):
    text = "".join(json.dumps({"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": r, "text": "x"}) + "\n"
                   for u, i, t, r in EVENTS)
    out = tmp_path / "out"
    prepare_domain(write(tmp_path / "ev.jsonl.gz", text), out, "json", "interactions",
                   user_col="reviewerID", item_col="asin", time_col="unixReviewTime",
                   rating_col="overall", min_rating=3, min_user=2, min_item=2)
    _check_events_domain(out, "json")


def test_parquet_interactions(tmp_path):
    users, items, times, ratings = zip(*EVENTS)
    src = str(tmp_path / "ev.parquet")
    pq.write_table(pa.table({"uid": list(users), "iid": list(items), "ts": list(times), "stars": list(ratings)}), src)
    out = tmp_path / "out"
    prepare_domain(src, out, "pq", "interactions", user_col="uid", item_col="iid", time_col="ts",
                   rating_col="stars", min_rating=3, min_user=2, min_item=2)
    _check_events_domain(out, "pq")


# ------------------------------------------------------------------ fs layer


def test_atomic_dir_removes_the_temp_dir_on_error(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(RuntimeError):
        with fs.atomic_dir(target) as tmp:
            fs.write_bytes(fs.join(tmp, "x.bin"), b"partial")
            raise RuntimeError("boom")
    assert leftovers(tmp_path) == []
    with fs.atomic_dir(target) as tmp:
        fs.write_bytes(fs.join(tmp, "x.bin"), b"done")
    assert (target / "x.bin").read_bytes() == b"done" and leftovers(tmp_path) == ["run"]


def test_atomic_write_and_gzip_input(tmp_path):
    fs.atomic_write_bytes(tmp_path / "a" / "f.json", b"{}")
    fs.atomic_write_bytes(tmp_path / "a" / "f.json", b"[1]")
    assert fs.read_text(tmp_path / "a" / "f.json") == "[1]" and leftovers(tmp_path / "a") == ["f.json"]
    write(tmp_path / "t.txt.gz", "hello")
    assert fs.read_text(tmp_path / "t.txt.gz") == "hello"
    assert fs.read_bytes(tmp_path / "t.txt.gz") != b"hello"


# ------------------------------------------------------------------ S3 (moto server on 127.0.0.1)


def test_s3_round_trip(tmp_path, moto_s3):
    assert os.environ["AWS_ENDPOINT_URL"] == moto_s3
    root = "s3://metarec-test/prepared"
    prepare_domain(write(tmp_path / "a.txt", "1 3 1 2\n2 4 3\n"), root, "a")
    fs.write_bytes("s3://metarec-test/raw/b.txt.gz", gzip.compress(b"10 7 8 7\n11 8 9\n"))
    prepare_domain("s3://metarec-test/raw/b.txt.gz", root, "b")
    assert prepare_domain("s3://metarec-test/raw/b.txt.gz", root, "b") == f"{root}/b"  # idempotent

    domains = load_domains(root, ["a", "b"])
    assert as_lists(domains["a"]) == [[3, 1, 2], [4, 3]]
    assert as_lists(domains["b"]) == [[1, 2, 1], [2, 3]] and load_item_map(root, "b") == {"7": 1, "8": 2, "9": 3}
    assert fs.listdir(root, include_hidden=True) == ["a", "b"]
    assert fs.listdir(f"{root}/a") == ["data.parquet", "items.parquet", "manifest.json"]

    with pytest.raises(DataError, match="differs"):
        prepare_domain(tmp_path / "a.txt", root, "b")
    with pytest.raises(RuntimeError):
        with fs.atomic_dir(f"{root}/c") as tmp:
            fs.write_bytes(fs.join(tmp, "x"), b"partial")
            raise RuntimeError("boom")
    assert fs.listdir(root, include_hidden=True) == ["a", "b"]
    with pytest.raises(DataError, match="not prepared"):
        Domain.load(root, "c")


def test_csv_parse_error_names_the_row(tmp_path):
    src = write(tmp_path / "events.csv", "user,item,timestamp\n1,2,3\n1,2\n")
    with pytest.raises(DataError, match=r"Row #3") as err:
        prepare_domain(src, tmp_path / "out", "x", "interactions")
    assert src in str(err.value)
