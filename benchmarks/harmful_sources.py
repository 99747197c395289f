"""Harmful sources for the selective-transfer experiment: sources that carry nothing.

`harmful_copy(root, "amazon-beauty-shuffled")` writes that prepared domain next to the
shared ones, built from the shared file amazon-beauty, in .cache only (never in the
repository). Two kinds, named by suffix:

- `NAME-shuffled`: the same users and items, each user's sequence randomly permuted
  (seeded), so item popularity and co-occurrence survive but the order does not;
- `NAME-random`: the same users and sequence lengths, every item drawn uniformly from
  NAME's items (seeded), so nothing survives: no order, no co-occurrence, no popularity.

    python benchmarks/harmful_sources.py amazon-beauty-shuffled amazon-sports-random   # prints their locations
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import PREPARED, prepare_shared_data

from metarec.data.prepare import prepare_domain, read_manifest, shared_data_dir


def shuffled_lines(text: str, seed: int) -> str:
    """`USER ITEM ITEM ...` lines with each user's items permuted by one seeded generator."""
    rng = np.random.default_rng(seed)
    out = []
    for line in text.splitlines():
        user, *items = line.split()
        out.append(" ".join([user, *(items[i] for i in rng.permutation(len(items)))]))
    return "\n".join(out) + "\n"


def random_lines(text: str, seed: int) -> str:
    """`USER ITEM ITEM ...` lines of the same lengths, items uniform over the file's item IDs."""
    rng = np.random.default_rng(seed)
    rows = [line.split() for line in text.splitlines()]
    n_items = max(int(i) for _, *items in rows for i in items)
    return "".join(" ".join([user, *map(str, rng.integers(1, n_items + 1, len(items)))]) + "\n" for user, *items in rows)


KINDS = {"-shuffled": shuffled_lines, "-random": random_lines}


def kind_of(name: str) -> str | None:
    """The suffix of KINDS that `name` ends with; None for a plain domain."""
    return next((suffix for suffix in KINDS if name.endswith(suffix)), None)


def is_harmful(name: str) -> bool:
    return kind_of(name) is not None


def harmful_copy(root: str, harmful: str, seed: int = 0) -> str:
    """Prepare NAME-KIND under `root` (idempotent for the same source file and seed); returns its name."""
    suffix = kind_of(harmful)
    if suffix is None:
        raise ValueError(f"{harmful!r}: a harmful source is NAME{' or NAME'.join(KINDS)}")
    name = harmful[: -len(suffix)]
    manifest = read_manifest(str(Path(root) / harmful))
    tag = f"{suffix[1:]}-seed{seed}-of-{name}"
    if manifest and manifest.get("source", "").endswith(f"{tag}.txt"):
        return harmful
    text = (Path(shared_data_dir()) / f"{name}.txt").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{tag}.txt"
        path.write_text(KINDS[suffix](text, seed))
        prepare_domain(str(path), root, harmful, overwrite=True, progress=False)
    return harmful


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="harmful sources to prepare: NAME-shuffled or NAME-random (NAME a shared domain)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = prepare_shared_data()
    for name in args.names:
        print(Path(PREPARED) / harmful_copy(root, name, args.seed))


if __name__ == "__main__":
    main()
