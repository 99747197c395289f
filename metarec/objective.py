"""Training objective of one domain, as a pure function of a parameter dict.

Everything takes `params` (name -> tensor, the names of `Recommender.named_parameters`)
so the same code serves plain training, the functional inner loop of meta learning
(`torch.func.functional_call`) and evaluation.

Scores for domain d: h · O_dᵀ + bias.d, with O_d the (tied) item matrix the domain's
inputs are drawn from (docs/design.md §2). For a source domain with VQ on, inputs are the
straight-through quantized rows and O_d the quantized table (`vq.source_output`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from metarec import fastpath
from metarec.vq import quantize

# Rows of h per block of the fused cross-entropy: on CPU a (rows x K) logits block of
# ~2M floats (8 MiB) stays in the last-level cache while it is turned into its gradient;
# on a GPU blocks of ~32M floats (128 MiB) keep the kernel launches per step few.
_CE_BLOCK_ELEMENTS = 2**21
_CE_BLOCK_ELEMENTS_GPU = 2**25


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


class _LinearCrossEntropy(torch.autograd.Function):
    """mean_n CE(h_n Wᵀ + b, y_n) with its gradient computed in the forward pass.

    The logits are produced block by block of rows; while a block is in cache it is
    turned into softmax − onehot and multiplied into the gradients of h, W and b, so
    the (N x K) logits are never stored and the backward pass is three scalings.
    Once differentiable: a `create_graph=True` backward through it raises, so the
    second-order inner loop must use the reference path (`fused_ce=False`).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, labels):
        n = h.shape[0]
        need = any(ctx.needs_input_grad[:3])
        if h.device.type == "cpu":
            rows = max(64, min(1024, _CE_BLOCK_ELEMENTS // max(1, weight.shape[0])))
        else:
            rows = max(64, _CE_BLOCK_ELEMENTS_GPU // max(1, weight.shape[0]))
        grad_h = torch.empty_like(h) if need else None
        grad_w = torch.zeros_like(weight) if need else None
        grad_b = torch.zeros_like(bias) if need else None
        total = h.new_zeros(())
        for start in range(0, n, rows):
            h_blk = h[start : start + rows]
            log_probs = torch.log_softmax(torch.addmm(bias, h_blk, weight.t()), dim=1)  # one fused kernel
            idx = torch.arange(log_probs.shape[0], device=h.device)
            lab = labels[start : start + rows]
            total -= log_probs[idx, lab].sum()
            if need:
                probs = log_probs.exp_()
                probs[idx, lab] -= 1.0
                torch.mm(probs, weight, out=grad_h[start : start + rows])
                grad_w.addmm_(probs.t(), h_blk)
                grad_b += probs.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.n = n
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_out / ctx.n
        out = [None if g is None or not need else g * scale for g, need in zip((grad_h, grad_w, grad_b), ctx.needs_input_grad[:3])]
        return out[0], out[1], out[2], None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, labels: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """F.cross_entropy(h @ weight.T + bias, labels) (mean over rows).

    fused (and fast paths on): `_LinearCrossEntropy`, first-order only; otherwise the
    reference expression, which is twice differentiable.
    """
    if fused and fastpath.enabled() and torch.is_grad_enabled() and h.shape[0] > 0:
        return _LinearCrossEntropy.apply(h, weight, bias, labels)
    return F.cross_entropy(h @ weight.T + bias, labels)


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
    fused_ce: bool = False,
) -> LossParts:
    """Cross-entropy at every non-padding position (+ weighted L_vq for a quantized source):
    docs/design.md Eq. (2), (4).

    inputs, labels: (B, L) item ids, 0 = padding; labels[b, t] is the item after inputs[b, :t+1].
    negatives > 0: sampled softmax over the batch's positives plus `negatives` uniform
    negatives (docs/design.md §2), instead of all K_d items.
    fused_ce: compute the output layer's cross-entropy with `linear_cross_entropy`'s
    fused kernel; only for losses that are differentiated once (not the second-order
    inner loop). Same value and gradient up to float rounding.
    """
    table = params[f"items.{domain}"]
    bias = params[f"bias.{domain}"]
    n_items = table.shape[0] - 1
    mask = inputs > 0
    pos = labels > 0
    quantized = vq_enabled and domain != target

    if negatives > 0:
        neg = torch.randint(1, n_items + 1, (negatives,), device=inputs.device)
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
        out_matrix = table[1:] if negatives <= 0 else table[out_ids]  # full softmax: a view, not a gather

    emb = emb * mask.unsqueeze(-1).to(emb.dtype)
    hidden = encode(model, params, emb, mask)
    h = hidden[pos]  # (N, d)
    out_bias = bias[1:] if negatives <= 0 else bias[out_ids]
    label_idx = labels[pos] - 1 if negatives <= 0 else _lookup(out_ids, labels[pos])
    rec = linear_cross_entropy(h, out_matrix, out_bias, label_idx, fused=fused_ce)
    total = rec + vq_weight * loss_vq if quantized else rec
    return LossParts(total=total, rec=rec, vq=loss_vq)


def last_position_scores(model, params: dict[str, torch.Tensor], domain: str, inputs: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Scores of every item of `domain` (column 0 = padding) after each left-padded sequence. (B, K+1).

    out: a (B, K+1) buffer the fast path writes the scores into (the reference path
    allocates).
    """
    table = params[f"items.{domain}"]
    bias = params[f"bias.{domain}"]
    mask = inputs > 0
    emb = table[inputs] * mask.unsqueeze(-1).to(table.dtype)
    hidden = encode(model, params, emb, mask)[:, -1]
    if fastpath.enabled():
        return torch.addmm(bias, hidden, table.T, out=out)  # one pass over the (B, K+1) scores
    return hidden @ table.T + bias


def last_position_scorer(model, params: dict[str, torch.Tensor], domain: str, device: torch.device | str):
    """`last_position_scores` as the `score_fn` of `metarec.eval.evaluate`.

    Every chunk's scores go into one buffer, grown to the largest chunk and reused: a
    fresh (256 x 24k) block per chunk spent more time in page faults than in the
    matmul on CPU. The returned scores are that buffer's first rows, valid until the
    next call (evaluate ranks them before asking for more).
    """
    bias = params[f"bias.{domain}"]
    buffer: torch.Tensor | None = None

    def score(inputs: torch.Tensor) -> torch.Tensor:
        nonlocal buffer
        inputs = inputs.to(device)
        rows = inputs.shape[0]
        if buffer is None or buffer.shape[0] < rows:
            buffer = bias.new_empty(rows, bias.shape[0])
        return last_position_scores(model, params, domain, inputs, out=buffer[:rows])

    return score
