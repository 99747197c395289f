"""The three backbones: shape, causality, left padding, second order, determinism, learning."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from metarec.config import ModelConfig
from metarec.models import build_encoder
from metarec.models.lru import lru_scan
from metarec.models.recommender import Recommender
from metarec.objective import domain_loss

BACKBONES = ["lru", "sasrec", "gru4rec"]
D = 16


def make_encoder(backbone: str, seed: int = 0, dropout: float = 0.1, perturb: float = 0.0):
    """An encoder; `perturb` adds noise to every parameter (biases, LayerNorm shifts included),
    so padding must be handled by the code, not by zero-initialised biases."""
    torch.manual_seed(seed)
    enc = build_encoder(ModelConfig(backbone=backbone, hidden=D, blocks=2, dropout=dropout, attn_heads=2))
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(perturb * torch.randn_like(p))
    return enc


def left_padded(lengths: list[int], length: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random embeddings (B, L, D) with zeros at the left padding, and the real-item mask."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.stack([torch.arange(length) >= length - n for n in lengths])
    emb = torch.randn(len(lengths), length, D, generator=gen) * mask.unsqueeze(-1)
    return emb, mask


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shape_finite_and_zero_padding(backbone):
    enc = make_encoder(backbone, perturb=0.1).eval()
    emb, mask = left_padded([8, 5, 1, 0], 8)  # includes an all-padding row
    out = enc(emb, mask)
    assert out.shape == (4, 8, D)
    assert torch.isfinite(out).all()
    assert (out[~mask] == 0).all()
    assert out[mask].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_causal(backbone):
    enc = make_encoder(backbone, perturb=0.1).eval()
    emb, mask = left_padded([6, 8], 8)
    t = 5
    changed = emb.clone()
    changed[:, t] += torch.randn(2, D)
    before, after = enc(emb, mask), enc(changed, mask)
    torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
    assert (after[:, t:] - before[:, t:]).abs().amax() > 1e-3


@pytest.mark.parametrize("backbone", BACKBONES)
def test_last_state_invariant_to_left_padding(backbone):
    enc = make_encoder(backbone, perturb=0.1).eval()
    emb, _ = left_padded([5], 5)
    last = []
    for extra in (0, 3, 10):
        padded = torch.cat([torch.zeros(1, extra, D), emb], dim=1)
        mask = torch.arange(5 + extra).unsqueeze(0) >= extra
        out = enc(padded, mask)
        torch.testing.assert_close(out[:, extra:], enc(emb, torch.ones(1, 5, dtype=torch.bool)), rtol=0, atol=1e-5)
        last.append(out[0, -1])
    torch.testing.assert_close(last[1], last[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(last[2], last[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_functional_call_and_double_backward(backbone):
    enc = make_encoder(backbone).train()
    params = {k: v.detach().clone().requires_grad_() for k, v in enc.named_parameters()}
    emb, mask = left_padded([7, 4, 2], 7)
    torch.manual_seed(3)
    out = functional_call(enc, params, (emb, mask))
    inner = out[mask].pow(2).mean()
    grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
    # a meta-style outer loss through the inner gradient
    outer = sum((g * g).sum() for g in grads)
    second = torch.autograd.grad(outer, list(params.values()), allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in second)
    assert sum(float(g.abs().sum()) for g in second if g is not None) > 0
    # functional_call really uses the given tensors
    shifted = {k: v.detach() + 0.1 for k, v in params.items()}
    enc.eval()
    assert not torch.allclose(functional_call(enc, shifted, (emb, mask)), enc(emb, mask))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_deterministic_given_seed(backbone):
    a, b = make_encoder(backbone, seed=5), make_encoder(backbone, seed=5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    emb, mask = left_padded([6, 3], 6)
    torch.manual_seed(7)
    out_a = a.train()(emb, mask)
    torch.manual_seed(7)
    out_b = b.train()(emb, mask)
    assert torch.equal(out_a, out_b)
    other = make_encoder(backbone, seed=6)
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), other.parameters()))


def sequential_recurrence(lam: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Reference loop x_t = λ x_{t-1} + u_t in complex128."""
    x = torch.zeros_like(u[:, 0])
    states = []
    for t in range(u.shape[1]):
        x = lam * x + u[:, t]
        states.append(x)
    return torch.stack(states, dim=1)


@pytest.mark.parametrize("length", [1, 2, 5, 8, 13, 64])
def test_lru_parallel_scan_equals_loop(length):
    gen = torch.Generator().manual_seed(length)
    n = 6
    modulus = 0.5 + 0.49 * torch.rand(n, generator=gen, dtype=torch.float64)
    phase = 6.28 * torch.rand(n, generator=gen, dtype=torch.float64)
    lam = torch.polar(modulus, phase)
    u = torch.complex(torch.randn(3, length, n, generator=gen, dtype=torch.float64), torch.randn(3, length, n, generator=gen, dtype=torch.float64))
    x_re, x_im = lru_scan(lam.real, lam.imag, u.real, u.imag)
    expected = sequential_recurrence(lam, u)
    torch.testing.assert_close(torch.complex(x_re, x_im), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_recommender_overfits_tiny_batch(backbone):
    torch.manual_seed(0)
    model = Recommender({"a": 20}, ModelConfig(backbone=backbone, hidden=D, blocks=1, dropout=0.0, attn_heads=2))
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(1, 21, (6, 9), generator=gen)
    seqs[0, :4] = 0  # left padding
    seqs[1, :7] = 0
    inputs, labels = seqs[:, :-1], seqs[:, 1:] * (seqs[:, :-1] > 0)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = domain_loss(model, params, "a", inputs, labels, target="a").total
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 2.5  # ~log(20) at init
    assert losses[-1] < 0.1 * losses[0]


def test_dropout_keeps_1_minus_p_unbiased_and_is_seeded():
    from metarec.models.dropout import Dropout, dropout_mask

    torch.manual_seed(0)
    mask = dropout_mask((400, 1000), 0.2)
    kept = mask > 0
    assert abs(float(kept.float().mean()) - 0.8) < 0.005  # 400k draws: sd 0.0006
    assert torch.allclose(mask[kept], torch.tensor(65536 / (65536 - 13107)))
    assert abs(float(mask.mean()) - 1.0) < 0.01  # E[mask] = 1
    assert abs(float(kept[:, ::2].float().mean()) - float(kept[:, 1::2].float().mean())) < 0.01  # lanes alike

    layer = Dropout(0.3)
    x = torch.randn(7, 9, requires_grad=True)
    torch.manual_seed(5)
    a = layer(x)
    torch.manual_seed(5)
    b = layer(x)
    assert torch.equal(a, b)  # same seed, same mask
    (grad,) = torch.autograd.grad((a * 2).sum(), [x])
    torch.testing.assert_close(grad, 2 * (a / x).detach())  # gradient = 2 x scaled mask
    assert torch.equal(layer.eval()(x), x)
    assert torch.equal(Dropout(0.0)(x), x)
    assert float(Dropout(1.0)(x).abs().sum()) == 0.0
    with pytest.raises(ValueError, match="dropout probability"):
        Dropout(1.5)
