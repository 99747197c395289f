"""Multi-head vector quantization onto the target table (docs/design.md §3)."""

from __future__ import annotations

import pytest
import torch
from meta_toy import toy_config, toy_setup

from metarec.objective import domain_loss
from metarec.vq import gather_codes, nearest_codes, quantize


def test_target_item_quantizes_to_itself_with_zero_vq_loss():
    torch.manual_seed(0)
    codebook = torch.randn(30, 8)
    idx = torch.tensor([0, 5, 29, 5, 17])
    z_st, z_q, loss = quantize(codebook[idx], codebook, heads=4)
    assert torch.equal(nearest_codes(codebook[idx], codebook, heads=4), idx[:, None].expand(-1, 4))
    assert torch.equal(z_q, codebook[idx])
    assert torch.equal(z_st, codebook[idx])
    assert torch.equal(loss, torch.zeros(5))


def test_target_domain_loss_has_no_vq_term_and_source_has_one():
    cfg = toy_config(model={"dropout": 0.0})
    model, ctx = toy_setup(cfg)
    params = dict(model.named_parameters())
    target = domain_loss(model, params, "t", *ctx.windows["t"].batch(range(8)), target="t", vq_heads=2)
    source = domain_loss(model, params, "a", *ctx.windows["a"].batch(range(8)), target="t", vq_heads=2)
    assert float(target.vq) == 0.0 and torch.equal(target.total, target.rec)
    assert float(source.vq.detach()) > 0.0
    assert torch.allclose(source.total, source.rec + source.vq)


def test_straight_through_feeds_source_and_vq_loss_feeds_codebook():
    torch.manual_seed(1)
    codebook = torch.randn(10, 6, requires_grad=True)
    z_e = torch.randn(4, 6, requires_grad=True)
    z_st, z_q, loss = quantize(z_e, codebook, heads=2)
    assert torch.allclose(z_st, z_q)  # forward value is the quantized vector

    upstream = torch.randn(4, 6)
    g_e, g_c = torch.autograd.grad((z_st * upstream).sum(), [z_e, codebook], allow_unused=True)
    assert torch.equal(g_e, upstream)  # identity to the source embedding
    assert g_c is None  # no codebook gradient through the straight-through path

    g_e, g_c = torch.autograd.grad(loss.sum(), [z_e, codebook])
    diff = (z_q - z_e).detach()
    assert torch.allclose(g_e, -2 * diff)  # commitment term pulls z_e towards z_q
    codes = nearest_codes(z_e, codebook, heads=2)
    expected = torch.zeros(10, 2, 3)
    for row in range(4):
        for h in range(2):
            expected[codes[row, h], h] += 2 * diff[row].reshape(2, 3)[h]
    assert torch.allclose(g_c, expected.reshape(10, 6))  # codebook pulled towards z_e
    assert g_c.abs().sum() > 0


def test_gradients_reach_source_table_and_target_codebook_in_domain_loss():
    cfg = toy_config(model={"dropout": 0.0})
    model, ctx = toy_setup(cfg)
    params = dict(model.named_parameters())
    parts = domain_loss(model, params, "a", *ctx.windows["a"].batch(range(8)), target="t", vq_heads=2)
    g_src, g_tgt, g_other = torch.autograd.grad(parts.total, [params["items.a"], params["items.t"], params["items.b"]], allow_unused=True, retain_graph=True)
    assert g_src.abs().sum() > 0
    assert g_tgt.abs().sum() > 0
    assert g_other is None
    g_tgt_vq_only = torch.autograd.grad(parts.vq, params["items.t"])[0]
    assert torch.allclose(g_tgt, g_tgt_vq_only)  # the codebook learns through L_vq only


def test_multi_head_maps_to_a_combination_no_target_item_has():
    codebook = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    z = torch.tensor([[1.0, 0.1, 1.0, 0.1]])
    codes = nearest_codes(z, codebook, heads=2)
    assert codes.tolist() == [[0, 1]]
    z_q = gather_codes(codebook, codes)
    assert torch.equal(z_q, torch.tensor([[1.0, 0.0, 1.0, 0.0]]))
    assert not any(torch.equal(z_q[0], row) for row in codebook)
    # with one head the same vector can only become an existing row
    single = gather_codes(codebook, nearest_codes(z, codebook, heads=1))
    assert any(torch.equal(single[0], row) for row in codebook)


def test_random_sources_use_mixed_codes_with_several_heads():
    torch.manual_seed(2)
    codebook = torch.randn(50, 16)
    _, z_q, _ = quantize(torch.randn(200, 16), codebook, heads=4)
    mixed = [not any(torch.equal(q, row) for row in codebook) for q in z_q]
    assert sum(mixed) > 100


@pytest.mark.parametrize("heads", [1, 2, 4])
def test_chunked_nearest_codes_equals_unchunked(heads):
    torch.manual_seed(3)
    z, codebook = torch.randn(37, 8), torch.randn(23, 8)
    full = nearest_codes(z, codebook, heads, chunk_size=4096)
    for chunk in (1, 5, 36):
        assert torch.equal(nearest_codes(z, codebook, heads, chunk_size=chunk), full)
    # and equals a direct per-head cosine argmax
    w = 8 // heads
    for h in range(heads):
        zs, cs = z[:, h * w : (h + 1) * w], codebook[:, h * w : (h + 1) * w]
        cos = torch.nn.functional.cosine_similarity(zs[:, None], cs[None], dim=-1)
        assert torch.equal(full[:, h], cos.argmax(-1))


def test_heads_must_divide_width():
    with pytest.raises(ValueError, match="heads=3"):
        nearest_codes(torch.randn(2, 8), torch.randn(4, 8), heads=3)


def test_nearest_codes_picks_the_first_of_tied_codes_across_column_groups():
    # duplicated codebook rows tie exactly; the fast path's grouped argmax (groups of
    # 64 columns) must return the first, like argmax, also when the copies lie in
    # different groups and the first copy is not in the first group
    torch.manual_seed(0)
    codebook = torch.randn(300, 8)
    for first, second in ((70, 71), (70, 250), (3, 130), (299, 299)):
        cb = codebook.clone()
        cb[second] = cb[first]
        z = cb[[first, second]] * 2.0  # cosine 1 with both copies
        codes = nearest_codes(z, cb, heads=1)
        assert codes[:, 0].tolist() == [min(first, second)] * 2
    from metarec.vq import _grouped_argmax

    sims = torch.randn(5, 192)
    sims[:, 100] = sims[:, 10] = 9.0
    assert _grouped_argmax(sims, 64).tolist() == sims.argmax(dim=1).tolist() == [10] * 5
