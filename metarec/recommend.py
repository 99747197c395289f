"""`metarec recommend`: top-k target items for a known user or an ad-hoc history.

Only the target domain is needed to serve: the model built here is a *target-only*
`Recommender` (the shared `encoder.*` plus `items.<target>`, `bias.<target>`), and only
those tensors are restored from the run's best checkpoint. The source tables the
checkpoint also holds are never materialised as parameters and no source domain is
read, so serving costs the target's size, not the sources'.

Scores are the model's full-ranking scores after the last `data.max_len` history items
(`last_position_scores`, docs/design.md §2); padding and every item of the history are excluded
(docs/design.md §5 excludes the input window; here the whole history, since a user rarely wants
to be recommended what they already have).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from metarec.config import Config
from metarec.data.batches import left_pad
from metarec.data.domain import Domain, domain_sha256, load_item_map
from metarec.errors import DataError, MetaRecError, NonFiniteError, quote
from metarec.models.recommender import Recommender
from metarec.objective import last_position_scores
from metarec.run_dir import RunDir


def load_target_model(run_dir: str, cfg: Config, n_items: int) -> Recommender:
    """A target-only Recommender (eval mode, CPU) holding the best checkpoint's shared and target tensors."""
    run = RunDir(run_dir)
    model = Recommender({cfg.data.target: n_items}, cfg.model)
    run.restore_best(model, subset=True, data={cfg.data.target: domain_sha256(cfg.data.root, cfg.data.target)})
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"{run.best_uri}: non-finite weights in tensor {name!r}; the checkpoint cannot serve")
    return model.eval()


def user_sequence(domain: Domain, user: str) -> np.ndarray:
    """The full chronological item-ID sequence of `user` in a prepared domain."""
    try:
        row = domain.users.index(user)
    except ValueError:
        raise DataError(f"user {quote(user)} is not in the target domain {domain.name!r}") from None
    return domain.sequences[row]


def map_history(keys: list[str], key_to_id: dict[str, int]) -> tuple[list[int], list[str]]:
    """(dense IDs of the known keys in order, the unknown keys in order)."""
    known = [key_to_id[k] for k in keys if k in key_to_id]
    unknown = [k for k in keys if k not in key_to_id]
    return known, unknown


@torch.no_grad()
def top_k_items(model: Recommender, domain: str, history: np.ndarray, max_len: int, k: int) -> list[tuple[int, float]]:
    """The k best-scoring (dense ID, score) pairs after `history`, best first; padding and history items excluded."""
    params = dict(model.named_parameters())
    inputs = torch.from_numpy(left_pad([history], max_len))
    scores = last_position_scores(model, params, domain, inputs)[0]
    scores[0] = float("-inf")
    scores[torch.tensor(np.asarray(history), dtype=torch.long)] = float("-inf")
    n_candidates = int(torch.isfinite(scores).sum())
    values, ids = torch.topk(scores, min(k, n_candidates))
    return [(int(i), float(v)) for i, v in zip(ids, values)]


def recommend(run_dir: str, *, user: str | None = None, history: list[str] | None = None, k: int = 10) -> dict[str, Any]:
    """Top-k target items for `user` (a user key of the prepared target domain) or for `history`
    (original item keys, oldest first), from RUN_DIR's best checkpoint.

    Returns {"user" | "history": ..., "target": domain name, "k": k,
    "items": [{"item": original key, "id": dense ID, "score": float}, ...] (distinct, best
    first; fewer than k only if the domain has fewer unseen items), "unknown_items": history
    keys the target domain does not know (ignored for scoring)}.
    """
    if (user is None) == (history is None):
        raise MetaRecError("give exactly one of a user or a history of item keys")
    if history is not None and not history:
        raise MetaRecError('the history is empty: give item keys, oldest first, e.g. --history "i1 i2 i3"')
    if k < 1:
        raise MetaRecError(f"k must be >= 1, got {k}")
    run_dir = run_dir.rstrip("/")
    cfg = RunDir(run_dir).read_config()
    root, target = cfg.data.root, cfg.data.target
    if cfg.data.target_users and cfg.data.subsample_items == "compact":
        raise MetaRecError(f"{run_dir}: trained with data.subsample_items=compact (a benchmark protocol); its item IDs are not the domain's, so it cannot recommend")
    key_to_id = load_item_map(root, target)
    id_to_key = {i: key for key, i in key_to_id.items()}
    result: dict[str, Any]
    if user is not None:
        ids = user_sequence(Domain.load(root, target), user)
        unknown: list[str] = []
        result = {"user": user}
    else:
        known, unknown = map_history(history, key_to_id)
        if not known:
            raise MetaRecError(f"none of the history items is known to the target domain {target!r}: {quote(history)}")
        ids = np.asarray(known, dtype=np.int64)
        result = {"history": list(history)}
    model = load_target_model(run_dir, cfg, n_items=len(key_to_id))
    ranked = top_k_items(model, target, ids, cfg.data.max_len, k)
    result.update(
        target=target,
        k=k,
        items=[{"item": id_to_key[i], "id": i, "score": s} for i, s in ranked],
        unknown_items=unknown,
    )
    return result
