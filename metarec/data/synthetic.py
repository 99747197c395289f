"""A synthetic multi-domain problem with a planted, transferable transition structure.

A latent Markov chain over C *concepts* is shared by all domains. Each domain has its
own, disjoint item set; every item belongs to one concept (about K_d / C items per
concept, assigned at random so IDs carry no hint). A user starts at a random concept,
walks the chain, and at each step emits a random item of the current concept (with
probability `noise` a uniformly random item instead). Sources are large, the target
(the last name) small, so what sources teach about the chain transfers to the target.
Everything is deterministic given the seed. Domains are written in the prepared format
by the same writer as `metarec prepare`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from metarec import fs
from metarec.data.prepare import write_domain
from metarec.data.readers import SequenceTable

DEFAULT_NAMES = ("src-a", "src-b", "target")
SOURCE_DEFAULTS = {"n_users": 2000, "n_items": 300, "seq_len": 20}
TARGET_DEFAULTS = {"n_users": 300, "n_items": 150, "seq_len": 8}


@dataclass(frozen=True)
class PlantedStructure:
    """The hidden truth: `transition[c]` = next-concept distribution; `concept_of_item[name][i - 1]` = concept of item i."""

    transition: np.ndarray
    concept_of_item: dict[str, np.ndarray]


def _domain_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def planted_structure(
    n_items: Mapping[str, int], n_concepts: int = 16, branching: int = 2, seed: int = 0
) -> PlantedStructure:
    """The shared concept chain (each concept has `branching` successors) and each domain's item -> concept map."""
    rng = np.random.default_rng(seed)
    transition = np.zeros((n_concepts, n_concepts))
    for c in range(n_concepts):
        successors = rng.choice(n_concepts, size=min(branching, n_concepts), replace=False)
        transition[c, successors] = rng.dirichlet(np.full(successors.size, 2.0))
    concept_of_item = {}
    for name, k in n_items.items():
        if k < n_concepts:
            raise ValueError(f"domain {name!r}: n_items={k} < n_concepts={n_concepts}")
        concept = np.empty(k, dtype=np.int64)
        concept[_domain_rng(seed, name).permutation(k)] = np.arange(k) % n_concepts
        concept_of_item[name] = concept
    return PlantedStructure(transition=transition, concept_of_item=concept_of_item)


def simulate_domain(
    structure: PlantedStructure, name: str, n_users: int, seq_len: int, noise: float, seed: int
) -> SequenceTable:
    """Users walking the concept chain; lengths uniform in [max(3, seq_len // 2), 3 * seq_len // 2]."""
    rng = _domain_rng(seed + 1, name)
    concept_of_item = structure.concept_of_item[name]
    n_items, n_concepts = concept_of_item.size, structure.transition.shape[0]
    members = [np.flatnonzero(concept_of_item == c) + 1 for c in range(n_concepts)]
    width = max(m.size for m in members)
    by_concept = np.stack([np.resize(m, width) for m in members])  # only the first counts[c] are read
    counts = np.array([m.size for m in members])
    cumulative = np.cumsum(structure.transition, axis=1)
    lengths = rng.integers(max(3, seq_len // 2), max(3, 3 * seq_len // 2) + 1, size=n_users)
    steps = int(lengths.max())
    walk = np.empty((n_users, steps), dtype=np.int64)
    concept = rng.integers(0, n_concepts, size=n_users)
    for t in range(steps):
        pick = (rng.random(n_users) * counts[concept]).astype(np.int64)
        walk[:, t] = by_concept[concept, pick]
        noisy = rng.random(n_users) < noise
        walk[noisy, t] = rng.integers(1, n_items + 1, size=int(noisy.sum()))
        step = rng.random(n_users)[:, None]
        concept = np.minimum((cumulative[concept] < step).sum(axis=1), n_concepts - 1)
    keep = np.arange(steps)[None, :] < lengths[:, None]
    return SequenceTable(
        users=[str(u) for u in range(1, n_users + 1)],
        offsets=np.concatenate(([0], np.cumsum(lengths))).astype(np.int64),
        items=walk[keep].astype(np.int32),
        item_keys=[str(i) for i in range(1, n_items + 1)],
    )


def generate_domains(
    out_root: fs.Location,
    names: Sequence[str] = DEFAULT_NAMES,
    n_users: Mapping[str, int] | None = None,
    n_items: Mapping[str, int] | None = None,
    seq_len: Mapping[str, int] | None = None,
    *,
    n_concepts: int = 16,
    branching: int = 2,
    noise: float = 0.1,
    seed: int = 0,
    overwrite: bool = False,
) -> str:
    """Write the synthetic domains `out_root/NAME/` (the last name is the target) and return out_root.

    Per-domain sizes default to 2000 users x ~20 items over 300 items for sources and
    300 users x ~8 items over 150 items for the target. Same arguments -> same files
    (writing them again is a no-op).
    """
    def size(table: Mapping[str, int] | None, name: str, key: str) -> int:
        default = (TARGET_DEFAULTS if name == names[-1] else SOURCE_DEFAULTS)[key]
        return int((table or {}).get(name, default))

    structure = planted_structure({n: size(n_items, n, "n_items") for n in names}, n_concepts, branching, seed)
    for name in names:
        table = simulate_domain(structure, name, size(n_users, name, "n_users"), size(seq_len, name, "seq_len"), noise, seed)
        write_domain(table, out_root, name, source=f"synthetic:seed={seed}", overwrite=overwrite,
                     params={"n_concepts": n_concepts, "branching": branching, "noise": noise})
    return str(out_root)
