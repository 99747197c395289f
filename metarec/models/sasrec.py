"""SASRec encoder (Kang & McAuley, ICDM 2018, "Self-Attentive Sequential Recommendation").

Input: LayerNorm(emb + P) -> Dropout, P a learned positional embedding counted from
the END of the window (position table rows [-L:]), so the last item always gets the
same position whatever the left padding. Blocks as in the paper (§III-C/D): pre-LN
residual sublayers x + Dropout(g(LayerNorm(x))) with g = causal multi-head
self-attention, then g = point-wise FFN ReLU(x W₁ + b₁) W₂ + b₂ (d -> d); a final
LayerNorm.

Attention is written out (softmax(QKᵀ/√d_h + mask) V) rather than through a fused
kernel so that double backward works on every device. Query t attends to real keys
s <= t, and every query may attend to itself: padding queries then have one allowed
key instead of none, so no row of the softmax is fully masked (no NaN), while real
queries never see padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarec.config import ModelConfig
from metarec.models.dropout import Dropout

MAX_POSITIONS = 512


def attention_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, L) bool real-item mask -> (B, L, L) bool, True where query t may attend to key s."""
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=mask.device).tril()
    itself = torch.eye(length, dtype=torch.bool, device=mask.device)
    return causal & (mask.unsqueeze(1) | itself)


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"attention heads {heads} do not divide hidden size {d}")
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)  # (B, H, L, L)
        logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
        weights = self.dropout(torch.softmax(logits, dim=-1))
        return self.out((weights @ v).transpose(1, 2).reshape(b, length, d))


class PointwiseFeedForward(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d, d)
        self.w_2 = nn.Linear(d, d)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(F.relu(self.w_1(x))))


class SASRecBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(d)
        self.attention = CausalSelfAttention(d, heads, dropout)
        self.ffn_norm = nn.LayerNorm(d)
        self.feed_forward = PointwiseFeedForward(d, dropout)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.attn_norm(x), allowed))
        return x + self.dropout(self.feed_forward(self.ffn_norm(x)))


class SASRecEncoder(nn.Module):
    """f_m for `backbone: sasrec`: (emb (B, L, d), mask (B, L) bool) -> hidden (B, L, d), L <= 512.

    Padding positions of the output are zero.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.position = nn.Embedding(MAX_POSITIONS, cfg.hidden)
        nn.init.trunc_normal_(self.position.weight, std=0.02, a=-0.04, b=0.04)
        self.layer_norm = nn.LayerNorm(cfg.hidden)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(cfg.hidden, cfg.attn_heads, cfg.dropout) for _ in range(cfg.blocks))
        self.final_norm = nn.LayerNorm(cfg.hidden)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        length = emb.shape[1]
        if length > MAX_POSITIONS:
            raise ValueError(f"sasrec: window length {length} exceeds the {MAX_POSITIONS} learned positions")
        keep = mask.unsqueeze(-1).to(emb.dtype)
        h = self.dropout(self.layer_norm(emb + self.position.weight[-length:])) * keep
        allowed = attention_mask(mask)
        for block in self.blocks:
            h = block(h, allowed)
        return self.final_norm(h) * keep
