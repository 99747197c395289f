"""Multi-head vector quantization onto the target item table (docs/design.md §3; MetaRec §III-B).

The codebook is the target table `items.<target>` rows 1..K_t viewed as H heads of
width d/H; no parameters of its own. A source embedding is split into the same H
heads and each head is replaced by the codebook row of highest cosine similarity in
that head, so with H > 1 a source item can map to a combination of target items that
no single target item has.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metarec import fastpath

_SIMS_BLOCK_ELEMENTS = 2**22
_ARGMAX_GROUP = 64


def _grouped_argmax(sims: torch.Tensor, group: int = _ARGMAX_GROUP) -> torch.Tensor:
    """`sims.argmax(dim=1)` (the first index among ties) for (R, C) with C a multiple of `group`.

    The row's maximum is found per group of columns (a vectorised max), then the first
    group holding it and the first index inside that group: the same index as argmax,
    whose CPU kernel is not vectorised and took 1.2 ms per 176 x 23,715 block (amax: 0.13).
    """
    r = sims.shape[0]
    grouped = sims.view(r, -1, group)
    best_group = grouped.amax(dim=2).argmax(dim=1)
    within = grouped[torch.arange(r, device=sims.device), best_group].argmax(dim=1)
    return best_group * group + within


@torch.no_grad()
def nearest_codes(z: torch.Tensor, codebook: torch.Tensor, heads: int, chunk_size: int = 4096) -> torch.Tensor:
    """Head-wise cosine nearest neighbour (docs/design.md Eq. (3); paper Eq. 2).

    z: (N, d) vectors, codebook: (K, d). Returns (N, H) indices into the codebook.
    Computed under no_grad in chunks of `chunk_size` rows, so memory is
    O(chunk_size x K) and never O(N x K).
    """
    n, d = z.shape
    if d % heads:
        raise ValueError(f"vq heads={heads} does not divide the embedding width {d}")
    w = d // heads
    zh = F.normalize(z.reshape(n, heads, w), dim=-1)
    ch = F.normalize(codebook.reshape(-1, heads, w), dim=-1).transpose(0, 1)  # (H, K, w)
    out = torch.empty(n, heads, dtype=torch.long, device=z.device)
    if fastpath.enabled():
        # per head, one (rows x w) @ (w x K) matmul + argmax per block of rows, the
        # block sized so its (rows x K) similarities stay cache-resident, written into
        # one buffer (a fresh 16 MiB block per matmul cost 2.8x in page faults on CPU);
        # the codebook is padded to whole column groups for `_grouped_argmax`
        k = ch.shape[1]
        k_pad = -(-k // _ARGMAX_GROUP) * _ARGMAX_GROUP
        ch_t = F.pad(ch.transpose(1, 2), (0, k_pad - k)).contiguous()  # (H, w, K_pad)
        rows = min(chunk_size, max(64, _SIMS_BLOCK_ELEMENTS // k_pad)) if z.device.type == "cpu" else chunk_size  # GPU: fewer launches
        sims = zh.new_empty(min(rows, n), k_pad)
        for h in range(heads):
            zh_h = zh[:, h]
            for start in range(0, n, rows):
                block = sims[: min(rows, n - start)]
                torch.mm(zh_h[start : start + rows], ch_t[h], out=block)
                block[:, k:] = float("-inf")  # the padding columns never win
                out[start : start + rows, h] = _grouped_argmax(block)
        return out
    for start in range(0, n, chunk_size):
        part = zh[start : start + chunk_size].transpose(0, 1)  # (H, c, w)
        sims = torch.bmm(part, ch.transpose(1, 2))  # (H, c, K)
        out[start : start + chunk_size] = sims.argmax(dim=-1).transpose(0, 1)
    return out


def gather_codes(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """z_q: concatenate, per head h, the h-th slice of codebook row codes[:, h]. (N, d)."""
    n, heads = codes.shape
    d = codebook.shape[1]
    w = d // heads
    ch = codebook.reshape(-1, heads, w)  # (K, H, w)
    head_idx = torch.arange(heads, device=codes.device).expand(n, heads)
    return ch[codes, head_idx].reshape(n, d)


def vq_loss(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """Per-row L_vq = ||z_q - sg(z_e)||^2 + ||sg(z_q) - z_e||^2 (docs/design.md Eq. (4); paper Eq. 3). Shape (N,)."""
    return ((z_q - z_e.detach()) ** 2).sum(-1) + ((z_q.detach() - z_e) ** 2).sum(-1)


def straight_through(z_e: torch.Tensor, z_q: torch.Tensor) -> torch.Tensor:
    """z_e + sg(z_q - z_e): forward value z_q, gradient to z_e (paper Eq. 2, STE)."""
    return z_e + (z_q - z_e).detach()


def quantize(z_e: torch.Tensor, codebook: torch.Tensor, heads: int, chunk_size: int = 4096):
    """Quantize rows of `z_e` onto `codebook`.

    Returns (z_st, z_q, loss_rows): the straight-through vectors the encoder sees, the
    quantized vectors (differentiable w.r.t. the codebook) and per-row L_vq.
    """
    codes = nearest_codes(z_e.detach(), codebook.detach(), heads, chunk_size)
    z_q = gather_codes(codebook, codes)
    return straight_through(z_e, z_q), z_q, vq_loss(z_e, z_q)
