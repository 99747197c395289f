"""Sequence encoders f_m (docs/design.md §2) and the recommender that wraps them.

Every encoder maps (emb (B, L, d), mask (B, L) bool, left-padded) -> (B, L, d), causally.
"""

from metarec.models.gru4rec import GRU4RecEncoder
from metarec.models.lru import LRUEncoder
from metarec.models.recommender import Recommender
from metarec.models.registry import build_encoder
from metarec.models.sasrec import SASRecEncoder

__all__ = ["GRU4RecEncoder", "LRUEncoder", "Recommender", "SASRecEncoder", "build_encoder"]
