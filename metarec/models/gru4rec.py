"""GRU4Rec encoder (Hidasi et al., ICLR 2016; the RecBole-style next-item variant).

LayerNorm(emb) -> Dropout -> GRU (cfg.blocks layers, dropout between layers) ->
Dropout -> Linear(d, d) -> LayerNorm.

Left padding: a GRU fed zeros does not keep a zero state (its biases move it), so each
row is rotated to put its real items first (padding trailing), run from h₀ = 0, and
rotated back. A GRU is causal, so trailing padding never reaches a real position, and
the state at a real position depends only on the real items up to it. The mask must be
left-padded (all real items after all padding), as the data pipeline produces.

Second order: cuDNN's GRU has no double backward. On CUDA with autograd on, the GRU
runs with cuDNN disabled, i.e. PyTorch's fused native cells, whose backward is itself
differentiable (`_thnn_differentiable_gru_cell_backward`); under `torch.no_grad`
(evaluation) cuDNN is used. On CPU every path is twice differentiable.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from metarec.config import ModelConfig
from metarec.models.dropout import Dropout


def rotate_left(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """out[b, t] = x[b, (t + shift[b]) mod L] for x (B, L, d), shift (B,) long."""
    length = x.shape[1]
    idx = (torch.arange(length, device=x.device).unsqueeze(0) + shift.unsqueeze(1)) % length
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class GRU4RecEncoder(nn.Module):
    """f_m for `backbone: gru4rec`: (emb (B, L, d), mask (B, L) bool) -> hidden (B, L, d).

    Padding positions of the output are zero.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.hidden
        self.layer_norm = nn.LayerNorm(d)
        self.dropout = Dropout(cfg.dropout)
        self.gru = nn.GRU(d, d, num_layers=cfg.blocks, batch_first=True, dropout=cfg.dropout if cfg.blocks > 1 else 0.0)
        self.output = nn.Linear(d, d)
        self.output_norm = nn.LayerNorm(d)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.layer_norm(emb))
        pads = mask.shape[1] - mask.sum(dim=1)
        no_cudnn = x.is_cuda and torch.is_grad_enabled()
        with torch.backends.cudnn.flags(enabled=False) if no_cudnn else contextlib.nullcontext():
            states, _ = self.gru(rotate_left(x, pads))
        states = rotate_left(states, -pads)
        h = self.output_norm(self.output(self.dropout(states)))
        return h * mask.unsqueeze(-1).to(h.dtype)
