"""Fast paths (metarec.fastpath) against the reference paths: same losses, gradients,
meta gradients (within 1e-5, float32) and metrics; fixed-seed determinism on CPU.

No timing here: speed is measured by benchmarks/speed.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from meta_toy import toy_config, toy_sampler, toy_setup
from metarec import fastpath
from metarec.config import ModelConfig, config_from_dict
from metarec.eval import evaluate, rank_of_targets
from metarec.meta.run_task import run_task
from metarec.models.lru import LRUEncoder, lru_scan, lru_scan_complex
from metarec.objective import domain_loss, linear_cross_entropy
from metarec.vq import nearest_codes

TOL = 1e-5
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]  # + CUDA where there is a GPU


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    a, b = a.detach(), b.detach()
    """|a - b| <= tol * max(1, |b|max): absolute for O(1) values, relative for large ones."""
    scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
    assert float((a - b).abs().max()) <= tol * scale if a.numel() else True


def test_complex_scan_equals_real_scan():
    torch.manual_seed(0)
    lam = torch.polar(torch.rand(16) * 0.2 + 0.79, torch.rand(16) * 6.28)
    u = torch.randn(3, 37, 16, dtype=torch.cfloat)
    x = lru_scan_complex(lam, u)
    x_re, x_im = lru_scan(lam.real, lam.imag, u.real, u.imag)
    _close(x.real, x_re)
    _close(x.imag, x_im)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reverse", [False, True])
def test_complex_scan_closed_form_gradients_pass_gradcheck_to_second_order(reverse, device):
    from metarec.models.lru import _ComplexScan

    gen = torch.Generator().manual_seed(0)
    lam = torch.polar(torch.rand(5, generator=gen, dtype=torch.float64) * 0.3 + 0.6, torch.rand(5, generator=gen, dtype=torch.float64) * 6.28)
    u = torch.randn(2, 9, 5, generator=gen, dtype=torch.complex128)
    inputs = (lam.to(device).requires_grad_(), u.to(device).requires_grad_())
    fn = lambda l, v: _ComplexScan.apply(l, v, reverse)  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("length", [1, 13, 64])
def test_lru_encoder_fast_equals_reference_to_second_order(length, device):
    torch.manual_seed(0)
    enc = LRUEncoder(ModelConfig(backbone="lru", hidden=16, blocks=2, dropout=0.2)).train().to(device)
    emb = torch.randn(4, length, 16, device=device, requires_grad=True)
    mask = torch.ones(4, length, dtype=torch.bool, device=device)
    mask[0, : length // 2] = False
    mask[1, : length - 1] = False
    params = [emb, *enc.parameters()]

    def run(reference: bool):
        with fastpath.reference_paths(reference):
            torch.manual_seed(1)  # same dropout masks
            out = enc(emb, mask)
            grads = torch.autograd.grad((out * torch.linspace(-1, 1, 16, device=device)).sum(), params, create_graph=True, allow_unused=True, materialize_grads=True)
            second = torch.autograd.grad(sum((g**2).sum() for g in grads), params, allow_unused=True, materialize_grads=True)
        return [out, *grads, *second]

    for fast, ref in zip(run(False), run(True)):
        _close(fast, ref)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_cross_entropy_equals_reference_and_refuses_double_backward(device, monkeypatch):
    from metarec import objective

    for name in ("_CE_BLOCK_ELEMENTS", "_CE_BLOCK_ELEMENTS_GPU"):  # 64-row blocks: 5 for 300 rows, the last partial
        monkeypatch.setattr(objective, name, 64 * 1500)
    torch.manual_seed(0)
    h = torch.randn(300, 8, device=device, requires_grad=True)
    w = torch.randn(1500, 8, device=device, requires_grad=True)
    b = torch.randn(1500, device=device, requires_grad=True)
    y = torch.randint(0, 1500, (300,), device=device)
    fused = linear_cross_entropy(h, w, b, y, fused=True)
    ref = linear_cross_entropy(h, w, b, y, fused=False)
    _close(fused, ref)
    for gf, gr in zip(torch.autograd.grad(fused, [h, w, b]), torch.autograd.grad(ref, [h, w, b])):
        _close(gf, gr)
    g = torch.autograd.grad(linear_cross_entropy(h, w, b, y, fused=True), [h], create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(g.sum(), [w])


@pytest.mark.parametrize("domain,negatives", [("t", 0), ("a", 0), ("a", 7)])
def test_domain_loss_fast_equals_reference(domain, negatives):
    cfg = toy_config(model={"hidden": 8, "dropout": 0.1})
    model, ctx = toy_setup(cfg, backbone=True)
    inputs, labels = ctx.windows[domain].batch(np.arange(8))
    params = dict(model.named_parameters())

    def run(reference: bool):
        with fastpath.reference_paths(reference):
            torch.manual_seed(3)
            parts = domain_loss(model, params, domain, inputs, labels, target="t", vq_heads=2, negatives=negatives, fused_ce=True)
            grads = torch.autograd.grad(parts.total, list(params.values()), allow_unused=True)
        return parts, grads

    (fast, g_fast), (ref, g_ref) = run(False), run(True)
    _close(fast.total, ref.total)
    _close(fast.vq, ref.vq)
    for a, b in zip(g_fast, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradients_fast_equal_reference(first_order):
    cfg = toy_config(meta={"first_order": first_order})
    model, ctx = toy_setup(cfg, backbone=True)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    for spec in toy_sampler(ctx).sample(0):
        fast = run_task(params, spec, ctx)
        with fastpath.reference_paths():
            ref = run_task(params, spec, ctx)
        assert fast.touched == ref.touched
        assert fast.meta_grad.keys() == ref.meta_grad.keys()
        for name in ref.meta_grad:
            _close(fast.meta_grad[name], ref.meta_grad[name])
        for name in ref.source_delta:
            _close(fast.source_delta[name], ref.source_delta[name])
        for key in ("source_loss", "vq_loss", "target_loss"):
            assert fast.stats[key] == pytest.approx(ref.stats[key], abs=TOL, rel=TOL)
        for name in ref.sims:
            assert fast.sims[name] == pytest.approx(ref.sims[name], abs=1e-4)


def _train_config(root: str, method: str) -> dict:
    raw = {
        "seed": 3,
        "data": {"root": root, "target": "target", "sources": [] if method == "target_only" else ["src-a", "src-b"], "max_len": 8},
        "model": {"backbone": "lru", "hidden": 8, "blocks": 2, "dropout": 0.2},
        "train": {"batch_size": 16, "lr": 1e-2, "max_steps": 3, "progress": False, "grad_clip": 1.0},
        "vq": {"heads": 2},
        "meta": {"tasks_per_iter": 2, "enabled": method != "joint"},
    }
    return raw


def _steps(root: str, out: str, method: str, reference: bool, steps: int = 2):
    from metarec.train import Trainer

    torch.manual_seed(99)
    trainer = Trainer.from_config(config_from_dict(_train_config(root, method)), out)
    with fastpath.reference_paths(reference):
        infos = [trainer.step(i) for i in range(steps)]
    return infos, {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("method", ["target_only", "joint", "metarec"])
def test_train_steps_fast_equal_reference_and_are_deterministic(tiny_domains, tmp_path, method):
    fast, p_fast = _steps(tiny_domains, str(tmp_path / "fast"), method, reference=False)
    again, p_again = _steps(tiny_domains, str(tmp_path / "again"), method, reference=False)
    ref, p_ref = _steps(tiny_domains, str(tmp_path / "ref"), method, reference=True)
    timeless = lambda infos: [{k: v for k, v in i.items() if k != "task_seconds"} for i in infos]  # noqa: E731
    assert timeless(fast) == timeless(again)  # fixed seed: bit-identical on CPU
    assert all(torch.equal(p_fast[n], p_again[n]) for n in p_fast)
    loss_key = "loss" if method != "metarec" else "target_loss"
    for a, b in zip(fast, ref):
        assert a[loss_key] == pytest.approx(b[loss_key], abs=TOL, rel=TOL)
    for name in p_ref:  # two AdamW steps of lr 1e-2 from the same start
        _close(p_fast[name], p_ref[name], 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_nearest_codes_fast_equals_reference(device):
    torch.manual_seed(0)
    z, codebook = torch.randn(300, 16, device=device), torch.randn(5000, 16, device=device)
    for heads in (1, 4):
        fast = nearest_codes(z, codebook, heads, chunk_size=100)
        with fastpath.reference_paths():
            ref = nearest_codes(z, codebook, heads, chunk_size=100)
        assert torch.equal(fast, ref)


def test_rank_overwrite_equals_mask_path_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (50, 30), generator=gen).float()  # many ties
    targets = torch.randint(1, 30, (50,), generator=gen)
    window = torch.randint(0, 30, (50, 6), generator=gen)
    for exclude in (None, window):
        want = rank_of_targets(scores, targets, exclude)
        got = rank_of_targets(scores.clone(), targets, exclude, overwrite=True)
        assert torch.equal(got, want)


def test_length_buckets_give_the_same_metrics():
    cfg = toy_config(model={"hidden": 8, "dropout": 0.1})
    model, ctx = toy_setup(cfg, backbone=True)
    model.eval()
    params = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    histories = [rng.integers(1, 13, size=rng.integers(1, 12)) for _ in range(70)]
    targets = rng.integers(1, 13, size=70)

    from metarec.objective import last_position_scores

    def score_fn(inputs):
        return last_position_scores(model, params, "t", inputs)

    plain = evaluate(score_fn, histories, targets, 6, batch_size=16)
    bucketed = evaluate(score_fn, histories, targets, 6, batch_size=16, length_buckets=True)
    assert plain.keys() == bucketed.keys()
    for key in plain:
        assert bucketed[key] == pytest.approx(plain[key], abs=1e-9), key


def test_reference_paths_restores_the_switch():
    assert fastpath.enabled()
    with fastpath.reference_paths():
        assert not fastpath.enabled()
        with fastpath.reference_paths(False):
            assert fastpath.enabled()
        assert not fastpath.enabled()
    assert fastpath.enabled()
