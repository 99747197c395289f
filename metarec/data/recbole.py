"""RecBole atomic files as input (`metarec prepare --format recbole`).

Two layouts, both tab-separated text with a typed header line `name:type` per field
(types `token`, `token_seq`, `float`, `float_seq`; RecBole's own convention):

- an interaction file `NAME.inter`, one row per interaction, e.g.
  `user_id:token  item_id:token  rating:float  timestamp:float`. The user and item
  columns (and the optional timestamp and rating columns) are found by name
  (`user_id`, `item_id`, `timestamp`, `rating` unless given); without a timestamp
  column the file order is kept;
- a benchmark split triple `NAME.train.inter`, `NAME.valid.inter`, `NAME.test.inter`
  (`user_id:token  item_id_list:token_seq  item_id:token`, the UniSRec Amazon splits
  among them), named by any of its three files. Each user's sequence is rebuilt from
  its `.test.inter` row, history then target: that row holds the whole sequence (up to
  the length RecBole cut it to), and leave-one-out of it gives back the `.valid.inter`
  and `.test.inter` rows, so the other two files are not read.

The result is `Events` for `readers.build_sequences` (k-core, chronological sort,
dense re-indexing), like the other readers. Item tokens that are all positive
integers exactly 1..K keep their IDs (as in the `sequences` format). Every problem
raises `DataError` naming the file, the line and the column.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from metarec import fs
from metarec.data.readers import Events, read_input
from metarec.errors import DataError, quote

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
DEFAULT_USER, DEFAULT_ITEM, DEFAULT_TIME, DEFAULT_RATING = "user_id", "item_id", "timestamp", "rating"
LIST_SUFFIX = "_list"  # RecBole's LIST_SUFFIX: the history field of a split file is item_id_list
_SPLIT_FILE = re.compile(r"\.(train|valid|test)\.inter(\.gz)?$")
_NATIVE_ID = r"^[1-9][0-9]{0,17}$"


@dataclass(frozen=True)
class Field:
    """One header field: `name:type`, at 0-based position `index`."""

    name: str
    type: str
    index: int

    @property
    def label(self) -> str:
        return f"{self.name}:{self.type}"


def split_test_file(location: fs.Location) -> str | None:
    """The `.test.inter` file of the split triple `location` names, or None for a plain `.inter` file."""
    text = os.fspath(location)
    match = _SPLIT_FILE.search(text)
    if not match:
        return None
    return text[: match.start()] + ".test.inter" + (match.group(2) or "")


def input_file(location: fs.Location) -> str:
    """The file `prepare --format recbole` reads for `location` (the `.test.inter` of a split triple)."""
    text = os.fspath(location)
    if not (text.endswith(".inter") or text.endswith(".inter.gz")):
        raise DataError(f"{text}: not a RecBole atomic file (expected NAME.inter or NAME.train/.valid/.test.inter, optionally .gz)")
    return split_test_file(text) or text


# ------------------------------------------------------------------ header and rows


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def parse_header(name: str, data: bytes) -> list[Field]:
    """The typed fields of the first line (`name:type` separated by tabs)."""
    end = data.find(b"\n")
    line = data[: end if end >= 0 else len(data)].rstrip(b"\r")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{name}: line 1: invalid UTF-8 in the header (byte {err.start})") from None
    fields: list[Field] = []
    for index, raw in enumerate(text.split("\t")):
        field_name, sep, kind = raw.rpartition(":")
        if not sep or not field_name or kind not in FIELD_TYPES:
            raise DataError(f"{name}: line 1, column {index + 1}: header field {quote(raw)} is not name:type "
                            f"with a type in {', '.join(FIELD_TYPES)} (a RecBole header, e.g. user_id:token)")
        if any(f.name == field_name for f in fields):
            raise DataError(f"{name}: line 1, column {index + 1}: field {quote(field_name)} appears twice in the header")
        fields.append(Field(field_name, kind, index))
    return fields


def find_field(name: str, fields: list[Field], wanted: str, types: tuple[str, ...], role: str) -> Field:
    """The field called `wanted` (or `wanted` given as name:type), checked to have one of `types`."""
    key = wanted.rpartition(":")[0] if wanted.rpartition(":")[2] in FIELD_TYPES else wanted
    for field in fields:
        if field.name == key:
            if field.type not in types:
                raise DataError(f"{name}: line 1, column {field.index + 1}: the {role} field {quote(field.label)} "
                                f"has type {field.type}; expected {' or '.join(types)}")
            return field
    available = ", ".join(f.label for f in fields)
    raise DataError(f"{name}: line 1: no {role} field {quote(key)} in the header (fields: {quote(available, 200)})")


def _row_lines(name: str, data: bytes, n_fields: int) -> np.ndarray:
    """1-based line numbers of the data rows (the non-blank lines after the header); a row with
    another number of fields than the header is a DataError naming its line."""
    buf = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    starts = np.concatenate(([0], newlines + 1))
    ends = np.concatenate((newlines, [buf.size]))
    ends = ends - ((ends > starts) & (buf[np.maximum(ends - 1, 0)] == ord("\r")))  # CRLF
    tabs = np.bincount(np.searchsorted(newlines, np.flatnonzero(buf == ord("\t"))), minlength=starts.size)
    rows = np.flatnonzero(ends > starts)
    rows = rows[rows > 0]  # line 1 is the header
    wrong = rows[tabs[rows] != n_fields - 1]
    if wrong.size:
        line = int(wrong[0])
        raise DataError(f"{name}: line {line + 1}: {int(tabs[line]) + 1} tab-separated fields, the header has {n_fields}")
    return rows + 1


def _locate(data: bytes, offset: int, fields: list[Field]) -> str:
    """'line L, column NAME:TYPE' of a byte offset."""
    line_start = data.rfind(b"\n", 0, offset) + 1
    column = data.count(b"\t", line_start, offset)
    label = fields[column].label if column < len(fields) else f"#{column + 1}"
    return f"line {_line_of(data, offset)}, column {quote(label)}"


def read_rows(name: str, data: bytes, fields: list[Field], wanted: list[Field]) -> tuple[dict[str, pa.Array], np.ndarray]:
    """The `wanted` columns as strings, and the line number of each row."""
    lines = _row_lines(name, data, len(fields))
    if lines.size == 0:
        raise DataError(f"{name}: no rows after the header")
    read = pacsv.ReadOptions(skip_rows=1, column_names=[f.name for f in fields])
    parse = pacsv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False)
    convert = pacsv.ConvertOptions(include_columns=[f.name for f in wanted], column_types={f.name: pa.string() for f in wanted},
                                   strings_can_be_null=False)
    try:
        table = pacsv.read_csv(pa.BufferReader(data), read_options=read, parse_options=parse, convert_options=convert)
    except pa.ArrowInvalid as err:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as bad:
            raise DataError(f"{name}: {_locate(data, bad.start, fields)}: invalid UTF-8") from None
        raise DataError(f"{name}: cannot parse as a RecBole atomic file: {quote(str(err), 300)}") from None
    if table.num_rows != lines.size:  # cannot happen with the checks above; never mislabel a line
        raise DataError(f"{name}: read {table.num_rows} rows but the file has {lines.size} non-blank lines after the header")
    return {f.name: table.column(f.name).combine_chunks() for f in wanted}, lines


def token_column(name: str, column: pa.Array, field: Field, lines: np.ndarray) -> pa.Array:
    """A token column with surrounding whitespace trimmed; an empty token is a DataError."""
    column = pc.utf8_trim_whitespace(column)
    empty = pc.equal(pc.utf8_length(column), 0)
    if pc.any(empty).as_py():
        row = int(pc.index(empty, True).as_py())
        raise DataError(f"{name}: line {lines[row]}, column {quote(field.label)}: empty value")
    return column


def float_column(name: str, column: pa.Array, field: Field, lines: np.ndarray, what: str) -> np.ndarray:
    """A float column as float64; a value that is not a finite number is a DataError."""
    column = pc.utf8_trim_whitespace(column)
    try:
        values = pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(~np.isfinite(values))
    except pa.ArrowInvalid:
        bad = np.array([_first_unparsable(column)])
    if bad.size:
        row = int(bad[0])
        raise DataError(f"{name}: line {lines[row]}, column {quote(field.label)}: {what} {quote(column[row].as_py())} "
                        "is not a finite number")
    return values


def _first_unparsable(column: pa.Array) -> int:
    """Index of the first value that does not cast to float64 (bisection: O(log n) casts)."""
    lo, hi = 0, len(column)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            pc.cast(column.slice(lo, mid - lo), pa.float64())
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def _events(source: str, users: pa.Array, items: pa.Array, time: np.ndarray | None) -> Events:
    """Events of token arrays; item tokens that are all canonical positive integers stay numbers
    (`native_ids`, kept if they are exactly 1..K)."""
    user = pc.dictionary_encode(users)
    item = pc.dictionary_encode(items)
    item_keys = item.dictionary
    native = len(item_keys) > 0 and pc.all(pc.match_substring_regex(item_keys, _NATIVE_ID)).as_py()
    keys = (pc.cast(item_keys, pa.int64()).to_numpy() if native
            else np.asarray(item_keys.to_pylist(), dtype=object))
    return Events(
        source=source,
        user=user.indices.to_numpy(zero_copy_only=False).astype(np.int64),
        user_keys=np.asarray(user.dictionary.to_pylist(), dtype=object),
        item=item.indices.to_numpy(zero_copy_only=False).astype(np.int64),
        item_keys=keys,
        time=time,
        native_ids=native,
    )


# ------------------------------------------------------------------ the two layouts


def read_recbole(
    location: fs.Location,
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    rating_col: str | None = None,
    min_rating: float | None = None,
    data: bytes | None = None,
    progress: bool | None = None,
) -> Events:
    """Parse a RecBole `NAME.inter` file, or the split triple `location` names (module docstring).

    `data`: the already read (and gunzipped) bytes of `input_file(location)`. Columns left
    None take RecBole's names; a timestamp or rating column named explicitly must exist.
    Rows with `rating < min_rating` are dropped (interaction files only).
    """
    name = input_file(location)
    if data is None:
        data = read_input(name, progress)
    if not data.strip():
        raise DataError(f"{name}: empty file")
    fields = parse_header(name, data)
    user_name, item_name = user_col or DEFAULT_USER, item_col or DEFAULT_ITEM
    user = find_field(name, fields, user_name, ("token", "float"), "user")
    if split_test_file(os.fspath(location)) is not None:
        if min_rating is not None or rating_col is not None:
            raise DataError(f"{name}: a RecBole split file has no rating field; drop --rating-col/--min-rating")
        if time_col is not None:
            raise DataError(f"{name}: a RecBole split file has no timestamp field (its order is the sequence's); drop --time-col")
        item_name = item_name.rpartition(":")[0] if item_name.rpartition(":")[2] in FIELD_TYPES else item_name
        history = find_field(name, fields, item_name + LIST_SUFFIX, ("token_seq",), "history")
        target = find_field(name, fields, item_name, ("token",), "target item")
        return _split_events(name, data, fields, user, history, target)
    item = find_field(name, fields, item_name, ("token", "float"), "item")
    time = _optional_field(name, fields, time_col, DEFAULT_TIME, "timestamp")
    if min_rating is not None and rating_col is None:
        rating_col = DEFAULT_RATING
    rating = find_field(name, fields, rating_col, ("float",), "rating") if rating_col else None
    wanted = list({f.name: f for f in (user, item, time, rating) if f}.values())
    columns, lines = read_rows(name, data, fields, wanted)
    users = token_column(name, columns[user.name], user, lines)
    items = token_column(name, columns[item.name], item, lines)
    times = float_column(name, columns[time.name], time, lines, "timestamp") if time else None
    if rating is not None and min_rating is not None:
        keep = float_column(name, columns[rating.name], rating, lines, "rating") >= min_rating
        users, items = users.filter(pa.array(keep)), items.filter(pa.array(keep))
        times = times[keep] if times is not None else None
        if len(users) == 0:
            raise DataError(f"{name}: no interaction has rating >= {min_rating}")
    return _events(name, users, items, times)


def _optional_field(name: str, fields: list[Field], given: str | None, default: str, role: str) -> Field | None:
    """The field named `given` (must exist), else the field called `default` if the header has one."""
    if given is None and not any(f.name == default for f in fields):
        return None
    return find_field(name, fields, given or default, ("float", "token"), role)


def _split_events(name: str, data: bytes, fields: list[Field], user: Field, history: Field, target: Field) -> Events:
    """Events of a `.test.inter` file: per row, the history tokens then the target, in order."""
    columns, lines = read_rows(name, data, fields, [user, history, target])
    users = token_column(name, columns[user.name], user, lines)
    targets = token_column(name, columns[target.name], target, lines)
    encoded = pc.dictionary_encode(users)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    _, first = np.unique(codes, return_index=True)
    if first.size < codes.size:
        repeated = np.ones(codes.size, dtype=bool)
        repeated[first] = False
        row = int(np.flatnonzero(repeated)[0])
        earlier = int(first[codes[row]])  # dictionary codes number users in order of first appearance
        raise DataError(f"{name}: line {lines[row]}, column {quote(user.label)}: user {quote(users[row].as_py())} has a "
                        f"second row (the first is on line {lines[earlier]}); a .test.inter file has one row per user")
    split = pc.utf8_split_whitespace(pc.utf8_trim_whitespace(columns[history.name]))
    tokens = pc.list_flatten(split)
    parents = pc.list_parent_indices(split).to_numpy(zero_copy_only=False)
    nonempty = pc.greater(pc.utf8_length(tokens), 0)
    tokens = tokens.filter(nonempty)
    parents = parents[nonempty.to_numpy(zero_copy_only=False)]
    n_rows = len(users)
    lengths = np.bincount(parents, minlength=n_rows) + 1  # history + target
    ends = np.cumsum(lengths)
    is_target = np.zeros(int(ends[-1]), dtype=bool)
    is_target[ends - 1] = True
    take = np.empty(is_target.size, dtype=np.int64)
    take[~is_target] = np.arange(len(tokens))
    take[is_target] = len(tokens) + np.arange(n_rows)
    items = pa.concat_arrays([tokens, targets]).take(pa.array(take))
    return _events(name, users.take(pa.array(np.repeat(np.arange(n_rows), lengths))), items, None)
