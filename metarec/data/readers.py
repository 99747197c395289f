"""Input readers: turn a `sequences` text file or an interaction table into user sequences.

Two steps, both vectorised (numpy / pyarrow, no per-token Python loop):
1. a reader (`read_sequences`, `read_interactions`) parses a file into `Events`, one
   row per interaction in file order, users and items as codes into key arrays;
2. `build_sequences` applies k-core filtering, sorts each user's events
   chronologically (stable) and re-indexes items densely to 1..K (docs/design.md §1).

Every problem with the input raises `DataError` naming the file, the line/row and
what is wrong.
"""

from __future__ import annotations

import json
import os
import re
import sys
import zlib
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from tqdm import tqdm

from metarec import fs
from metarec.errors import DataError, printable, quote

MAX_INPUT_ENV = "METAREC_MAX_INPUT_BYTES"
PROGRESS_MIN_BYTES = 16 << 20
_CHUNK_BYTES = 4 << 20
_MAX_ID_DIGITS = 18  # fits int64
_WHITESPACE = b" \t\n\r\f\v"
_NOT_ID_CHAR = re.compile(rb"[^0-9 \t\n\r\f\v]")
_TABLE_KINDS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".parquet": "parquet", ".pq": "parquet",
                ".json": "jsonl", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclass(frozen=True)
class Events:
    """Interactions in file order. `user`/`item` are int64 codes into `user_keys`/`item_keys`.

    User codes are numbered in order of first appearance. `native_ids`: the item keys are
    the file's own positive integer IDs (sequences format), kept if they are dense 1..K.
    """

    source: str
    user: np.ndarray
    user_keys: np.ndarray
    item: np.ndarray
    item_keys: np.ndarray
    time: np.ndarray | None = None
    native_ids: bool = False


@dataclass(frozen=True)
class SequenceTable:
    """Prepared sequences in CSR form: user u's items are `items[offsets[u]:offsets[u+1]]`.

    `items` are dense IDs 1..K (int32), chronological per user; `item_keys[i - 1]` is the
    original key of item i.
    """

    users: list[str]
    offsets: np.ndarray
    items: np.ndarray
    item_keys: list[str]
    timestamps: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.item_keys)

    @property
    def n_interactions(self) -> int:
        return int(self.items.shape[0])


# ------------------------------------------------------------------ raw input


def read_input(location: fs.Location, progress: bool | None = None, decompress: bool = True) -> bytes:
    """All bytes of an input file, gunzipped if it ends in `.gz` (unless `decompress=False`).

    `progress=None` shows a byte progress bar for inputs over 16 MiB when stderr is a tty.
    """
    name = os.fspath(location)
    if fs.isdir(location):
        raise DataError(f"{name}: is a directory, not an input file")
    try:
        total = fs.size(location)
        limit = max_input_bytes()
        if total > limit:
            raise DataError(f"{name}: input is {total} bytes, over the {limit}-byte cap "
                            f"(set {MAX_INPUT_ENV} to raise it)")
        if progress is None:
            progress = total >= PROGRESS_MIN_BYTES and sys.stderr.isatty()
        chunks = []
        with fs.open_input(location, decompress=False) as stream, tqdm(
            total=total, unit="B", unit_scale=True, desc=f"reading {os.path.basename(name)}", disable=not progress
        ) as bar:
            while chunk := stream.read(_CHUNK_BYTES):
                chunks.append(chunk)
                bar.update(len(chunk))
    except FileNotFoundError as err:
        raise DataError(f"{name}: input file not found") from err
    except OSError as err:
        raise DataError(f"{name}: cannot read input ({err})") from err
    data = b"".join(chunks)
    return gunzip_input(name, data) if decompress else data


def max_input_bytes() -> int:
    """Cap on the (decompressed) size of an input file: `$METAREC_MAX_INPUT_BYTES`, else half
    of this machine's memory (the whole input is held in memory while it is parsed)."""
    env = os.environ.get(MAX_INPUT_ENV)
    if env:
        try:
            value = int(env)
        except ValueError:
            value = 0
        if value < 1:
            raise DataError(f"{MAX_INPUT_ENV}={quote(env)}: expected a positive number of bytes")
        return value
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def gunzip_input(name: str, data: bytes, limit: int | None = None) -> bytes:
    """`data` gunzipped if `name` ends in `.gz`, else unchanged.

    Decompression stops with a DataError as soon as the output passes `limit` bytes
    (default `max_input_bytes()`), so a small file that inflates to gigabytes costs
    no more than the cap.
    """
    if not name.endswith(".gz"):
        return data
    limit = max_input_bytes() if limit is None else limit
    out: list[bytes] = []
    total = 0
    rest = data
    try:
        while rest:  # one gzip member per pass (concatenated members are valid gzip)
            inflate = zlib.decompressobj(wbits=31)
            pending = rest
            while pending and not inflate.eof:
                chunk = inflate.decompress(pending, min(limit - total + 1, _CHUNK_BYTES * 16))
                total += len(chunk)
                if total > limit:
                    raise DataError(f"{name}: decompresses to more than {limit} bytes, the input cap "
                                    f"(set {MAX_INPUT_ENV} to raise it)")
                out.append(chunk)
                pending = inflate.unconsumed_tail
            if not inflate.eof:
                raise DataError(f"{name}: not a valid gzip file (truncated: the compressed stream ends early)")
            rest = inflate.unused_data.lstrip(b"\0")  # trailing zero padding, as gzip allows
    except zlib.error as err:
        raise DataError(f"{name}: not a valid gzip file ({err})") from None
    return b"".join(out)


def _first_appearance_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, keys): codes[i] indexes keys, keys ordered by first appearance in `values`."""
    keys, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[inverse.reshape(-1)].astype(np.int64), keys[order]


# ------------------------------------------------------------------ sequences


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _token_at(data: bytes, start: int) -> str:
    end = start
    while end < len(data) and data[end] not in _WHITESPACE:
        end += 1
    return data[start:end].decode("utf-8", errors="replace")


def _token_start(data: bytes, offset: int) -> int:
    while offset > 0 and data[offset - 1] not in _WHITESPACE:
        offset -= 1
    return offset


def read_sequences(location: fs.Location, data: bytes | None = None, progress: bool | None = None) -> Events:
    """Parse a `sequences` file: one user per line, `USER ITEM ITEM ...`, positive integer IDs.

    Blank lines are skipped; a user on several lines gets the lines' items concatenated
    in file order (so the one-pair-per-line `USER ITEM` variant also reads).
    """
    name = os.fspath(location)
    if data is None:
        data = read_input(location, progress)
    bad = _NOT_ID_CHAR.search(data)
    if bad:
        token = _token_at(data, _token_start(data, bad.start()))
        kind = "non-positive" if token.startswith("-") and token[1:].isdigit() else "non-integer"
        raise DataError(f"{name}: line {_line_of(data, bad.start())}: {kind} ID {quote(token)} (IDs must be positive integers)")
    buf = np.frombuffer(data, dtype=np.uint8)
    is_space = np.zeros(256, dtype=bool)
    is_space[list(_WHITESPACE)] = True
    space = is_space[buf]
    if space.all():
        raise DataError(f"{name}: empty file (no user lines)")
    before = np.concatenate(([True], space[:-1]))
    after = np.concatenate((space[1:], [True]))
    starts = np.flatnonzero(~space & before)
    ends = np.flatnonzero(~space & after) + 1
    too_long = np.flatnonzero(ends - starts > _MAX_ID_DIGITS)
    if too_long.size:
        at = int(starts[too_long[0]])
        raise DataError(f"{name}: line {_line_of(data, at)}: ID {quote(_token_at(data, at), 40)} is too large")
    newlines = np.flatnonzero(buf == ord("\n"))
    line = np.searchsorted(newlines, starts)  # 0-based line of every token
    values = np.array(data.split(), dtype=np.bytes_).astype(np.int64)
    zero = np.flatnonzero(values == 0)
    if zero.size:
        at = int(starts[zero[0]])
        raise DataError(f"{name}: line {_line_of(data, at)}: non-positive ID {quote(_token_at(data, at))} (IDs must be positive integers)")
    is_user = np.concatenate(([True], line[1:] != line[:-1]))
    user_pos = np.flatnonzero(is_user)
    n_tokens = np.diff(np.append(user_pos, values.size))
    lonely = np.flatnonzero(n_tokens == 1)
    if lonely.size:
        pos = user_pos[lonely[0]]
        raise DataError(f"{name}: line {int(line[pos]) + 1}: user {int(values[pos])} has no items")
    user_codes, user_ids = _first_appearance_codes(values[user_pos])
    item_codes, item_ids = _first_appearance_codes(values[~is_user])
    return Events(
        source=name,
        user=np.repeat(user_codes, n_tokens - 1),
        user_keys=user_ids.astype(str),
        item=item_codes,
        item_keys=item_ids,
        native_ids=True,
    )


# ------------------------------------------------------------------ interaction tables


def table_kind(location: fs.Location) -> str:
    """'csv' | 'tsv' | 'parquet' | 'jsonl' from the file extension (a trailing .gz ignored)."""
    name = os.fspath(location)
    stem = name[:-3] if name.endswith(".gz") else name
    ext = os.path.splitext(stem)[1].lower()
    if ext not in _TABLE_KINDS:
        raise DataError(f"{name}: cannot tell the table format from the extension {ext!r}; "
                        f"use one of {', '.join(sorted(_TABLE_KINDS))} (optionally + .gz)")
    return _TABLE_KINDS[ext]


def _check_columns(name: str, available: list[str], wanted: list[str]) -> None:
    for col in wanted:
        if col not in available:
            raise DataError(f"{name}: no column {quote(col)} (available: {_cut(', '.join(available) or 'none', 200)})")


def _locate_bad_json(name: str, data: bytes) -> None:
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            detail = err.msg if isinstance(err, json.JSONDecodeError) else "invalid UTF-8"
            raise DataError(f"{name}: line {number}: malformed JSON ({detail})") from None
        if not isinstance(record, dict):
            raise DataError(f"{name}: line {number}: expected a JSON object, got {type(record).__name__}")


def _parse_table(name: str, kind: str, data: bytes, wanted: list[str]) -> pa.Table:
    try:
        if kind in ("csv", "tsv"):
            parse = pacsv.ParseOptions(delimiter="\t" if kind == "tsv" else ",")
            serial = pacsv.ReadOptions(use_threads=False)  # single-threaded, Arrow's errors name the row
            header = pacsv.open_csv(pa.BufferReader(data), read_options=serial, parse_options=parse).schema.names
            _check_columns(name, header, wanted)
            convert = pacsv.ConvertOptions(include_columns=wanted, column_types={c: pa.string() for c in wanted[:2]})
            try:
                return pacsv.read_csv(pa.BufferReader(data), parse_options=parse, convert_options=convert)
            except pa.ArrowInvalid:
                return pacsv.read_csv(pa.BufferReader(data), read_options=serial, parse_options=parse, convert_options=convert)
        if kind == "parquet":
            _check_columns(name, pq.read_schema(pa.BufferReader(data)).names, wanted)
            return pq.read_table(pa.BufferReader(data), columns=wanted)
        try:
            table = pajson.read_json(pa.BufferReader(data))
        except pa.ArrowInvalid:
            _locate_bad_json(name, data)
            raise
        _check_columns(name, table.column_names, wanted)
        return table.select(wanted)
    except pa.ArrowInvalid as err:
        raise DataError(f"{name}: cannot parse as {kind}: {_cut(str(err))}") from None


def _key_array(name: str, table: pa.Table, col: str) -> pa.Array:
    column = table.column(col).combine_chunks()
    if column.null_count:
        row = int(pc.index(pc.is_null(column), True).as_py()) + 1
        raise DataError(f"{name}: row {row}: missing value in column {col!r}")
    try:
        keys = column if pa.types.is_string(column.type) else pc.cast(column, pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raise DataError(f"{name}: column {col!r} has type {column.type}; expected IDs (strings or integers)") from None
    empty = pc.equal(pc.utf8_length(keys), 0)
    if pc.any(empty).as_py():
        row = int(pc.index(empty, True).as_py()) + 1
        raise DataError(f"{name}: row {row}: empty value in column {col!r}")
    return keys


def _numeric_column(name: str, table: pa.Table, col: str, what: str) -> np.ndarray:
    column = table.column(col).combine_chunks()
    if column.null_count:
        row = int(pc.index(pc.is_null(column), True).as_py()) + 1
        raise DataError(f"{name}: row {row}: missing value in {what} column {col!r}")
    kind = column.type
    try:
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            try:
                column = _parse_numbers(column, what)
            except pa.ArrowInvalid:
                row = _first_unparsable(column, what)
                value = column[row].as_py()
                expected = "a number" if what == "rating" else "a number or an ISO-8601 time"
                raise DataError(f"{name}: row {row + 1}: {what} {quote(value)} in column {quote(col)} "
                                f"is not {expected}") from None
        elif pa.types.is_date(kind):  # e.g. a CSV column of plain ISO dates, which Arrow reads as dates
            column = pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())
        elif pa.types.is_temporal(kind):
            column = pc.cast(column, pa.int64())
        elif not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)):
            raise pa.ArrowInvalid(f"type {kind}")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise DataError(f"{name}: {what} column {col!r} is not numeric ({_cut(str(err))})") from None
    if pa.types.is_floating(column.type):
        finite = pc.is_finite(column)
        if not pc.all(finite).as_py():
            row = int(pc.index(finite, False).as_py())
            raise DataError(f"{name}: row {row + 1}: {what} {column[row].as_py()} in column {quote(col)} is not a finite number")
    return column.to_numpy(zero_copy_only=False)


def _parse_numbers(column: pa.Array, what: str) -> pa.Array:
    """Strings as float64 (ratings) or int64 (timestamps: integers or ISO-8601 times, in seconds)."""
    if what == "rating":
        return pc.cast(column, pa.float64())
    try:
        return pc.cast(column, pa.int64())
    except pa.ArrowInvalid:
        pass
    integer = pc.match_substring_regex(column, r"^[+-]?[0-9]+$")  # each value on its own: a column may mix both
    if not pc.any(integer).as_py():
        return _iso_seconds(column)
    ints = pc.cast(pc.if_else(integer, column, "0"), pa.int64())
    times = _iso_seconds(pc.if_else(integer, "1970-01-01", column))
    return pc.if_else(integer, ints, times)


def _iso_seconds(column: pa.Array) -> pa.Array:
    """ISO-8601 dates and times (`2024-01-01`, `2024-01-01T10:00:00`) as int64 seconds."""
    return pc.cast(pc.cast(column, pa.timestamp("s")), pa.int64())


def _first_unparsable(column: pa.Array, what: str) -> int:
    """Index of the first value `_parse_numbers` rejects (bisection: O(log n) casts, no Python loop)."""
    lo, hi = 0, len(column)  # invariant: the first bad value is in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            _parse_numbers(column.slice(lo, mid - lo), what)
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def _cut(text: str, limit: int = 300) -> str:
    """An Arrow error (which may quote a whole row) cut to `limit` characters."""
    text = printable(" ".join(text.split()))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_interactions(
    location: fs.Location,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    min_rating: float | None = None,
    data: bytes | None = None,
    progress: bool | None = None,
) -> Events:
    """Parse an interaction table (CSV/TSV/Parquet/JSON lines, optionally .gz), one row per event.

    Rows with `rating_col < min_rating` are dropped. `time_col=None` keeps file order.
    Timestamps may be numbers, Arrow timestamps/dates or ISO-8601 strings.
    """
    name = os.fspath(location)
    if min_rating is not None and rating_col is None:
        raise DataError(f"{name}: min_rating={min_rating} needs a rating column (rating_col)")
    kind = table_kind(name)
    if data is None:
        data = read_input(location, progress)
    if not data.strip():
        raise DataError(f"{name}: empty file")
    wanted = list(dict.fromkeys(c for c in (user_col, item_col, time_col, rating_col) if c))
    table = _parse_table(name, kind, data, wanted)
    if table.num_rows == 0:
        raise DataError(f"{name}: empty file (no rows)")
    users = _key_array(name, table, user_col)
    items = _key_array(name, table, item_col)
    time = _numeric_column(name, table, time_col, "timestamp") if time_col else None
    if min_rating is not None:
        keep = _numeric_column(name, table, rating_col, "rating") >= min_rating
        users, items = users.filter(pa.array(keep)), items.filter(pa.array(keep))
        time = time[keep] if time is not None else None
    user = pc.dictionary_encode(users)
    item = pc.dictionary_encode(items)
    return Events(
        source=name,
        user=user.indices.to_numpy(zero_copy_only=False).astype(np.int64),
        user_keys=np.asarray(user.dictionary.to_pylist(), dtype=object),
        item=item.indices.to_numpy(zero_copy_only=False).astype(np.int64),
        item_keys=np.asarray(item.dictionary.to_pylist(), dtype=object),
        time=time,
    )


# ------------------------------------------------------------------ events -> sequences


def kcore_mask(user: np.ndarray, item: np.ndarray, min_user: int, min_item: int) -> np.ndarray:
    """Events kept by k-core filtering: drop users with < min_user and items with < min_item
    events, repeatedly, until every remaining user and item meets its minimum (fixpoint)."""
    keep = np.ones(user.shape[0], dtype=bool)
    if min_user <= 1 and min_item <= 1:
        return keep
    n_users = int(user.max()) + 1 if user.size else 0
    n_items = int(item.max()) + 1 if item.size else 0
    while True:
        user_count = np.bincount(user[keep], minlength=n_users)
        item_count = np.bincount(item[keep], minlength=n_items)
        drop = keep & ((user_count[user] < min_user) | (item_count[item] < min_item))
        if not drop.any():
            return keep
        keep &= ~drop


def build_sequences(events: Events, min_user: int = 0, min_item: int = 0) -> SequenceTable:
    """k-core filter, chronological (stable) sort per user, dense item IDs 1..K.

    Users keep their order of first appearance. Items are numbered in order of first
    appearance in the result (reading users top to bottom), except `native_ids` that
    are already exactly 1..K, which are kept so a `sequences` file round-trips.
    """
    keep = kcore_mask(events.user, events.item, min_user, min_item)
    if not keep.any():
        raise DataError(f"{events.source}: no user left after filtering (min_user={min_user}, min_item={min_item})")
    user, item = events.user[keep], events.item[keep]
    time = events.time[keep] if events.time is not None else None
    order = np.lexsort((time, user)) if time is not None else np.argsort(user, kind="stable")
    user, item = user[order], item[order]
    used_users, user = np.unique(user, return_inverse=True)
    offsets = np.concatenate(([0], np.cumsum(np.bincount(user.reshape(-1), minlength=used_users.size)))).astype(np.int64)
    used_items = np.unique(item)
    native = events.item_keys[used_items] if events.native_ids else None
    if native is not None and native.min() == 1 and native.max() == used_items.size:
        ids = events.item_keys[item]
        item_keys = [str(i) for i in range(1, used_items.size + 1)]
    else:
        codes, keys = _first_appearance_codes(item)
        ids = codes + 1
        item_keys = [str(k) for k in events.item_keys[keys]]
    timestamps = None
    if time is not None:
        timestamps = np.floor(time[order]).astype(np.int64) if time.dtype.kind == "f" else time[order].astype(np.int64)
    return SequenceTable(
        users=[str(k) for k in events.user_keys[used_users]],
        offsets=offsets,
        items=ids.astype(np.int32),
        item_keys=item_keys,
        timestamps=timestamps,
    )
