"""`metarec prepare --format recbole`: RecBole atomic files (`NAME.inter`) and split triples."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from metarec.cli import cli
from metarec.data.domain import Domain, load_item_map
from metarec.data.prepare import prepare_domain
from metarec.errors import DataError

SPLIT_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def write_split_triple(folder, name: str, sequences: dict[str, list[str]]) -> dict[str, str]:
    """RecBole's benchmark files of `sequences` as RecBole writes them: .test.inter has
    history -> last item, .valid.inter history -> second-to-last, .train.inter every
    earlier prefix -> next item."""
    rows: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for user, seq in sequences.items():
        for end in range(1, len(seq) - 2):
            rows["train"].append(f"{user}\t{' '.join(seq[:end])}\t{seq[end]}\n")
        rows["valid"].append(f"{user}\t{' '.join(seq[:-2])}\t{seq[-2]}\n")
        rows["test"].append(f"{user}\t{' '.join(seq[:-1])}\t{seq[-1]}\n")
    paths = {}
    for split, lines in rows.items():
        paths[split] = str(folder / f"{name}.{split}.inter")
        with open(paths[split], "w") as f:
            f.write(SPLIT_HEADER + "".join(lines))
    return paths


def sequences_by_key(root, name) -> dict[str, list[str]]:
    domain = Domain.load(root, name)
    key_of = {v: k for k, v in load_item_map(root, name).items()}
    return {user: [key_of[int(i)] for i in seq] for user, seq in zip(domain.users, domain.sequences)}


def random_sequences(seed: int, n_users: int, n_items: int, numeric: bool) -> dict[str, list[str]]:
    rng = np.random.default_rng(seed)
    keys = [str(i) for i in range(1, n_items + 1)] if numeric else [f"B0{i:04d}X" for i in range(n_items)]
    return {(str(u + 1) if numeric else f"A{u:03d}"): [keys[i] for i in rng.integers(0, n_items, rng.integers(3, 12))]
            for u in range(n_users)}


@pytest.mark.parametrize("which", ["train", "valid", "test"])
def test_split_triple_prepares_to_the_sequences_it_was_built_from(tmp_path, which):
    sequences = random_sequences(0, 30, 25, numeric=False)
    paths = write_split_triple(tmp_path, "Shop", sequences)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["prepare", paths[which], "--format", "recbole", "--name", "shop", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sequences_by_key(out, "shop") == sequences
    assert Domain.load(out, "shop").manifest["source"] == paths["test"]


def test_dense_numeric_split_triple_equals_the_sequences_file(tmp_path):
    """UniSRec's Amazon splits use item IDs 1..K: preparing them gives the domain the
    `sequences` file (user, items...) gives, byte for byte."""
    sequences = random_sequences(1, 40, 20, numeric=True)
    sequences["1"] = [str(i) for i in range(1, 21)]  # every ID appears: dense 1..K
    paths = write_split_triple(tmp_path, "Scientific", sequences)
    txt = tmp_path / "scientific.txt"
    txt.write_text("".join(f"{u} {' '.join(s)}\n" for u, s in sequences.items()))
    prepare_domain(paths["test"], tmp_path / "a", "sci", "recbole")
    prepare_domain(str(txt), tmp_path / "b", "sci", "sequences")
    for file in ("data.parquet", "items.parquet"):
        assert (tmp_path / "a" / "sci" / file).read_bytes() == (tmp_path / "b" / "sci" / file).read_bytes()


def test_split_triple_kcore(tmp_path):
    sequences = {"u1": ["a", "b", "c", "d"], "u2": ["a", "b", "e"], "u3": ["b", "c", "a"]}
    paths = write_split_triple(tmp_path, "K", sequences)
    prepare_domain(paths["test"], tmp_path / "out", "k", "recbole", min_item=2, min_user=3)
    assert sequences_by_key(tmp_path / "out", "k") == {"u1": ["a", "b", "c"], "u3": ["b", "c", "a"]}


INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\treview:token_seq\n"
    "u1\tB\t5\t20\tgreat game\n"
    "u1\tA\t4\t10.5\t\n"
    "u2\tC\t2\t5\tmeh\n"
    "u2\tA\t3\t7\tok\n"
    "\n"
    "u1\tC\t1\t30\tbad\n"
    "u2\tB\t5\t6\tfine\n"
)


def test_inter_file_sorted_by_timestamp_with_rating_threshold(tmp_path):
    src = tmp_path / "games.inter"
    src.write_text(INTER)
    prepare_domain(str(src), tmp_path / "all", "g", "recbole")
    assert sequences_by_key(tmp_path / "all", "g") == {"u1": ["A", "B", "C"], "u2": ["C", "B", "A"]}
    timestamps = pq.read_table(tmp_path / "all" / "g" / "data.parquet").column("timestamps").to_pylist()
    assert timestamps == [[10, 20, 30], [5, 6, 7]]
    prepare_domain(str(src), tmp_path / "liked", "g", "recbole", min_rating=3, min_item=2)
    assert sequences_by_key(tmp_path / "liked", "g") == {"u1": ["A", "B"], "u2": ["B", "A"]}


def test_inter_columns_by_flag_and_without_timestamp(tmp_path):
    src = tmp_path / "x.inter.gz"
    import gzip

    src.write_bytes(gzip.compress(b"session:token\tsku:token\tscore:float\ns1\tz\t1\ns2\ty\t2\ns1\tx\t3\n"))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["prepare", str(src), "--format", "recbole", "--name", "x", "--out", str(out),
                                      "--user-col", "session", "--item-col", "sku:token",
                                      "--rating-col", "score", "--min-rating", "2"])
    assert result.exit_code == 0, result.output
    assert sequences_by_key(out, "x") == {"s2": ["y"], "s1": ["x"]}  # file order kept, no timestamps
    assert "timestamps" not in pq.read_table(out / "x" / "data.parquet").column_names


BAD = [
    ("a.inter", "user_id\titem_id:token\n1\t2\n", ["line 1, column 1", "'user_id'", "not name:type"]),
    ("a.inter", "user_id:token\titem_id:tok\n1\t2\n", ["line 1, column 2", "'item_id:tok'"]),
    ("a.inter", "user_id:token\tuser_id:float\n1\t2\n", ["line 1, column 2", "appears twice"]),
    ("a.inter", "uid:token\titem_id:token\n1\t2\n", ["line 1", "no user field 'user_id'", "uid:token"]),
    ("a.inter", "user_id:token\titem_id:token_seq\n1\t2\n", ["column 2", "'item_id:token_seq'", "has type token_seq"]),
    ("a.inter", "user_id:token\titem_id:token\n1\t2\n\n3\t4\t5\n", ["line 4", "3 tab-separated fields", "header has 2"]),
    ("a.inter", "user_id:token\titem_id:token\n1\t2\n \t4\n", ["line 3, column 'user_id:token'", "empty value"]),
    ("a.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\t3\n1\t3\tsoon\n",
     ["line 3, column 'timestamp:float'", "timestamp 'soon'", "not a finite number"]),
    ("a.inter", "user_id:token\titem_id:token\ttimestamp:float\n1\t2\tnan\n", ["line 2", "'nan'"]),
    ("a.inter", b"user_id:token\titem_id:token\n1\t2\n2\t\xff\n", ["line 3, column 'item_id:token'", "invalid UTF-8"]),
    ("a.inter", "user_id:token\titem_id:token\n", ["no rows after the header"]),
    ("a.inter", "", ["empty file"]),
    ("a.inter", "user\x1b[31m:token\titem_id:token\n1\t2\n", ["no user field", "user\\x1b[31m:token"]),
    ("a.test.inter", SPLIT_HEADER + "u1\ta b\tc\nu2\tb\tc\nu1\tc\td\n",
     ["line 4, column 'user_id:token'", "user 'u1' has a second row (the first is on line 2)"]),
    ("a.test.inter", "user_id:token\titem_id:token\n1\t2\n", ["no history field 'item_id_list'"]),
    ("a.csv", "user,item\n1,2\n", ["not a RecBole atomic file"]),
]


@pytest.mark.parametrize("file,text,expected", BAD)
def test_malformed_recbole_input_is_one_line_exit_2_and_writes_nothing(tmp_path, file, text, expected):
    src = tmp_path / file
    src.write_bytes(text.encode() if isinstance(text, str) else text)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["prepare", str(src), "--format", "recbole", "--name", "x", "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(fragment in lines[0] for fragment in expected), lines[0]
    assert str(src) in lines[0] and "\x1b" not in result.output  # control characters escaped
    assert not os.path.exists(out) or os.listdir(out) == []


def test_split_triple_refuses_rating_and_time_flags(tmp_path):
    paths = write_split_triple(tmp_path, "S", {"u": ["a", "b", "c"]})
    with pytest.raises(DataError, match="no rating field"):
        prepare_domain(paths["test"], tmp_path / "out", "s", "recbole", min_rating=3)
    with pytest.raises(DataError, match="no timestamp field"):
        prepare_domain(paths["test"], tmp_path / "out", "s", "recbole", time_col="timestamp")
    with pytest.raises(DataError, match="no timestamp field 'when'"):
        (tmp_path / "t.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
        prepare_domain(str(tmp_path / "t.inter"), tmp_path / "out", "t", "recbole", time_col="when")


def test_crlf_lines_and_no_final_newline(tmp_path):
    src = tmp_path / "w.inter"
    src.write_bytes(b"user_id:token\titem_id:token\ttimestamp:float\r\nu1\tb\t2\r\nu1\ta\t1\r\n\r\nu2\tc\t5")
    prepare_domain(str(src), tmp_path / "out", "w", "recbole")
    assert sequences_by_key(tmp_path / "out", "w") == {"u1": ["a", "b"], "u2": ["c"]}
