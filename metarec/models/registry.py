"""Backbone registry: name -> encoder class with the interface (emb (B,L,d), mask (B,L) bool) -> (B,L,d)."""

from __future__ import annotations

from torch import nn

from metarec.config import ModelConfig


def build_encoder(cfg: ModelConfig) -> nn.Module:
    if cfg.backbone == "lru":
        from metarec.models.lru import LRUEncoder as cls
    elif cfg.backbone == "sasrec":
        from metarec.models.sasrec import SASRecEncoder as cls
    elif cfg.backbone == "gru4rec":
        from metarec.models.gru4rec import GRU4RecEncoder as cls
    else:  # pragma: no cover - config validation rejects this first
        raise ValueError(f"unknown backbone {cfg.backbone!r}")
    return cls(cfg)
