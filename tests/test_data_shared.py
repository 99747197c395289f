"""The six shared real datasets prepare to exactly the counts published in ../shared/data/README.md."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from metarec.data.domain import load_domains
from metarec.data.prepare import prepare_shared, shared_data_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT / ".." / "shared" / "data"

# name: (users, items, interactions), as published in ../shared/data/README.md
PUBLISHED = {
    "amazon-beauty": (52_204, 57_289, 394_908),
    "amazon-video-games": (31_013, 23_715, 287_107),
    "movielens-1m": (6_040, 3_416, 999_611),
    "amazon-sports": (35_598, 18_357, 296_337),
    "yelp": (30_431, 20_033, 316_354),
    "amazon-scientific": (8_442, 4_385, 59_384),
}
# users with fewer than 3 interactions (train only, no evaluation target), same README
SHORT_USERS = {"amazon-video-games": 112, "amazon-beauty": 1_706}


@pytest.fixture(autouse=True)
def _shared_dir(monkeypatch):
    monkeypatch.delenv("METAREC_SHARED_DATA", raising=False)


def test_shared_data_dir_is_next_to_the_repo():
    assert Path(shared_data_dir()) == SHARED.resolve()


def test_prepare_shared_matches_published_counts(tmp_path):
    out = tmp_path / "prepared"
    paths = prepare_shared(out)
    assert sorted(paths) == sorted(PUBLISHED)
    domains = load_domains(out, sorted(PUBLISHED))
    for name, (users, items, interactions) in PUBLISHED.items():
        manifest = json.loads((out / name / "manifest.json").read_text())
        assert (manifest["n_users"], manifest["n_items"], manifest["n_interactions"]) == (users, items, interactions), name
        domain = domains[name]
        assert (domain.n_users, domain.n_items, domain.n_interactions) == (users, items, interactions), name
        histories, targets = domain.eval_examples("test")
        assert len(histories) == users - SHORT_USERS.get(name, 0), name
        assert targets.min() >= 1 and targets.max() <= items

    stamps = {n: os.stat(out / n / "data.parquet").st_mtime_ns for n in PUBLISHED}
    assert prepare_shared(out, names=["yelp", "movielens-1m"]) == {n: paths[n] for n in ("yelp", "movielens-1m")}
    assert stamps == {n: os.stat(out / n / "data.parquet").st_mtime_ns for n in PUBLISHED}


def test_shared_files_round_trip_line_by_line(tmp_path):
    out = tmp_path / "prepared"
    prepare_shared(out, names=["amazon-video-games"])
    domain = load_domains(out, ["amazon-video-games"])["amazon-video-games"]
    lines = (SHARED / "amazon-video-games.txt").read_text().split()
    rebuilt = []
    for user, seq in zip(domain.users, domain.sequences):
        rebuilt.append(user)
        rebuilt.extend(str(i) for i in seq.tolist())
    assert rebuilt == lines
