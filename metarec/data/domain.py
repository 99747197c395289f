"""A prepared domain in memory, and its leave-one-out splits (docs/design.md §1).

Leave-one-out per user with n chronological items: the last item is the test target,
the second-to-last the validation target, the rest is training. Users with n < 3 have
no evaluation target and train on all their items.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from metarec import fs
from metarec.data.prepare import DATA_FILE, FORMAT_VERSION, ITEMS_FILE, MANIFEST_FILE, sha256_hex
from metarec.errors import DataError, quote

MIN_EVAL_LEN = 3


@dataclass
class Domain:
    """One domain: item IDs 1..n_items (0 = padding), users with chronological int32 sequences."""

    name: str
    n_items: int
    users: list[str]
    sequences: list[np.ndarray]
    manifest: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_interactions(self) -> int:
        return int(sum(s.shape[0] for s in self.sequences))

    @classmethod
    def load(cls, root: fs.Location, name: str) -> "Domain":
        """Load `root/name/` (local or remote), checking the manifest and the data checksum."""
        where = fs.join(root, name)
        manifest_path = fs.join(where, MANIFEST_FILE)
        manifest = load_manifest(root, name)
        data_path = fs.join(where, DATA_FILE)
        if not fs.exists(data_path):
            raise DataError(f"{data_path}: missing (the domain directory is incomplete; prepare it again)")
        data = fs.read_bytes(data_path)
        if sha256_hex(data) != manifest.get("sha256"):
            raise DataError(f"{data_path}: sha256 does not match {manifest_path} (file modified or corrupted); prepare it again")
        try:
            table = pq.read_table(pa.BufferReader(data), columns=["user", "items"])
        except (pa.ArrowException, ValueError) as err:
            raise DataError(f"{data_path}: not a prepared data file ({quote(str(err))})") from None
        if table.num_rows != manifest["n_users"]:
            raise DataError(f"{data_path}: holds {table.num_rows} users, {manifest_path} says n_users={manifest['n_users']}")
        items = table.column("items").combine_chunks()
        offsets = items.offsets.to_numpy()
        values = items.values.to_numpy().astype(np.int32, copy=False)
        n_items = int(manifest["n_items"])
        if values.size and (values.min() < 1 or values.max() > n_items):
            raise DataError(f"{data_path}: item IDs outside 1..{n_items} (n_items in {manifest_path})")
        sequences = np.split(values, offsets[1:-1]) if len(offsets) > 1 else []
        return cls(name=name, n_items=n_items, users=table.column("user").to_pylist(), sequences=sequences, manifest=manifest)

    def subsample_users(self, n: int, seed: int, compact_items: bool = False) -> "Domain":
        """A seeded random subset of n users (file order kept).

        Items keep their IDs, or with `compact_items` are renumbered 1..K' (in ID order)
        over the items the chosen users hold, as a small domain of its own would be.
        """
        if n >= self.n_users and not compact_items:
            return self
        chosen = np.sort(np.random.default_rng(seed).choice(self.n_users, size=min(n, self.n_users), replace=False))
        sequences = [self.sequences[i] for i in chosen]
        n_items = self.n_items
        if compact_items:
            held = np.unique(np.concatenate(sequences)) if sequences else np.zeros(0, np.int32)
            new_id = np.zeros(self.n_items + 1, dtype=np.int32)
            new_id[held] = np.arange(1, held.size + 1, dtype=np.int32)
            sequences = [new_id[s] for s in sequences]
            n_items = int(held.size)
        return replace(
            self,
            n_items=n_items,
            users=[self.users[i] for i in chosen],
            sequences=sequences,
            manifest={**self.manifest, "subsample": {"n_users": len(chosen), "seed": seed, "compact_items": compact_items}},
        )

    def train_sequences(self, include_validation: bool = False) -> list[np.ndarray]:
        """Training part of every user's sequence: items[:-2] if it has >= 3 items, else all of it.

        `include_validation`: items[:-1] instead (a refit that also trains on the validation
        target; the test target is never trained on).
        """
        cut = 1 if include_validation else 2
        return [s[:-cut] if s.shape[0] >= MIN_EVAL_LEN else s for s in self.sequences]

    def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(histories, targets) of users with >= 3 items.

        'val': history items[:-2], target items[-2]; 'test': history items[:-1], target items[-1].
        """
        if split not in ("val", "test"):
            raise ValueError(f"split must be 'val' or 'test', not {split!r}")
        cut = 2 if split == "val" else 1
        rows = [s for s in self.sequences if s.shape[0] >= MIN_EVAL_LEN]
        histories = [s[:-cut] for s in rows]
        targets = np.array([s[-cut] for s in rows], dtype=np.int64)
        return histories, targets


def load_manifest(root: fs.Location, name: str) -> dict:
    """The checked manifest of the prepared domain `root/name/` (DataError if missing or malformed)."""
    manifest_path = fs.join(root, name, MANIFEST_FILE)
    if not fs.exists(manifest_path):
        raise DataError(f"domain {name!r} is not prepared: {manifest_path} does not exist; "
                        f"run `metarec prepare INPUT --name {name} --out {os.fspath(root)}`")
    try:
        manifest = json.loads(fs.read_text(manifest_path))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{manifest_path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DataError(f"{manifest_path}: format_version {quote(version)} is not {FORMAT_VERSION}; prepare the domain again")
    check_manifest(manifest, manifest_path)
    return manifest


def load_item_map(root: fs.Location, name: str) -> dict[str, int]:
    """Original item key -> dense ID of a prepared domain (from `items.parquet`)."""
    path = fs.join(root, name, ITEMS_FILE)
    if not fs.exists(path):
        raise DataError(f"{path}: missing; prepare the domain {name!r} again")
    data = fs.read_bytes(path)
    manifest_path = fs.join(root, name, MANIFEST_FILE)
    try:
        expected = json.loads(fs.read_text(manifest_path)).get("items_sha256")
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        expected = None
    if expected is not None and sha256_hex(data) != expected:
        raise DataError(f"{path}: sha256 does not match {manifest_path} (file modified or corrupted); prepare it again")
    try:
        table = pq.read_table(pa.BufferReader(data), columns=["key", "id"])
    except (pa.ArrowException, ValueError) as err:
        raise DataError(f"{path}: not a prepared item map ({quote(str(err))})") from None
    return dict(zip(table.column("key").to_pylist(), table.column("id").to_pylist()))


_MANIFEST_COUNTS = {"n_users": 0, "n_items": 1, "n_interactions": 0}


def check_manifest(manifest: dict, where: str) -> None:
    """Refuse a manifest with missing or ill-typed fields (a tampered or foreign file)."""
    for key, least in _MANIFEST_COUNTS.items():
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise DataError(f"{where}: {key} is {quote(value)}, expected an integer >= {least}; prepare the domain again")
    for key in ("sha256", "name"):
        if not isinstance(manifest.get(key), str):
            raise DataError(f"{where}: {key} is {quote(manifest.get(key))}, expected a string; prepare the domain again")


def load_domains(root: fs.Location, names: list[str]) -> dict[str, Domain]:
    """Load several domains; refuse a repeated name, an empty domain, or two domains with the same data."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"domains listed more than once: {', '.join(repeated)}")
    domains = {name: Domain.load(root, name) for name in names}
    by_sha: dict[str, str] = {}
    for name, domain in domains.items():
        if domain.n_users == 0:
            raise DataError(f"domain {name!r} at {fs.join(root, name)} has no users")
        sha = domain.manifest["sha256"]
        if sha in by_sha:
            raise DataError(f"overlapping domains: {by_sha[sha]!r} and {name!r} hold the same data (sha256 {sha[:12]}...); "
                            "sources and target must be different domains")
        by_sha[sha] = name
    return domains


def data_fingerprint(domains: dict[str, "Domain"]) -> dict[str, str]:
    """{domain name: sha256 of its data file} of loaded domains: what a run records of its data."""
    return {name: str(d.manifest.get("sha256")) for name, d in sorted(domains.items())}


def domain_sha256(root: str, name: str) -> str:
    """The data checksum `root/name/manifest.json` records (DataError if the domain is not prepared)."""
    manifest_path = fs.join(root, name, MANIFEST_FILE)
    if not fs.exists(manifest_path):
        raise DataError(f"domain {name!r} is not prepared: {manifest_path} does not exist")
    try:
        manifest = json.loads(fs.read_text(manifest_path))
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"{manifest_path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{manifest_path}: expected a JSON object")
    return str(manifest.get("sha256"))
