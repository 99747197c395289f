"""Prepare a domain: read an input file, write `OUT/NAME/` in the prepared format (docs/design.md §1).

Layout of a prepared domain directory:
- `data.parquet`: one row per user, `user: string`, `items: list<int32>` (dense IDs
  1..K, chronological), optional `timestamps: list<int64>`;
- `items.parquet`: `key: string` (original item key) -> `id: int32`;
- `manifest.json`: name, n_users, n_items, n_interactions, format_version, the sha256
  of both Parquet files, the source input and its sha256, the parameters used (filters).

The directory is written to a temp sibling and moved into place (`fs.atomic_dir`), so
an error never leaves partial output. Preparing the same domain again is a no-op;
a directory holding a different domain is refused unless `overwrite=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from metarec import fs
from metarec.data import recbole
from metarec.data.readers import (
    SequenceTable,
    build_sequences,
    gunzip_input,
    read_input,
    read_interactions,
    read_sequences,
)
from metarec.errors import DataError, quote

FORMAT_VERSION = 1
DATA_FILE = "data.parquet"
ITEMS_FILE = "items.parquet"
MANIFEST_FILE = "manifest.json"
FORMATS = ("sequences", "interactions", "recbole")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_domain_name(name: str) -> None:
    if not _NAME.match(name or "") or len(name) > 200:
        raise DataError(f"invalid domain name {quote(name)}: use letters, digits, '.', '_' or '-' (not starting with '.', '_' or '-')")


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def encode_domain(table: SequenceTable) -> tuple[bytes, bytes]:
    """(data.parquet, items.parquet) bytes of a sequence table; deterministic for a given pyarrow."""
    offsets = pa.array(table.offsets.astype("int32"), pa.int32())
    columns = {
        "user": pa.array(table.users, pa.string()),
        "items": pa.ListArray.from_arrays(offsets, pa.array(table.items, pa.int32())),
    }
    if table.timestamps is not None:
        columns["timestamps"] = pa.ListArray.from_arrays(offsets, pa.array(table.timestamps, pa.int64()))
    items = pa.table({"key": pa.array(table.item_keys, pa.string()),
                      "id": pa.array(range(1, table.n_items + 1), pa.int32())})
    return _parquet_bytes(pa.table(columns)), _parquet_bytes(items)


def check_output_root(out_root: fs.Location) -> None:
    """Refuse a local output root that is a file (before any input is read)."""
    if not fs.is_uri(out_root) and fs.exists(out_root) and not fs.isdir(out_root):
        raise DataError(f"--out {os.fspath(out_root)}: is a file, not a directory of prepared domains")


def read_manifest(domain_dir: str) -> dict | None:
    """The manifest of a prepared domain directory, or None if it has none / an unreadable one."""
    path = fs.join(domain_dir, MANIFEST_FILE)
    if not fs.exists(path):
        return None
    try:
        manifest = json.loads(fs.read_text(path))
    except (ValueError, UnicodeDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def write_domain(
    table: SequenceTable,
    out_root: fs.Location,
    name: str,
    *,
    source: str,
    source_sha256: str | None = None,
    params: dict | None = None,
    overwrite: bool = False,
) -> str:
    """Write `out_root/name/` atomically; return its location. Same domain there already: no-op."""
    check_domain_name(name)
    check_output_root(out_root)
    data_bytes, items_bytes = encode_domain(table)
    manifest = {
        "name": name,
        "format_version": FORMAT_VERSION,
        "n_users": table.n_users,
        "n_items": table.n_items,
        "n_interactions": table.n_interactions,
        "sha256": sha256_hex(data_bytes),
        "items_sha256": sha256_hex(items_bytes),
        "source": source,
        "source_sha256": source_sha256,
        "params": params or {},
    }
    dest = fs.join(out_root, name)
    if fs.exists(dest):
        existing = read_manifest(dest)
        same = existing is not None and all(existing.get(k) == manifest[k] for k in ("name", "sha256", "items_sha256"))
        if same:
            return dest
        if not overwrite:
            held = (f"domain {existing.get('name')!r} from {existing.get('source')}" if existing
                    else "something that is not a prepared domain")
            raise DataError(f"{dest} already holds {held}, which differs from the domain being prepared; "
                            "choose another --name/--out or pass --overwrite")
    with fs.atomic_dir(dest, replace=overwrite) as tmp:
        fs.write_bytes(fs.join(tmp, DATA_FILE), data_bytes)
        fs.write_bytes(fs.join(tmp, ITEMS_FILE), items_bytes)
        fs.write_bytes(fs.join(tmp, MANIFEST_FILE), (json.dumps(manifest, indent=2) + "\n").encode())
    return dest


def prepare_domain(
    input_uri: fs.Location,
    out_root: fs.Location,
    name: str,
    fmt: str = "sequences",
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    time_col: str | None = None,
    rating_col: str | None = None,
    min_rating: float | None = None,
    min_user: int = 0,
    min_item: int = 0,
    overwrite: bool = False,
    progress: bool | None = None,
) -> str:
    """Read `input_uri` (`fmt` = 'sequences', 'interactions' or 'recbole') and write the prepared
    domain `out_root/name/`; return its location. See the module docstring for the layout.

    Columns left None take the format's names: `user`, `item`, `timestamp` for
    interaction tables; RecBole's `user_id`, `item_id`, optional `timestamp` for `recbole`
    (`metarec.data.recbole`, which also reads a train/valid/test split triple)."""
    check_domain_name(name)
    check_output_root(out_root)
    if fmt not in FORMATS:
        raise DataError(f"{os.fspath(input_uri)}: unknown input format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if fmt == "recbole":
        input_uri = recbole.input_file(input_uri)
    source = os.fspath(input_uri)
    raw = read_input(input_uri, progress, decompress=False)
    data = gunzip_input(source, raw)
    params = {"format": fmt, "min_user": min_user, "min_item": min_item}
    if fmt == "sequences":
        events = read_sequences(input_uri, data=data)
    elif fmt == "recbole":
        events = recbole.read_recbole(input_uri, user_col=user_col, item_col=item_col, time_col=time_col,
                                      rating_col=rating_col, min_rating=min_rating, data=data)
        params.update(user_col=user_col, item_col=item_col, time_col=time_col,
                      rating_col=rating_col, min_rating=min_rating)
    else:
        user_col, item_col, time_col = user_col or "user", item_col or "item", time_col or "timestamp"
        events = read_interactions(input_uri, user_col=user_col, item_col=item_col, time_col=time_col,
                                   rating_col=rating_col, min_rating=min_rating, data=data)
        params.update(user_col=user_col, item_col=item_col, time_col=time_col,
                       rating_col=rating_col, min_rating=min_rating)
    table = build_sequences(events, min_user=min_user, min_item=min_item)
    return write_domain(table, out_root, name, source=source, source_sha256=sha256_hex(raw),
                        params=params, overwrite=overwrite)


def shared_data_dir() -> str:
    """`$METAREC_SHARED_DATA`, else `../shared/data` relative to the repository root."""
    env = os.environ.get("METAREC_SHARED_DATA")
    if env:
        return env
    return str((Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve())


def prepare_shared(out_root: fs.Location, names: list[str] | None = None) -> dict[str, str]:
    """Prepare the `sequences` files `NAME.txt` of the shared data directory into `out_root`.

    `names=None` prepares every `*.txt` there. A domain already prepared from a file with
    the same sha256 is skipped without re-reading it. Returns name -> domain location.
    """
    root = shared_data_dir()
    if not fs.isdir(root):
        raise DataError(f"{root}: shared data directory not found (set METAREC_SHARED_DATA)")
    if names is None:
        names = [n[: -len(".txt")] for n in fs.listdir(root) if n.endswith(".txt")]
    prepared = {}
    for name in names:
        path = fs.join(root, f"{name}.txt")
        if not fs.exists(path):
            raise DataError(f"{path}: no such shared data file (domain {name!r})")
        dest = fs.join(out_root, name)
        manifest = read_manifest(dest)
        if manifest and manifest.get("name") == name and manifest.get("source_sha256") == sha256_hex(fs.read_bytes(path)):
            prepared[name] = dest
            continue
        prepared[name] = prepare_domain(path, out_root, name, "sequences")
    return prepared
