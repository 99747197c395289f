"""Harmful sources for the selective-transfer experiment: a source whose transitions carry nothing.

`shuffled_copy(root, "amazon-beauty")` writes the prepared domain `amazon-beauty-shuffled`
next to the shared ones: the same users and items as amazon-beauty, each user's sequence
randomly permuted (seeded), so item popularity and co-occurrence survive but the order does
not. Built from the shared file, in .cache only (never in the repository).

    python benchmarks/harmful_sources.py amazon-beauty     # prints the new domain's location
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import PREPARED, prepare_shared_data

from metarec.data.prepare import prepare_domain, read_manifest, shared_data_dir

SUFFIX = "-shuffled"


def shuffled_lines(text: str, seed: int) -> str:
    """`USER ITEM ITEM ...` lines with each user's items permuted by one seeded generator."""
    rng = np.random.default_rng(seed)
    out = []
    for line in text.splitlines():
        user, *items = line.split()
        out.append(" ".join([user, *(items[i] for i in rng.permutation(len(items)))]))
    return "\n".join(out) + "\n"


def shuffled_copy(root: str, name: str, seed: int = 0) -> str:
    """Prepare NAME-shuffled under `root` (idempotent for the same source file and seed); returns its name."""
    shuffled = name + SUFFIX
    manifest = read_manifest(str(Path(root) / shuffled))
    tag = f"shuffled-seed{seed}-of-{name}"
    if manifest and manifest.get("source", "").endswith(f"{tag}.txt"):
        return shuffled
    text = (Path(shared_data_dir()) / f"{name}.txt").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{tag}.txt"
        path.write_text(shuffled_lines(text, seed))
        prepare_domain(str(path), root, shuffled, overwrite=True, progress=False)
    return shuffled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="shared domains to copy with shuffled sequences")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = prepare_shared_data()
    for name in args.names:
        print(Path(PREPARED) / shuffled_copy(root, name, args.seed))


if __name__ == "__main__":
    main()
