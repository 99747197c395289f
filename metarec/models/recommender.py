"""The recommender f = f_m ∘ f_e (docs/design.md §2).

Parameter names the meta-learning code keys on:
- `items.<domain>`: (K_d + 1) x d item table per domain, row 0 = padding;
- `bias.<domain>`:  K_d + 1 output bias per domain;
- `encoder.*`:      the shared sequence encoder, any backbone of `metarec.models`.
"""

from __future__ import annotations

import torch
from torch import nn

from metarec.config import ModelConfig
from metarec.models.registry import build_encoder


class Recommender(nn.Module):
    def __init__(self, n_items: dict[str, int], cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.domains = list(n_items)
        self.items = nn.ParameterDict()
        self.bias = nn.ParameterDict()
        for name, k in n_items.items():
            table = torch.empty(k + 1, cfg.hidden)
            nn.init.trunc_normal_(table, std=0.02, a=-0.04, b=0.04)
            with torch.no_grad():
                table[0].zero_()
            self.items[name] = nn.Parameter(table)
            self.bias[name] = nn.Parameter(torch.zeros(k + 1))
        self.encoder = build_encoder(cfg)
