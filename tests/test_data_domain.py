"""Domain loading, leave-one-out splits, subsampling, batches and the synthetic generator."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from metarec.data.batches import TrainWindows, left_pad
from metarec.data.domain import Domain, load_domains
from metarec.data.prepare import write_domain
from metarec.data.readers import SequenceTable
from metarec.data.synthetic import generate_domains, planted_structure
from metarec.errors import DataError


def hand_domain() -> Domain:
    seqs = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [2]]
    return Domain(name="hand", n_items=9, users=["a", "b", "c", "d"], sequences=[np.array(s, np.int32) for s in seqs])


def lists(arrays) -> list[list[int]]:
    return [np.asarray(a).tolist() for a in arrays]


# ------------------------------------------------------------------ leave-one-out


def test_leave_one_out_splits():
    domain = hand_domain()
    assert lists(domain.train_sequences()) == [[1, 2], [5, 6], [7], [2]]
    histories, targets = domain.eval_examples("val")
    assert lists(histories) == [[1, 2], [7]] and targets.tolist() == [3, 8] and targets.dtype == np.int64
    histories, targets = domain.eval_examples("test")
    assert lists(histories) == [[1, 2, 3], [7, 8]] and targets.tolist() == [4, 9]
    with pytest.raises(ValueError):
        domain.eval_examples("train")


def test_refit_trains_on_the_validation_item_never_on_the_test_item():
    domain = hand_domain()
    refit = lists(domain.train_sequences(include_validation=True))
    assert refit == [[1, 2, 3], [5, 6], [7, 8], [2]]
    test_histories, _ = domain.eval_examples("test")
    assert [s for s in refit if len(s) >= 2 and s[-1] in (3, 8)] == lists(test_histories)  # ends at the validation item


def test_subsample_users_is_seeded_and_keeps_order(tiny_domains):
    target = Domain.load(tiny_domains, "target")
    a, b = target.subsample_users(10, seed=3), target.subsample_users(10, seed=3)
    other = target.subsample_users(10, seed=4)
    assert a.users == b.users and lists(a.sequences) == lists(b.sequences)
    assert a.users != other.users
    positions = [target.users.index(u) for u in a.users]
    assert len(set(positions)) == 10 and positions == sorted(positions)
    assert all(np.array_equal(s, target.sequences[p]) for s, p in zip(a.sequences, positions))
    assert a.n_items == target.n_items and target.n_users == 40
    assert target.subsample_users(1000, seed=0).users == target.users


def test_subsample_compact_items_renumbers_the_items_the_users_hold():
    domain = hand_domain()
    sub = domain.subsample_users(2, seed=1, compact_items=True)
    kept = [domain.users.index(u) for u in sub.users]
    held = sorted({int(i) for k in kept for i in domain.sequences[k]})
    assert sub.n_items == len(held)
    for s, k in zip(sub.sequences, kept):  # order-preserving renumbering 1..K'
        assert s.tolist() == [held.index(int(i)) + 1 for i in domain.sequences[k]]
    assert sorted({int(i) for s in sub.sequences for i in s}) == list(range(1, sub.n_items + 1))
    assert sub.manifest["subsample"] == {"n_users": 2, "seed": 1, "compact_items": True}
    whole = domain.subsample_users(10, seed=0, compact_items=True)  # all users, still compacted
    assert whole.users == domain.users and whole.n_items == 9


def test_subsample_seed_fixes_the_target_users_across_run_seeds(tiny_domains, tmp_path):
    from metarec.config import config_from_dict
    from metarec.problem import build_problem

    def users(seed, subsample_seed):
        data = {"root": str(tiny_domains), "target": "target", "target_users": 12, "subsample_seed": subsample_seed, "subsample_items": "compact"}
        problem = build_problem(config_from_dict({"seed": seed, "data": data, "train": {"device": "cpu"}}))
        return problem.domains["target"].users, problem.model.items["target"].shape[0]

    assert users(0, 5) == users(1, 5)
    assert users(0, None)[0] != users(1, None)[0]  # default: the subsample follows the run seed
    assert users(0, 5)[1] < 1 + Domain.load(tiny_domains, "target").n_items  # compacted table


# ------------------------------------------------------------------ loading


def test_load_unprepared_domain_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError) as err:
        Domain.load(tmp_path, "missing")
    message = str(err.value)
    assert "not prepared" in message and str(tmp_path / "missing" / "manifest.json") in message
    assert "metarec prepare" in message


def test_load_detects_a_modified_data_file(tiny_domains, tmp_path):
    shutil.copy(f"{tiny_domains}/src-b/data.parquet", f"{tiny_domains}/target/data.parquet")
    with pytest.raises(DataError, match="sha256"):
        Domain.load(tiny_domains, "target")


def test_load_domains_refuses_repeats_overlaps_and_empty(tiny_domains, tmp_path):
    domains = load_domains(tiny_domains, ["src-a", "src-b", "target"])
    assert {n: d.n_users for n, d in domains.items()} == {"src-a": 120, "src-b": 80, "target": 40}
    assert all(d.n_interactions == d.manifest["n_interactions"] for d in domains.values())

    with pytest.raises(DataError, match="more than once: target"):
        load_domains(tiny_domains, ["target", "src-a", "target"])

    shutil.copytree(f"{tiny_domains}/src-a", f"{tiny_domains}/src-a-copy")
    with pytest.raises(DataError, match="overlapping domains: 'src-a' and 'src-a-copy'"):
        load_domains(tiny_domains, ["src-a", "src-a-copy"])

    empty = SequenceTable(users=[], offsets=np.zeros(1, np.int64), items=np.zeros(0, np.int32), item_keys=["x"])
    write_domain(empty, tiny_domains, "empty", source="test")
    with pytest.raises(DataError, match="'empty'.*has no users"):
        load_domains(tiny_domains, ["target", "empty"])


# ------------------------------------------------------------------ batches


def test_left_pad_keeps_the_last_items():
    seqs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9]), np.array([], np.int32)]
    out = left_pad(seqs, 3)
    assert out.dtype == np.int64
    assert out.tolist() == [[1, 2, 3], [0, 0, 4], [7, 8, 9], [0, 0, 0]]


def test_train_windows_hand_example():
    # L=3. [1..7]: windows end at 7 (example [4,5,6,7]) and 4 ([1,2,3,4]); [8,9]: end 2 ([8,9]); [10]: none.
    windows = TrainWindows([np.arange(1, 8), np.array([8, 9]), np.array([10])], max_len=3)
    assert len(windows) == 3
    inputs, labels = windows.batch(np.arange(3))
    assert inputs.dtype == torch.int64 and labels.dtype == torch.int64 and inputs.shape == (3, 3)
    pairs = sorted(zip(inputs.tolist(), labels.tolist()))
    assert pairs == [([0, 0, 8], [0, 0, 9]), ([1, 2, 3], [2, 3, 4]), ([4, 5, 6], [5, 6, 7])]


def _reference_windows(seqs, max_len):
    out = []
    for s in seqs:
        end = len(s)
        while end >= 2:
            ex = list(s[max(0, end - max_len - 1) : end])
            out.append((left_pad([np.array(ex[:-1])], max_len)[0].tolist(), left_pad([np.array(ex[1:])], max_len)[0].tolist()))
            end -= max_len
    return sorted(out)


def test_train_windows_match_reference_and_label_every_item_once():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=n) for n in rng.integers(0, 30, size=40)]
    windows = TrainWindows(seqs, max_len=5)
    inputs, labels = windows.batch(np.arange(len(windows)))
    assert sorted(zip(inputs.tolist(), labels.tolist())) == _reference_windows(seqs, 5)
    assert int((labels > 0).sum()) == sum(max(len(s) - 1, 0) for s in seqs)
    assert torch.equal(inputs > 0, labels > 0)


def test_first_item_label_adds_each_sequence_start_predicted_from_padding():
    seqs = [np.arange(1, 8), np.array([8, 9]), np.array([10, 11, 12]), np.array([13, 14, 15, 16])]
    plain = TrainWindows(seqs, max_len=3)
    first = TrainWindows(seqs, max_len=3, first_item_label=True)
    inputs, labels = first.batch(np.arange(len(first)))
    plain_inputs, plain_labels = plain.batch(np.arange(len(plain)))
    assert torch.equal(inputs, plain_inputs)  # the same windows; only labels are added
    pairs = dict(zip(map(tuple, inputs.tolist()), labels.tolist()))
    assert pairs[(0, 0, 8)] == [0, 8, 9]  # 8 predicted from an empty input
    assert pairs[(0, 10, 11)] == [10, 11, 12]
    assert pairs[(13, 14, 15)] == [14, 15, 16]  # a full window: no room before 13 (as LRURec's windows)
    assert pairs[(1, 2, 3)] == [2, 3, 4] and pairs[(4, 5, 6)] == [5, 6, 7]
    assert int((labels > 0).sum()) == int((plain_labels > 0).sum()) + 2


def test_sample_rows_is_uniform_without_replacement():
    windows = TrainWindows([np.arange(1, 40)], max_len=2)
    rows = windows.sample_rows(np.random.default_rng(1), 8)
    assert len(set(rows.tolist())) == 8 and rows.min() >= 0 and rows.max() < len(windows)
    assert np.array_equal(rows, windows.sample_rows(np.random.default_rng(1), 8))
    assert sorted(windows.sample_rows(np.random.default_rng(2), 1000).tolist()) == list(range(len(windows)))
    with pytest.raises(ValueError, match="no training windows"):
        TrainWindows([np.array([3])], max_len=4).sample_rows(np.random.default_rng(0), 2)


# ------------------------------------------------------------------ synthetic problem


def test_synthetic_is_deterministic(tmp_path):
    sizes = {"n_users": {"s": 50, "t": 20}, "n_items": {"s": 40, "t": 20}}
    a = generate_domains(tmp_path / "a", names=("s", "t"), n_concepts=4, seed=1, **sizes)
    b = generate_domains(tmp_path / "b", names=("s", "t"), n_concepts=4, seed=1, **sizes)
    c = generate_domains(tmp_path / "c", names=("s", "t"), n_concepts=4, seed=2, **sizes)
    sha = {r: [json.load(open(f"{r}/{n}/manifest.json"))["sha256"] for n in ("s", "t")] for r in (a, b, c)}
    assert sha[a] == sha[b] and sha[a][0] != sha[c][0] and sha[a][1] != sha[c][1]
    assert generate_domains(tmp_path / "a", names=("s", "t"), n_concepts=4, seed=1, **sizes) == a  # no-op


def test_synthetic_domains_share_the_planted_chain(tiny_domains):
    structure = planted_structure({"src-a": 60, "src-b": 48, "target": 32}, n_concepts=8, seed=0)
    allowed = structure.transition > 0
    chance = allowed.mean()
    for name in ("src-a", "target"):
        domain = Domain.load(tiny_domains, name)
        concept = structure.concept_of_item[name]
        pairs = np.concatenate([np.stack([s[:-1], s[1:]], axis=1) for s in domain.sequences])
        on_chain = allowed[concept[pairs[:, 0] - 1], concept[pairs[:, 1] - 1]].mean()
        assert on_chain > 0.7 and on_chain > 2.5 * chance, (name, on_chain, chance)
        assert domain.n_items == len(concept) and 0 < min(len(s) for s in domain.sequences)


def test_epoch_order_rows_visit_every_window_once_per_epoch():
    from metarec.data.batches import epoch_order_rows

    rows = np.concatenate([epoch_order_rows(10, 4, draw, seed=3) for draw in range(5)])  # 2 epochs, batches straddle them
    assert sorted(rows[:10].tolist()) == list(range(10)) and sorted(rows[10:].tolist()) == list(range(10))
    assert not np.array_equal(rows[:10], rows[10:])  # reshuffled each epoch
    assert np.array_equal(epoch_order_rows(10, 4, 3, seed=3), rows[12:16])  # a pure function of the draw
    assert not np.array_equal(epoch_order_rows(10, 4, 0, seed=4), rows[:4])
    assert sorted(epoch_order_rows(3, 8, 0, seed=0).tolist()) == [0, 1, 2]  # a batch larger than the domain
