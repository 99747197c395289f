"""LRURec encoder (Yue et al., WSDM 2024, "Linear Recurrent Units for Sequential Recommendation").

Per block: an LRU layer (Orvieto et al., ICML 2023, "Resurrecting Recurrent Neural
Networks for Long Sequences") followed by a position-wise feed-forward network:

    λ   = exp(-exp(ν) + i·exp(θ))              diagonal, complex, |λ| < 1
    x_t = λ ⊙ x_{t-1} + γ ⊙ (B u_t)            γ = exp(γ_log), init sqrt(1 - |λ|²)
    y_t = LayerNorm(u_t + Dropout(Re(C x_t)))  residual, as in LRURec
    out = LayerNorm(y + Dropout(W₂ Dropout(GELU(W₁ y))))   W₁: d -> 4d

The state has N = 2d complex channels (as in LRURec). Every parameter is real so the
meta-learning code (cosines, clipping, safetensors) never meets a complex tensor:
B is stored as one real `Linear(d, 2N)` giving [Re(B u); Im(B u)], and C as one real
`Linear(2N, d)` on [Re x; Im x], which equals Re(C x) for C = W[:, :N] - i·W[:, N:].

Two implementations of the recurrence compute the same values (tests compare them):
the fast path (default) permutes the rows of B and the columns of C so that B u comes
out with Re/Im interleaved, views it as a complex64 tensor without a copy and scans in
complex arithmetic (one multiply-add kernel per scan step instead of six real ones),
with the gradient in closed form (a scan of the gradient the other way, `_ComplexScan`);
the reference path (`metarec.fastpath.reference_paths()`) scans in real arithmetic and
leaves the gradient to autograd.

Padding: the recurrence input γ ⊙ (B u_t) is multiplied by the mask, so the state is
exactly zero through left padding whatever the LayerNorm/bias values are, and a real
position never sees a padding one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from metarec import fastpath
from metarec.config import ModelConfig
from metarec.models.dropout import Dropout


def complex_mul(a_re: torch.Tensor, a_im: torch.Tensor, b_re: torch.Tensor, b_im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_re + i a_im)(b_re + i b_im) in real arithmetic."""
    return a_re * b_re - a_im * b_im, a_re * b_im + a_im * b_re


def lru_scan(
    lam_re: torch.Tensor, lam_im: torch.Tensor, u_re: torch.Tensor, u_im: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear recurrence x_t = λ ⊙ x_{t-1} + u_t, x_{-1} = 0, along dim 1 of (B, L, N).

    Parallel prefix scan in ceil(log2 L) vectorised steps (Hillis–Steele form of the
    associative scan over (λ^k, x) pairs that LRURec's `lru_parallel` also computes):
    after the step with shift k, x_t holds Σ_{s=t-2k+1..t} λ^{t-s} u_s, and λ^k is
    squared for the next step. Shifts are relative to t, so extra left padding with
    u = 0 only adds exact zeros to the last positions.
    """
    x_re, x_im = u_re, u_im
    p_re, p_im = lam_re, lam_im  # λ^shift
    length = u_re.shape[1]
    shift = 1
    while shift < length:
        prev_re = F.pad(x_re[:, :-shift], (0, 0, shift, 0))
        prev_im = F.pad(x_im[:, :-shift], (0, 0, shift, 0))
        carry_re, carry_im = complex_mul(p_re, p_im, prev_re, prev_im)
        x_re, x_im = x_re + carry_re, x_im + carry_im
        p_re, p_im = complex_mul(p_re, p_im, p_re, p_im)
        shift *= 2
    return x_re, x_im


def lru_scan_complex(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """`lru_scan` in complex arithmetic: λ (N,) and u (B, L, N) complex -> x (B, L, N).

    The same Hillis–Steele steps, each one fused multiply-add written into a second
    buffer, with the gradient in closed form (`_ComplexScan`) instead of autograd
    through ~3 log2 L slices. Twice differentiable, on CPU and CUDA.
    """
    return _ComplexScan.apply(lam, u, False)


def _scan(lam: torch.Tensor, u: torch.Tensor, reverse: bool) -> torch.Tensor:
    """x_t = λ x_{t∓1} + u_t along dim 1 (reverse: from the end), no autograd graph.

    After the step with shift k, x_t holds the sum over the 2k nearest inputs on the
    scan's side of t (itself included); positions with no input at distance k keep x_t.
    """
    length = u.shape[1]
    if length == 1:
        return u.clone()
    cur, nxt = u, torch.empty_like(u)
    p = lam
    shift = 1
    while shift < length:
        if reverse:  # x_t += λ^k x_{t+k}
            nxt[:, length - shift :].copy_(cur[:, length - shift :])
            torch.addcmul(cur[:, : length - shift], p, cur[:, shift:], out=nxt[:, : length - shift])
        else:  # x_t += λ^k x_{t-k}
            nxt[:, :shift].copy_(cur[:, :shift])
            torch.addcmul(cur[:, shift:], p, cur[:, : length - shift], out=nxt[:, shift:])
        cur, nxt = nxt, (torch.empty_like(u) if cur is u else cur)
        p = p * p
        shift *= 2
    return cur


class _ComplexScan(torch.autograd.Function):
    """x = scan(λ, u) with its adjoint (PyTorch's conjugate-gradient convention):

        a_t = g_t + conj(λ) a_{t±1}      (the scan of the gradient g, the other way)
        ∂/∂u = a,   ∂/∂λ = Σ_{b,t} a_t conj(x_{t∓1})

    The backward is written with this Function and differentiable ops, so it has a
    gradient itself (second-order meta learning differentiates through it).
    """

    @staticmethod
    def forward(ctx, lam, u, reverse):
        x = _scan(lam, u, reverse)
        ctx.save_for_backward(lam, x)
        ctx.reverse = reverse
        return x

    @staticmethod
    def backward(ctx, grad_x):
        lam, x = ctx.saved_tensors
        a = _ComplexScan.apply(lam.conj(), grad_x, not ctx.reverse)
        grad_lam = None
        if ctx.needs_input_grad[0]:
            if ctx.reverse:
                grad_lam = (a[:, :-1] * x[:, 1:].conj()).sum((0, 1))
            else:
                grad_lam = (a[:, 1:] * x[:, :-1].conj()).sum((0, 1))
        return grad_lam, a, None


def _complex_ok(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.device.type in ("cpu", "cuda")


class LRULayer(nn.Module):
    """One linear recurrent unit with residual, dropout and LayerNorm (LRURec `LRULayer`)."""

    def __init__(self, d: int, dropout: float, r_min: float = 0.8, r_max: float = 0.99, max_phase: float = 2 * math.pi):
        super().__init__()
        n = 2 * d
        # Ring init (Orvieto et al., Lemma 3.2): |λ|² ~ U[r_min², r_max²], arg λ ~ U[0, max_phase].
        u1, u2 = torch.rand(n), torch.rand(n).clamp(min=1e-4)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        theta_log = torch.log(max_phase * u2)
        modulus = torch.exp(-torch.exp(nu_log))
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(theta_log)
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - modulus**2)))
        self.in_proj = nn.Linear(d, 2 * n)  # [Re B; Im B]
        self.out_proj = nn.Linear(2 * n, d)  # [Re C, -Im C]
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        modulus = torch.exp(-torch.exp(self.nu_log))
        phase = torch.exp(self.theta_log)
        lam_re, lam_im = modulus * torch.cos(phase), modulus * torch.sin(phase)
        if fastpath.enabled() and _complex_ok(u):
            y = self._recurrence_complex(u, mask, lam_re, lam_im)
        else:
            bu = self.in_proj(u) * (torch.exp(self.gamma_log).repeat(2) * mask.unsqueeze(-1).to(u.dtype))
            bu_re, bu_im = bu.chunk(2, dim=-1)
            x_re, x_im = lru_scan(lam_re, lam_im, bu_re, bu_im)
            y = self.out_proj(torch.cat([x_re, x_im], dim=-1))
        return self.layer_norm(u + self.dropout(y))

    def _recurrence_complex(self, u: torch.Tensor, mask: torch.Tensor, lam_re: torch.Tensor, lam_im: torch.Tensor) -> torch.Tensor:
        """Re(C x) of the scan, with B u and x as complex64 views of interleaved real tensors."""
        n2, d = self.in_proj.weight.shape
        n = n2 // 2
        # rows [Re B; Im B] -> interleaved (Re B_0, Im B_0, Re B_1, ...), columns of C
        # likewise; γ folded into the (2N x d) weights, so only the mask meets (B, L, 2N)
        gamma = torch.exp(self.gamma_log).unsqueeze(-1)  # (N, 1)
        w_in = (self.in_proj.weight.view(2, n, d).transpose(0, 1) * gamma.unsqueeze(-1)).reshape(n2, d)
        b_in = (self.in_proj.bias.view(2, n).transpose(0, 1) * gamma).reshape(n2)
        w_out = self.out_proj.weight.view(-1, 2, n).transpose(1, 2).reshape(-1, n2)
        bu = F.linear(u, w_in, b_in) * mask.unsqueeze(-1).to(u.dtype)
        x = lru_scan_complex(torch.complex(lam_re, lam_im), torch.view_as_complex(bu.view(*u.shape[:-1], n, 2)))
        return F.linear(torch.view_as_real(x).reshape(*u.shape[:-1], n2), w_out, self.out_proj.bias)


class PositionwiseFeedForward(nn.Module):
    """LayerNorm(y + Dropout(W₂ Dropout(GELU(W₁ y)))), W₁: d -> 4d (LRURec)."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.w_1 = nn.Linear(d, 4 * d)
        self.w_2 = nn.Linear(4 * d, d)
        self.dropout = Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        inner = self.dropout(F.gelu(self.w_1(y)))
        return self.layer_norm(y + self.dropout(self.w_2(inner)))


class LRUBlock(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.lru = LRULayer(d, dropout)
        self.feed_forward = PositionwiseFeedForward(d, dropout)

    def forward(self, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.feed_forward(self.lru(u, mask))


class LRUEncoder(nn.Module):
    """f_m for `backbone: lru`: (emb (B, L, d), mask (B, L) bool) -> hidden (B, L, d).

    emb -> LayerNorm(Dropout(emb)) -> blocks; padding positions of the output are zero.
    Linear weights use LRURec's truncated normal init (std 0.02, ±2σ), biases zero.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.layer_norm = nn.LayerNorm(cfg.hidden)
        self.dropout = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(LRUBlock(cfg.hidden, cfg.dropout) for _ in range(cfg.blocks))
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
                nn.init.zeros_(module.bias)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.layer_norm(self.dropout(emb))
        for block in self.blocks:
            h = block(h, mask)
        return h * mask.unsqueeze(-1).to(h.dtype)
