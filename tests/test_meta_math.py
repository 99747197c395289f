"""The math of meta transfer: meta gradient (Eq. 4–5) and per-layer rescaling (Eq. 6–8)."""

from __future__ import annotations

import math

import pytest
import torch
from meta_toy import toy_config, toy_sampler, toy_setup

from metarec.meta import (
    TaskSpec,
    check_similarity_state,
    combine,
    descent_direction,
    inner_loop,
    run_task,
    smooth_similarities,
    standardize,
    softmax_weights,
    source_loss_options,
    tensor_similarities,
)
from metarec.objective import domain_loss


# ------------------------------------------------------------------ meta gradient


def _composed_target_loss(model, ctx, spec: TaskSpec, theta: dict[str, torch.Tensor]) -> float:
    """L_tgt(θ − α∇L_src(θ) ...) evaluated numerically (no graph through the inner gradient)."""
    cfg = ctx.cfg
    src = ctx.windows[spec.source].batch(spec.source_rows)
    tgt = ctx.windows[ctx.target].batch(spec.target_rows)
    phi = {n: t.detach().clone().requires_grad_(True) for n, t in theta.items()}
    for _ in range(cfg.meta.inner_steps):
        loss = domain_loss(model, phi, spec.source, *src, target=ctx.target, **source_loss_options(cfg)).total
        grads = torch.autograd.grad(loss, list(phi.values()), allow_unused=True)
        phi = {n: p if g is None else (p - cfg.meta.inner_lr * g).detach().requires_grad_(True) for (n, p), g in zip(phi.items(), grads)}
    with torch.no_grad():
        return float(domain_loss(model, phi, ctx.target, *tgt, target=ctx.target).total)


def _directional(grad: dict[str, torch.Tensor], v: dict[str, torch.Tensor]) -> float:
    return sum(float((grad[n] * v[n]).sum()) for n in grad)


@pytest.fixture(scope="module", params=["toy", "lru", "sasrec", "gru4rec"])
def fd_setup(request):
    backbone = request.param
    cfg = toy_config(
        model={"dropout": 0.0, "backbone": "lru" if backbone == "toy" else backbone, "blocks": 1},
        vq={"enabled": False},
        meta={"inner_lr": 0.5, "inner_steps": 2, "tasks_per_iter": 1},
    )
    model, ctx = toy_setup(cfg, dtype=torch.float64, backbone=backbone != "toy")
    spec = toy_sampler(ctx).sample(0)[0]
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    return cfg, model, ctx, spec, theta


def _directions(theta, spec) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    full = [{n: torch.randn(t.shape, generator=gen, dtype=t.dtype) for n, t in theta.items()} for _ in range(2)]
    # only along the source table: the target loss reaches it through the inner gradient alone
    source_only = {n: (torch.randn(t.shape, generator=gen, dtype=t.dtype) if n == f"items.{spec.source}" else torch.zeros_like(t)) for n, t in theta.items()}
    return [*full, source_only]


def test_second_order_meta_gradient_matches_finite_differences(fd_setup):
    _, model, ctx, spec, theta = fd_setup
    result = run_task(theta, spec, ctx)
    h = 1e-5
    for v in _directions(theta, spec):
        f = {k: _composed_target_loss(model, ctx, spec, {n: theta[n] + k * h * v[n] for n in theta}) for k in (-2, -1, 1, 2)}
        fd = (f[-2] - 8 * f[-1] + 8 * f[1] - f[2]) / (12 * h)  # fourth-order central difference
        analytic = _directional(result.meta_grad, v)
        assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)
        assert abs(fd) > 1e-5


def test_first_order_meta_gradient_differs(fd_setup):
    cfg, model, ctx, spec, theta = fd_setup
    second = run_task(theta, spec, ctx)
    ctx_fo = type(ctx)(model=model, windows=ctx.windows, cfg=cfg.model_copy(update={"meta": cfg.meta.model_copy(update={"first_order": True})}), target=ctx.target)
    first = run_task(theta, spec, ctx_fo)
    source_table = f"items.{spec.source}"
    assert source_table not in first.meta_grad  # FOMAML: no signal for source-only tensors
    assert source_table in first.touched  # ... but its inner loop moved it
    assert float(second.meta_grad[source_table].abs().sum()) > 0
    v = _directions(theta, spec)[0]
    fo, so = _directional(first.meta_grad, v), _directional(second.meta_grad, v)
    assert abs(fo - so) > 1e-3 * abs(so)
    encoder = [n for n in second.meta_grad if n.startswith("encoder.") and n in first.meta_grad]
    assert encoder and any(not torch.allclose(first.meta_grad[n], second.meta_grad[n]) for n in encoder)


def test_inner_loop_is_functional_sgd():
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    unused = torch.tensor([3.0], requires_grad=True)
    phi = inner_loop(None, {"w": w, "unused": unused}, lambda m, p: (p["w"] ** 2).sum(), steps=2, lr=0.25, first_order=False)
    assert torch.allclose(phi["w"], w * 0.25)  # (1 - 2·0.25)² per coordinate
    assert phi["unused"] is unused
    assert torch.equal(w, torch.tensor([1.0, -2.0]))  # θ untouched
    (g,) = torch.autograd.grad(phi["w"].sum(), w)
    assert torch.allclose(g, torch.full((2,), 0.25))  # second order: d φ/dθ = (1-2α)²


# ------------------------------------------------------------------ rescaling


def test_tensor_similarity_is_cosine_and_zero_for_zero_tensors():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    u = torch.tensor([[1.0, 1.0], [0.0, 0.0]])

    def similarity(a, b):
        return tensor_similarities({"p": a}, {"p": b})[0].get("p", 0.0)

    assert similarity(g, u) == pytest.approx(0.5)  # flattened: 1 / (√2 · √2)
    assert similarity(g, -g) == pytest.approx(-1.0)
    assert similarity(g, torch.zeros_like(g)) == 0.0
    assert similarity(torch.zeros_like(g), u) == 0.0


def test_tensor_similarities_marks_touched_tensors():
    grads = {"shared": torch.ones(3), "target_bias": torch.ones(2), "other_table": None, "own_table": None}
    dirs = {"shared": -torch.ones(3), "target_bias": None, "other_table": None, "own_table": torch.ones(4)}
    sims, touched, _ = tensor_similarities(grads, dirs)
    assert touched == {"shared", "target_bias", "own_table"}
    assert sims == {"shared": pytest.approx(-1.0), "target_bias": 0.0, "own_table": 0.0}


def test_descent_direction_signs():
    theta, phi = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0])
    assert torch.equal(descent_direction(theta, phi, "source_descent"), theta - phi)
    assert torch.equal(descent_direction(theta, phi, "paper_literal"), phi - theta)
    with pytest.raises(ValueError):
        descent_direction(theta, phi, "sideways")


def test_softmax_weights_limits_and_stability():
    sims = {0: 0.2, 3: 0.9, 5: -0.5}
    hot = softmax_weights(sims, tau=1e6)
    assert hot.keys() == sims.keys()
    assert all(w == pytest.approx(1 / 3, abs=1e-6) for w in hot.values())
    cold = softmax_weights(sims, tau=1e-6)
    assert cold == {0: 0.0, 3: 1.0, 5: 0.0}
    mid = softmax_weights(sims, tau=0.5)
    expected = {i: math.exp(s / 0.5) for i, s in sims.items()}
    assert mid == pytest.approx({i: e / sum(expected.values()) for i, e in expected.items()})
    huge = softmax_weights({0: 1000.0, 1: 999.0}, tau=1.0)  # no overflow
    assert huge[0] == pytest.approx(1 / (1 + math.exp(-1)))
    assert softmax_weights({}, tau=1.0) == {}


def _three_tasks():
    gen = torch.Generator().manual_seed(0)
    grads = [{"w": torch.randn(4, generator=gen), "x": torch.randn(2, generator=gen)} for _ in range(3)]
    del grads[1]["x"]
    sims = [{"w": 0.2, "x": 0.1}, {"w": 0.9}, {"w": -0.5, "x": 0.7}]
    touched = [{"w", "x"}, {"w"}, {"w", "x"}]
    return grads, sims, touched


def test_combine_temperature_limits():
    grads, sims, touched = _three_tasks()
    uniform, _ = combine(grads, sims, touched, tau=1e6, enabled=True)
    assert torch.allclose(uniform["w"], sum(g["w"] for g in grads) / 3, atol=1e-6)
    assert torch.allclose(uniform["x"], (grads[0]["x"] + grads[2]["x"]) / 2, atol=1e-6)
    argmax, weights = combine(grads, sims, touched, tau=1e-6, enabled=True)
    assert torch.equal(argmax["w"], grads[1]["w"])  # task 1 is the most similar for w
    assert torch.equal(argmax["x"], grads[2]["x"])  # task 2 for x
    assert weights["w"][1] == 1.0


def test_untouched_tensor_gets_no_weight_from_a_task():
    grads, sims, touched = _three_tasks()
    grad, weights = combine(grads, sims, touched, tau=1.0, enabled=True)
    assert set(weights["x"]) == {0, 2}
    assert sum(weights["x"].values()) == pytest.approx(1.0)
    e0, e2 = math.exp(0.1), math.exp(0.7)
    assert torch.allclose(grad["x"], (e0 * grads[0]["x"] + e2 * grads[2]["x"]) / (e0 + e2))
    # a tensor no task touched gets neither weights nor a gradient
    grad, weights = combine(grads + [{}], sims + [{}], touched + [set()], tau=1.0, enabled=True)
    assert set(grad) == {"w", "x"} and all(3 not in w for w in weights.values())


def test_rescale_disabled_is_uniform_mean_over_touching_tasks():
    grads, sims, touched = _three_tasks()
    grad, weights = combine(grads, sims, touched, tau=1e-6, enabled=False)
    assert weights["w"] == {0: 1 / 3, 1: 1 / 3, 2: 1 / 3}
    assert weights["x"] == {0: 0.5, 2: 0.5}
    assert torch.allclose(grad["x"], (grads[0]["x"] + grads[2]["x"]) / 2)


def test_paper_literal_reverses_the_ranking_of_sources():
    cfg = toy_config(model={"dropout": 0.0}, meta={"tasks_per_iter": 2})
    model, ctx = toy_setup(cfg)
    specs = toy_sampler(ctx).sample(0)
    assert {s.source for s in specs} == {"a", "b"}
    theta = dict(model.named_parameters())
    runs = {}
    for direction in ("source_descent", "paper_literal"):
        run_cfg = cfg.model_copy(update={"rescale": cfg.rescale.model_copy(update={"direction": direction})})
        run_ctx = type(ctx)(model=model, windows=ctx.windows, cfg=run_cfg, target=ctx.target)
        results = [run_task(theta, s, run_ctx) for s in specs]
        runs[direction] = (results, combine([r.meta_grad for r in results], [r.sims for r in results], [r.touched for r in results], tau=0.1, enabled=True)[1])
    (descent, w_descent), (literal, w_literal) = runs["source_descent"], runs["paper_literal"]
    for d, lit in zip(descent, literal):
        assert d.touched == lit.touched
        assert lit.sims == pytest.approx({n: -s for n, s in d.sims.items()})
    shared = [n for n, w in w_descent.items() if len(w) == 2 and abs(w[0] - w[1]) > 1e-3]
    assert shared, "expected tensors both tasks touched with distinct weights"
    for name in shared:
        assert (w_descent[name][0] > w_descent[name][1]) == (w_literal[name][0] < w_literal[name][1])


# ------------------------------------------------------------------ smoothed similarity


def test_smoothing_zero_is_the_papers_per_iteration_similarity():
    sims = [{"w": 0.3}, {"w": -0.1}]
    out, state = smooth_similarities(["a", "b"], sims, [{"w"}, {"w"}], {}, 0.0)
    assert out is sims and state == {}


def test_smoothed_similarity_is_a_moving_average_of_the_centred_values():
    touched = [{"w", "items.a"}, {"w"}]
    out1, s1 = smooth_similarities(["a", "b"], [{"w": 0.3, "items.a": 0.9}, {"w": 0.1}], touched, {}, 0.9)
    assert out1[0]["w"] == pytest.approx(0.1) and out1[1]["w"] == pytest.approx(-0.1)  # first value as is
    assert out1[0]["items.a"] == 0.9 and "items.a" not in s1["a"]  # a tensor only one task touched: untouched
    out2, s2 = smooth_similarities(["a", "b"], [{"w": 0.0, "items.a": 0.5}, {"w": 0.2}], touched, s1, 0.9)
    assert s2["a"]["w"] == pytest.approx(0.9 * 0.1 + 0.1 * -0.1)
    assert out2[1]["w"] == pytest.approx(0.9 * -0.1 + 0.1 * 0.1)
    assert s1 == {"a": {"w": pytest.approx(0.1)}, "b": {"w": pytest.approx(-0.1)}}  # the old state is not modified
    # two tasks of one source share its average; a source absent this iteration keeps its value
    out3, s3 = smooth_similarities(["a", "a", "c"], [{"w": 0.4}, {"w": 0.2}, {"w": 0.0}], [{"w"}] * 3, s2, 0.5)
    assert out3[0]["w"] == out3[1]["w"] == s3["a"]["w"] and s3["b"] == s2["b"]


def test_smoothing_separates_a_consistently_less_similar_source_from_noise():
    """Sources a and b are equally aligned with the target, c is 0.05 less, under per-iteration noise
    (sd 0.1 per task plus a common part): with τ = 0.02 the per-iteration softmax weights jump
    around, the smoothed ones give c a small weight every iteration once the average has settled."""
    gen = torch.Generator().manual_seed(0)
    state, raw_c, smooth_c = {}, [], []
    for it in range(400):
        common = float(torch.randn((), generator=gen)) * 0.2
        sims = [{"w": common + float(torch.randn((), generator=gen)) * 0.1 + shift} for shift in (0.0, 0.0, -0.05)]
        smoothed, state = smooth_similarities(["a", "b", "c"], sims, [{"w"}] * 3, state, 0.98)
        if it >= 200:
            raw_c.append(softmax_weights({i: s["w"] for i, s in enumerate(sims)}, 0.02)[2])
            smooth_c.append(softmax_weights({i: s["w"] for i, s in enumerate(smoothed)}, 0.02)[2])
    assert max(smooth_c) < 0.2 < 1 / 3 < max(raw_c)
    assert sum(smooth_c) / len(smooth_c) < 0.15


def test_standardize_gives_scale_free_z_scores_per_tensor():
    touched = [{"w", "items.a"}, {"w"}, {"w"}]
    gains = [{"w": 3e-4, "items.a": 3e-4}, {"w": 1e-4}, {"w": 2e-4}]
    z = standardize(gains, touched)
    sd = (2 / 3) ** 0.5 * 1e-4
    assert [r["w"] for r in z] == pytest.approx([1e-4 / sd, -1e-4 / sd, 0.0])
    assert z[0]["items.a"] == 0.0  # one task touched it
    scaled = standardize([{k: v * 1e3 for k, v in g.items()} for g in gains], touched)
    assert [r["w"] for r in scaled] == pytest.approx([r["w"] for r in z])  # no unit
    assert [r["w"] for r in standardize([{"w": 0.5}, {"w": 0.5}], [{"w"}, {"w"}])] == [0.0, 0.0]  # a tie
    assert gains[1] == {"w": 1e-4}  # inputs untouched


def test_check_similarity_state_refuses_bad_shapes():
    assert check_similarity_state({"a": {"w": 0.1}}) == {"a": {"w": 0.1}}
    for bad in ([], {"a": 1.0}, {"a": {"w": "x"}}, {"a": {"w": float("nan")}}, {"a": {"w": True}}):
        with pytest.raises(ValueError):
            check_similarity_state(bad)
