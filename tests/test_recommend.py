"""`metarec recommend`: top-k from a run's best checkpoint, for a user or an ad-hoc history."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from metarec.checkpoint import load_checkpoint, restore_model
from metarec.cli import cli as main
from metarec.config import config_from_dict
from metarec.data.domain import Domain, load_item_map
from metarec.data.prepare import write_domain
from metarec.data.synthetic import planted_structure, simulate_domain
from metarec.errors import CheckpointError, DataError, MetaRecError
from metarec.objective import last_position_scores
from metarec.recommend import recommend
from metarec.problem import build_problem
from metarec.train import train

SIZES = {"src-a": (60, 40, 10), "src-b": (50, 36, 10), "shop": (40, 30, 6)}  # users, items, seq_len
MAX_LEN = 5


def _prepare(root) -> None:
    """Synthetic domains; the target's item and user keys are strings unrelated to the dense IDs."""
    structure = planted_structure({n: s[1] for n, s in SIZES.items()}, n_concepts=6, seed=0)
    for name, (users, _items, seq_len) in SIZES.items():
        table = simulate_domain(structure, name, users, seq_len, noise=0.1, seed=0)
        if name == "shop":
            k = table.n_items
            table = dataclasses.replace(
                table,
                item_keys=[f"sku-{(7 * i + 3) % k:03d}" for i in range(k)],
                users=[f"cust-{u}" for u in table.users],
            )
        write_domain(table, root, name, source="test")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A tiny MetaRec run (so the checkpoint also holds source tables)."""
    base = tmp_path_factory.mktemp("recommend")
    root = str(base / "prepared")
    _prepare(root)
    cfg = config_from_dict({
        "name": "tiny",
        "data": {"root": root, "target": "shop", "sources": ["src-a", "src-b"], "max_len": MAX_LEN},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 16, "max_steps": 4, "eval_every": 2, "progress": False, "device": "cpu"},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 2},
    })
    out = str(base / "run")
    train(cfg, out)
    return out


def _target(run_dir: str) -> tuple[Domain, dict[str, int]]:
    root = f"{run_dir}/../prepared"
    return Domain.load(root, "shop"), load_item_map(root, "shop")


def _full_model_scores(run_dir: str, history: np.ndarray) -> torch.Tensor:
    """Reference: scores of the full (all-domain) model restored from the whole checkpoint."""
    import yaml

    cfg = config_from_dict(yaml.safe_load(open(f"{run_dir}/config.yaml")))
    problem = build_problem(cfg, torch.device("cpu"))
    restore_model(problem.model, load_checkpoint(f"{run_dir}/checkpoints/best").params, run_dir)
    problem.model.eval()
    window = history[-MAX_LEN:]
    inputs = torch.zeros(1, MAX_LEN, dtype=torch.long)
    inputs[0, MAX_LEN - len(window):] = torch.tensor(window.tolist())
    with torch.no_grad():
        return last_position_scores(problem.model, dict(problem.model.named_parameters()), "shop", inputs)[0]


def test_user_top_k_matches_full_model_and_skips_history(run_dir):
    domain, key_to_id = _target(run_dir)
    row = int(np.argmax([len(s) for s in domain.sequences]))  # longer than max_len: the window is cut
    user, seq = domain.users[row], domain.sequences[row]
    assert len(seq) > MAX_LEN

    out = recommend(run_dir, user=user, k=7)

    assert out["user"] == user and out["k"] == 7 and out["unknown_items"] == []
    items = out["items"]
    ids = [it["id"] for it in items]
    assert len(ids) == 7 == len(set(ids))
    assert not set(ids) & set(seq.tolist()) and 0 not in ids
    assert all(key_to_id[it["item"]] == it["id"] for it in items)  # original keys, not IDs
    assert all(it["item"].startswith("sku-") for it in items)
    scores = [it["score"] for it in items]
    assert scores == sorted(scores, reverse=True)

    reference = _full_model_scores(run_dir, seq)
    reference[0] = float("-inf")
    reference[torch.tensor(seq.tolist())] = float("-inf")
    top = torch.topk(reference, 7)
    assert ids == top.indices.tolist()
    np.testing.assert_allclose(scores, top.values.numpy(), rtol=1e-5, atol=1e-6)


def test_history_reports_unknown_items(run_dir):
    _domain, key_to_id = _target(run_dir)
    keys = sorted(key_to_id)[:3]
    out = recommend(run_dir, history=[keys[0], "no-such-item", keys[1], keys[2]], k=5)
    assert out["unknown_items"] == ["no-such-item"]
    assert out["history"] == [keys[0], "no-such-item", keys[1], keys[2]]
    assert not {it["item"] for it in out["items"]} & set(keys)
    assert out["items"] == recommend(run_dir, history=keys, k=5)["items"]  # the unknown key is not scored


def test_k_beyond_catalogue_returns_every_unseen_item(run_dir):
    _domain, key_to_id = _target(run_dir)
    history = sorted(key_to_id)[:4]
    out = recommend(run_dir, history=history + [history[0]], k=10_000)
    assert len(out["items"]) == len(key_to_id) - 4
    assert {it["item"] for it in out["items"]} == set(key_to_id) - set(history)


def test_errors_name_what_is_wrong(run_dir, tmp_path):
    with pytest.raises(DataError, match="cust-nobody"):
        recommend(run_dir, user="cust-nobody")
    with pytest.raises(MetaRecError, match="none of the history items"):
        recommend(run_dir, history=["x", "y"])
    with pytest.raises(MetaRecError, match="exactly one"):
        recommend(run_dir)
    with pytest.raises(MetaRecError, match="k must be"):
        recommend(run_dir, user="cust-1", k=0)

    bare = tmp_path / "bare-run"
    bare.mkdir()
    shutil.copy(f"{run_dir}/config.yaml", bare / "config.yaml")
    with pytest.raises(CheckpointError, match=f"{bare}/checkpoints/best"):
        recommend(str(bare), user="cust-1")
    with pytest.raises(CheckpointError, match="no config.yaml"):
        recommend(str(tmp_path / "nowhere"), user="cust-1")


def test_cli_prints_json(run_dir):
    _domain, key_to_id = _target(run_dir)
    keys = sorted(key_to_id)[:2]
    result = CliRunner().invoke(main, ["recommend", run_dir, "--history", f"{keys[0]} {keys[1]} bogus", "-k", "3"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["unknown_items"] == ["bogus"] and len(out["items"]) == 3

    result = CliRunner().invoke(main, ["recommend", run_dir, "--user", "cust-nobody"])
    assert result.exit_code != 0 and "cust-nobody" in result.output and "Traceback" not in result.output
