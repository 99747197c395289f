"""Training objective of one domain, as a pure function of a parameter dict.

Everything takes `params` (name -> tensor, the names of `Recommender.named_parameters`)
so the same code serves plain training, the functional inner loop of meta learning
(`torch.func.functional_call`) and evaluation.

Scores for domain d: h · O_dᵀ + bias.d, with O_d the (tied) item matrix the domain's
inputs are drawn from (DESIGN §2). For a source domain with VQ on, inputs are the
straight-through quantized rows and O_d the quantized table (`vq.source_output`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metarec.vq import quantize


@dataclass
class LossParts:
    total: torch.Tensor
    rec: torch.Tensor
    vq: torch.Tensor


def encoder_params(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("encoder.") :]: v for k, v in params.items() if k.startswith("encoder.")}


def encode(model, params: dict[str, torch.Tensor], emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run the shared encoder f_m with the given parameters: (B, L, d) -> (B, L, d)."""
    return functional_call(model.encoder, encoder_params(params), (emb, mask))


def _lookup(sorted_ids: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.searchsorted(sorted_ids, ids)


def domain_loss(
    model,
    params: dict[str, torch.Tensor],
    domain: str,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    target: str,
    vq_enabled: bool = True,
    vq_heads: int = 4,
    vq_source_output: str = "quantized",
    vq_weight: float = 1.0,
    vq_chunk_size: int = 4096,
    negatives: int = 0,
    generator: torch.Generator | None = None,
) -> LossParts:
    """Cross-entropy at every non-padding position (+ weighted L_vq for a quantized source).

    inputs, labels: (B, L) item ids, 0 = padding; labels[b, t] is the item after inputs[b, :t+1].
    negatives > 0: sampled softmax over the batch's positives plus `negatives` uniform
    negatives (DESIGN §2), instead of all K_d items.
    """
    table = params[f"items.{domain}"]
    bias = params[f"bias.{domain}"]
    n_items = table.shape[0] - 1
    mask = inputs > 0
    pos = labels > 0
    quantized = vq_enabled and domain != target

    if negatives > 0:
        neg = torch.randint(1, n_items + 1, (negatives,), device=inputs.device, generator=generator)
        out_ids = torch.unique(torch.cat([labels[pos], neg]))
    else:
        out_ids = torch.arange(1, n_items + 1, device=inputs.device)

    zero = table.new_zeros(())
    if quantized:
        needed = torch.unique(torch.cat([inputs[mask], out_ids]))
        codebook = params[f"items.{target}"][1:]
        z_st, _z_q, loss_rows = quantize(table[needed], codebook, vq_heads, vq_chunk_size)
        in_idx = _lookup(needed, inputs.clamp(min=1))
        emb = z_st[in_idx]
        loss_vq = loss_rows[in_idx[mask]].mean()
        out_idx = _lookup(needed, out_ids)
        out_matrix = z_st[out_idx] if vq_source_output == "quantized" else table[out_ids]
    else:
        emb = table[inputs]
        loss_vq = zero
        out_matrix = table[out_ids]

    emb = emb * mask.unsqueeze(-1).to(emb.dtype)
    hidden = encode(model, params, emb, mask)
    h = hidden[pos]  # (N, d)
    logits = h @ out_matrix.T + bias[out_ids]
    label_idx = _lookup(out_ids, labels[pos])
    rec = F.cross_entropy(logits, label_idx)
    total = rec + vq_weight * loss_vq if quantized else rec
    return LossParts(total=total, rec=rec, vq=loss_vq)


def last_position_scores(model, params: dict[str, torch.Tensor], domain: str, inputs: torch.Tensor) -> torch.Tensor:
    """Scores of every item of `domain` (column 0 = padding) after each left-padded sequence. (B, K+1)."""
    table = params[f"items.{domain}"]
    bias = params[f"bias.{domain}"]
    mask = inputs > 0
    emb = table[inputs] * mask.unsqueeze(-1).to(table.dtype)
    hidden = encode(model, params, emb, mask)[:, -1]
    return hidden @ table.T + bias
