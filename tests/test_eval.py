"""Full-ranking evaluation: ranks, tie rule, exclusion, metrics, chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metarec.errors import NonFiniteError
from metarec.eval import evaluate, metrics_from_ranks, rank_of_targets

N_ITEMS = 30


def reference_rank(scores: np.ndarray, target: int, window: np.ndarray | None) -> int:
    """Independent rank: sort candidates by (-score, is_target) and find the target.

    Placing the target after every equal-scored candidate is the pessimistic tie rule.
    """
    excluded = {0} | (set(window.tolist()) if window is not None else set())
    candidates = np.array([j for j in range(1, scores.size) if j == target or j not in excluded])
    order = np.lexsort((candidates == target, -scores[candidates]))
    return int(np.flatnonzero(candidates[order] == target)[0]) + 1


def reference_metrics(ranks: list[int]) -> dict[str, float]:
    out = {}
    for k in (5, 10, 20):
        out[f"NDCG@{k}"] = sum(1 / math.log2(r + 1) for r in ranks if r <= k) / len(ranks)
    for k in (5, 10, 20):
        out[f"Recall@{k}"] = sum(r <= k for r in ranks) / len(ranks)
    out["MRR"] = sum(1 / r for r in ranks) / len(ranks)
    return out


def random_case(seed: int, users: int = 40, max_len: int = 6):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(users, N_ITEMS + 1)).astype(np.float32)  # few values: many ties
    histories = [rng.integers(1, N_ITEMS + 1, size=rng.integers(1, 10)) for _ in range(users)]
    targets = rng.integers(1, N_ITEMS + 1, size=users)
    for u in range(0, users, 5):  # some targets already in the window
        histories[u][-1] = targets[u]
    return scores, histories, targets


def windows(histories, max_len):
    out = np.zeros((len(histories), max_len), dtype=np.int64)
    for i, h in enumerate(histories):
        tail = h[-max_len:]
        out[i, max_len - len(tail) :] = tail
    return out


@pytest.mark.parametrize("exclude_history", [True, False])
def test_ranks_match_independent_sort_with_ties(exclude_history):
    scores, histories, targets = random_case(0)
    win = windows(histories, 6)
    ranks = rank_of_targets(torch.from_numpy(scores), torch.from_numpy(targets), torch.from_numpy(win) if exclude_history else None)
    expected = [reference_rank(scores[u], targets[u], win[u] if exclude_history else None) for u in range(len(targets))]
    assert ranks.dtype == torch.long
    assert ranks.tolist() == expected


def test_constant_scores_get_worst_rank():
    scores = torch.zeros(3, N_ITEMS + 1)
    ranks = rank_of_targets(scores, torch.tensor([1, 7, N_ITEMS]), None)
    assert ranks.tolist() == [N_ITEMS] * 3
    assert metrics_from_ranks(ranks)["NDCG@20"] == 0.0


def test_padding_and_window_excluded_but_target_kept():
    scores = torch.zeros(1, N_ITEMS + 1)
    scores[0, 0] = 100.0  # padding column scores highest
    scores[0, [3, 4]] = 50.0  # window items
    scores[0, 9] = 10.0  # target, also in the window
    scores[0, 12] = 20.0  # one other item above the target
    window = torch.tensor([[0, 3, 4, 9]])
    assert rank_of_targets(scores, torch.tensor([9]), window).item() == 2
    # Without exclusion the window items count; the padding column never does.
    assert rank_of_targets(scores, torch.tensor([9]), None).item() == 4


def test_nan_scores_raise():
    scores = torch.zeros(2, N_ITEMS + 1)
    scores[1, 5] = float("nan")
    with pytest.raises(NonFiniteError):
        rank_of_targets(scores, torch.tensor([1, 2]), None)


def test_metrics_match_reference():
    ranks = [1, 2, 3, 5, 6, 10, 11, 20, 21, 300]
    got = metrics_from_ranks(torch.tensor(ranks))
    want = reference_metrics(ranks)
    assert list(got) == list(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key


def _table_score_fn(scores: np.ndarray):
    """score_fn returning the next rows of a fixed score table, call after call (users in order)."""
    table = torch.from_numpy(scores)
    calls = []

    def score_fn(inputs: torch.Tensor) -> torch.Tensor:
        start = sum(calls)
        calls.append(inputs.shape[0])
        return table[start : start + inputs.shape[0]]

    return score_fn, calls


@pytest.mark.parametrize("exclude_history", [True, False])
def test_evaluate_equals_reference_and_is_chunk_invariant(exclude_history):
    scores, histories, targets = random_case(1, users=23)
    win = windows(histories, 6)
    expected_ranks = [reference_rank(scores[u], targets[u], win[u] if exclude_history else None) for u in range(len(targets))]
    expected = reference_metrics(expected_ranks)
    results = []
    for batch_size in (1, 7, len(targets)):
        score_fn, calls = _table_score_fn(scores)
        result = evaluate(score_fn, histories, targets, 6, batch_size=batch_size, exclude_history=exclude_history)
        assert max(calls) <= batch_size
        results.append(result)
    assert results[0] == results[1] == results[2]
    assert results[0]["n_users"] == len(targets)
    for key, value in expected.items():
        assert results[0][key] == pytest.approx(value, abs=1e-12), key


def test_evaluate_passes_left_padded_last_window():
    seen = []

    def score_fn(inputs):
        seen.append(inputs.clone())
        return torch.zeros(inputs.shape[0], N_ITEMS + 1)

    evaluate(score_fn, [np.array([1, 2, 3, 4, 5]), np.array([7])], np.array([1, 2]), 3)
    assert seen[0].tolist() == [[3, 4, 5], [0, 0, 7]]
    assert seen[0].dtype == torch.long
