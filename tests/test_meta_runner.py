"""Task sampling, run_task, the outer update and the local runner (docs/design.md §4, §6)."""

from __future__ import annotations

import dataclasses
import math
import json
from collections import Counter

import numpy as np
import pytest
import torch
from meta_toy import meta_train, toy_config, toy_problem, toy_sampler, toy_setup

from metarec.errors import CheckpointError, NonFiniteError
from metarec.meta import (
    TaskSampler,
    apply_meta_update,
    combine,
    run_task,
    task_seed,
    task_weight,
)
from metarec.objective import domain_loss
from metarec.runners.local import LocalRunner
from metarec.train import Trainer


# ------------------------------------------------------------------ task sampling


def _sampler(n_tasks=2, sources=("a", "b", "c"), sizes=(50, 60, 70), sampling="uniform", seed=3):
    return TaskSampler(list(sources), dict(zip(sources, sizes)), target_size=30, n_tasks=n_tasks,
                       source_batch_size=8, target_batch_size=4, sampling=sampling, seed=seed)


def test_sources_without_replacement_up_to_m_then_with_replacement():
    for it in range(20):
        specs = _sampler(n_tasks=3).sample(it)
        assert sorted(s.source for s in specs) == ["a", "b", "c"]
    sampler = _sampler(n_tasks=5)
    for it in range(20):
        specs = sampler.sample(it)
        assert [s.index for s in specs] == list(range(5))
        assert {s.source for s in specs[:3]} == {"a", "b", "c"}
    sampler = _sampler(n_tasks=2)
    for it in range(20):
        a, b = sampler.sample(it)
        assert a.source != b.source
        assert len(set(a.source_rows.tolist())) == 8 and a.source_rows.max() < {"a": 50, "b": 60, "c": 70}[a.source]
        assert len(a.target_rows) == 4 and a.target_rows.max() < 30


def test_proportional_sampling_follows_domain_sizes():
    sampler = _sampler(n_tasks=1, sizes=(10, 10, 980), sampling="proportional")
    counts = Counter(sampler.sample(it)[0].source for it in range(400))
    assert counts["c"] > 350
    uniform_sampler = _sampler(n_tasks=1, sizes=(10, 10, 980))
    counts = Counter(uniform_sampler.sample(it)[0].source for it in range(400))
    assert 90 < counts["a"] < 180


def _same_specs(x, y):
    return all(
        (a.iteration, a.index, a.source, a.seed) == (b.iteration, b.index, b.source, b.seed)
        and np.array_equal(a.source_rows, b.source_rows)
        and np.array_equal(a.target_rows, b.target_rows)
        for a, b in zip(x, y, strict=True)
    )


def test_sampler_is_reproducible_and_resumable():
    one, two = _sampler(), _sampler()
    assert all(_same_specs(one.sample(i), two.sample(i)) for i in range(5))
    assert not _same_specs(_sampler(seed=4).sample(0), _sampler(seed=3).sample(0))

    straight = _sampler()
    for i in range(3):
        straight.sample(i)
    state = json.loads(json.dumps(straight.state_dict()))
    resumed = _sampler()
    resumed.load_state_dict(state)
    assert all(_same_specs(straight.sample(i), resumed.sample(i)) for i in range(3, 6))

    with pytest.raises(CheckpointError, match="sources"):
        _sampler(sources=("a", "b", "d")).load_state_dict(state)


def test_task_seeds_depend_on_run_iteration_and_index():
    seeds = {task_seed(s, it, i) for s in (0, 1) for it in range(3) for i in range(3)}
    assert len(seeds) == 18
    assert task_seed(5, 2, 1) == task_seed(5, 2, 1)
    assert [s.seed for s in _sampler().sample(7)] == [task_seed(3, 7, 0), task_seed(3, 7, 1)]


# ------------------------------------------------------------------ run_task


def test_run_task_result_contents_and_purity():
    cfg = toy_config()
    model, ctx = toy_setup(cfg)
    spec = next(s for s in toy_sampler(ctx).sample(0) if s.source == "a")
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = run_task(params, spec, ctx)
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeded inside a fork
    torch.manual_seed(456)  # the caller's RNG state does not matter
    second = run_task(params, spec, ctx)
    assert all(torch.equal(first.meta_grad[n], second.meta_grad[n]) for n in first.meta_grad)
    assert first.sims == second.sims
    reseeded = run_task(params, dataclasses.replace(spec, seed=spec.seed + 1), ctx)
    assert not torch.equal(reseeded.meta_grad["encoder.mix.weight"], first.meta_grad["encoder.mix.weight"])  # dropout
    assert all(torch.equal(params[n], p) for n, p in model.named_parameters())  # θ not modified

    assert first.index == spec.index and first.source == "a"
    assert "items.b" not in first.touched and "bias.b" not in first.touched
    assert {"items.a", "bias.a", "items.t", "bias.t", "encoder.mix.weight"} <= first.touched
    assert set(first.sims) == first.touched and set(first.meta_grad) <= first.touched
    assert set(first.source_delta) == {"items.a", "bias.a"}
    assert float(first.source_delta["items.a"].abs().sum()) > 0
    assert all(t.device.type == "cpu" for t in [*first.meta_grad.values(), *first.source_delta.values()])
    assert first.stats["source_loss"] > 0 and first.stats["target_loss"] > 0 and first.stats["vq_loss"] > 0


def test_target_gain_and_source_fit_signals_replace_the_cosine_on_every_tensor():
    """`rescale.signal: target_gain`: s_i^p = L_target(θ) − L_target(φ_i) on the task's target batch,
    without dropout, for every touched tensor; `source_fit`: minus the source loss at θ. The meta
    gradient is the same as with the cosine."""
    cosine_cfg = toy_config(meta={"persist_shared": 1.0}, model={"hidden": 8, "dropout": 0.5})
    gain_cfg = cosine_cfg.model_copy(update={"rescale": cosine_cfg.rescale.model_copy(update={"signal": "target_gain"})})
    model, ctx = toy_setup(cosine_cfg)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = next(s for s in toy_sampler(ctx).sample(0) if s.source == "a")
    cosine = run_task(params, spec, ctx)
    gain = run_task(params, spec, dataclasses.replace(ctx, cfg=gain_cfg))
    assert "target_gain" not in cosine.stats and model.training
    assert set(gain.sims) == gain.touched == cosine.touched
    assert set(gain.sims.values()) == {gain.stats["target_gain"]}
    assert all(torch.equal(gain.meta_grad[n], cosine.meta_grad[n]) for n in cosine.meta_grad)
    phi = {n: params[n] + gain.source_delta.get(n, 0) for n in params}  # persist_shared sends every moved tensor's φ − θ
    inputs, labels = ctx.windows["t"].batch(spec.target_rows)
    model.eval()
    with torch.no_grad():
        before, after = (float(domain_loss(model, p, "t", inputs, labels, target="t").total) for p in (params, phi))
    model.train()
    assert gain.stats["target_gain"] == pytest.approx(before - after, rel=1e-4, abs=1e-7)
    assert gain.stats["target_gain"] != 0
    fit_cfg = cosine_cfg.model_copy(update={"rescale": cosine_cfg.rescale.model_copy(update={"signal": "source_fit"})})
    fit = run_task(params, spec, dataclasses.replace(ctx, cfg=fit_cfg))
    assert set(fit.sims) == fit.touched and set(fit.sims.values()) == {-fit.stats["source_loss"]}
    assert all(torch.equal(fit.meta_grad[n], cosine.meta_grad[n]) for n in cosine.meta_grad)


def test_nan_in_a_source_table_names_the_tensor():
    cfg = toy_config()
    model, ctx = toy_setup(cfg)
    with torch.no_grad():
        model.items["a"][3, 1] = float("nan")
    specs = toy_sampler(ctx).sample(4)
    with pytest.raises(NonFiniteError, match=r"source loss.*'a'.*iteration 4.*items\.a"):
        LocalRunner(ctx).run_tasks(dict(model.named_parameters()), specs)


def test_nonfinite_meta_gradient_is_reported_by_the_outer_step():
    cfg = toy_config()
    model, ctx = toy_setup(cfg)
    params = dict(model.named_parameters())
    results = LocalRunner(ctx).run_tasks(params, toy_sampler(ctx).sample(0))
    results[1].meta_grad["encoder.mix.bias"][0] = float("inf")
    optimizer = torch.optim.SGD(params.values(), lr=0.1)
    before = {n: p.detach().clone() for n, p in params.items()}
    with pytest.raises(NonFiniteError, match=r"encoder\.mix\.bias at iteration 9"):
        apply_meta_update(params, optimizer, results, cfg, 9)
    assert all(torch.equal(before[n], p) for n, p in params.items())  # nothing stepped


# ------------------------------------------------------------------ outer update


def test_outer_sgd_step_is_eq8_with_clipping():
    cfg = toy_config(meta={"source_params": "meta_only"}, train={"grad_clip": None})
    model, ctx = toy_setup(cfg)
    params = dict(model.named_parameters())
    results = LocalRunner(ctx).run_tasks(params, toy_sampler(ctx).sample(0))
    grad, _ = combine([r.meta_grad for r in results], [r.sims for r in results], [r.touched for r in results], cfg.rescale.tau, True)
    before = {n: p.detach().clone() for n, p in params.items()}
    info = apply_meta_update(params, torch.optim.SGD(params.values(), lr=0.3), results, cfg, 0)
    for name, p in params.items():
        expected = before[name] - 0.3 * grad[name] if name in grad else before[name]
        assert torch.allclose(p.detach(), expected, atol=1e-7), name
    assert info["grad_norm"] == pytest.approx(float(torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grad.values()]))), rel=1e-5)
    assert set(info["weights"]) == {r.source for r in results}

    clipped = toy_config(meta={"source_params": "meta_only"}, train={"grad_clip": 1e-3})
    model, ctx = toy_setup(clipped)
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    apply_meta_update(params, torch.optim.SGD(params.values(), lr=1.0), LocalRunner(ctx).run_tasks(params, toy_sampler(ctx).sample(0)), clipped, 0)
    moved = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in params.items()])
    assert 0 < float(torch.linalg.vector_norm(moved)) <= 1e-3 * (1 + 1e-5)


def test_outer_step_weights_standardized_signals_without_units():
    """With `rescale.signal` target_gain or source_fit the outer step weights the iteration's
    z-scores: gains 1e-6 apart separate at τ = 0.1 as much as losses 1.0 apart; the
    paper's cosine keeps its units (equal weights)."""
    def weights(signal, sims):
        cfg = toy_config(meta={"source_params": "meta_only", "tasks_per_iter": 2}, rescale={"signal": signal, "tau": 0.1})
        model, ctx = toy_setup(cfg)
        params = dict(model.named_parameters())
        results = LocalRunner(ctx).run_tasks(params, toy_sampler(ctx).sample(0))
        for r, s in zip(sorted(results, key=lambda r: r.index), sims):
            r.sims = {n: s for n in r.touched}
        info = apply_meta_update(params, torch.optim.SGD(params.values(), lr=0.1), results, cfg, 0)
        return [info["weights"][r.source] for r in sorted(results, key=lambda r: r.index)]

    tiny = weights("target_gain", [1e-6, 0.0])  # z-scores +1, -1: weights 1 / (1 + e^-20)
    assert tiny == pytest.approx(weights("source_fit", [1.0, 0.0]), rel=1e-6)
    assert tiny == pytest.approx([1.0, math.exp(-20)], rel=1e-6, abs=1e-12)
    assert weights("cosine", [1e-6, 0.0]) == pytest.approx([0.5, 0.5], rel=1e-4)


SOURCE_TABLES = ("items.a", "items.b", "bias.a", "bias.b")


def _one_outer_step(meta: dict, lr: float = 0.3):
    """One SGD(lr) outer step on the toy problem without clipping: (params before, params
    after, task results, the combined meta gradient Σ_i w_i g_i, the rescaling weights)."""
    cfg = toy_config(meta={"source_params": "meta_only", **meta}, train={"grad_clip": None})
    model, ctx = toy_setup(cfg)
    params = dict(model.named_parameters())
    results = LocalRunner(ctx).run_tasks(params, toy_sampler(ctx).sample(0))
    grad, weights = combine([r.meta_grad for r in results], [r.sims for r in results], [r.touched for r in results], cfg.rescale.tau, True)
    before = {n: p.detach().clone() for n, p in params.items()}
    apply_meta_update(params, torch.optim.SGD(params.values(), lr=lr), results, cfg, 0)
    return before, {n: p.detach() for n, p in params.items()}, results, grad, weights


def test_persist_shared_keeps_the_rescale_weighted_inner_change():
    """θ^p ← SGD step − λ... + λ Σ_i w_i^p (φ_i^p − θ^p) for shared tensors; 0 = the paper's step."""
    results_by_lambda = {}
    for lam in (0.0, 0.5):
        before, after, results, grad, weights = _one_outer_step({"persist_shared": lam, "inner_lr": 0.5})
        results_by_lambda[lam] = results
        for name, p in after.items():
            expected = before[name] - 0.3 * grad[name] if name in grad else before[name].clone()
            if lam and not name.startswith(SOURCE_TABLES):
                for pos, r in enumerate(results):
                    if name in r.source_delta:
                        expected = expected + lam * weights[name][pos] * r.source_delta[name]
            assert torch.allclose(p, expected, atol=1e-6), (lam, name)
    shared = {n for r in results_by_lambda[0.5] for n in r.source_delta} - set(SOURCE_TABLES)
    assert "encoder.mix.weight" in shared and "items.t" in shared  # the encoder and the VQ codebook moved in the inner loop
    assert all(set(r.source_delta) == {f"items.{r.source}", f"bias.{r.source}"} for r in results_by_lambda[0.0])


def test_task_weight_ignores_tensors_only_the_task_touched():
    weights = {"items.a": {0: 1.0}, "enc.w": {0: 0.2, 1: 0.8}, "enc.b": {0: 0.4, 1: 0.6}}
    assert task_weight(weights, 0, {"items.a", "enc.w", "enc.b"}) == pytest.approx(0.3)
    assert task_weight(weights, 1, {"enc.w", "enc.b"}) == pytest.approx(0.7)
    assert task_weight({"items.a": {0: 1.0}}, 0, {"items.a"}) == 1.0  # a lone task


def _eval_source_loss(model, ctx, source):
    model.eval()
    with torch.no_grad():
        win = ctx.windows[source]
        loss = domain_loss(model, dict(model.named_parameters()), source, *win.batch(np.arange(len(win))), target=ctx.target, vq_heads=ctx.cfg.vq.heads)
    model.train()
    return float(loss.rec)


def test_persist_inner_source_tables_learn():
    def train(source_params):
        cfg = toy_config(meta={"source_params": source_params})
        model, ctx = toy_setup(cfg)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        before = {s: _eval_source_loss(model, ctx, s) for s in ("a", "b")}
        meta_train(model, ctx, 30)
        after = {s: _eval_source_loss(model, ctx, s) for s in ("a", "b")}
        moved = {s: float((model.items[s].detach() - init[f"items.{s}"]).norm() / init[f"items.{s}"].norm()) for s in ("a", "b")}
        return before, after, moved

    before, persist, persist_moved = train("persist_inner")
    _, meta_only, meta_only_moved = train("meta_only")
    for s in ("a", "b"):
        assert persist_moved[s] > 5, s  # far from the init (relative change of the table)
        assert persist_moved[s] > 2 * meta_only_moved[s], s
        assert persist[s] < before[s] - 0.4, s
        assert persist[s] < meta_only[s] - 0.1, s


def test_meta_only_first_order_leaves_source_tables_alone():
    cfg = toy_config(meta={"source_params": "meta_only", "first_order": True})
    model, ctx = toy_setup(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    meta_train(model, ctx, 5)
    for name in ("items.a", "items.b", "bias.a", "bias.b"):
        assert torch.equal(model.get_parameter(name), init[name]), name
    assert not torch.equal(model.get_parameter("encoder.mix.weight"), init["encoder.mix.weight"])


# ------------------------------------------------------------------ reproducibility


class ReversedRunner(LocalRunner):
    """Runs tasks in reverse and returns them in that order, like workers finishing at random."""

    def run_tasks(self, params, specs):
        return [run_task(params, spec, self.ctx) for spec in reversed(specs)]


def _train_params(iterations, runner_cls=LocalRunner, backbone=False, **sections):
    cfg = toy_config(**sections)
    model, ctx = toy_setup(cfg, backbone=backbone)
    meta_train(model, ctx, iterations, runner=runner_cls(ctx))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


BACKBONES = [pytest.param(False, id="toy"), pytest.param(True, id="lru")]


@pytest.mark.parametrize("backbone", BACKBONES)
def test_same_seed_gives_bitwise_identical_parameters(backbone):
    one, two = _train_params(3, backbone=backbone), _train_params(3, backbone=backbone)
    assert all(torch.equal(one[n], two[n]) for n in one)
    other_seed = _train_params(3, backbone=backbone, seed=8)
    assert not all(torch.equal(one[n], other_seed[n]) for n in one)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_results_do_not_depend_on_task_order(backbone):
    local, shuffled = _train_params(3, backbone=backbone), _train_params(3, runner_cls=ReversedRunner, backbone=backbone)
    assert all(torch.equal(local[n], shuffled[n]) for n in local)


# ------------------------------------------------------------------ joint ablation


def test_joint_loss_trains_source_and_target():
    cfg = toy_config(meta={"enabled": False}, train={"lr": 3e-2})
    model, ctx = toy_setup(cfg)
    trainer = Trainer(toy_problem(model, ctx), "unused")
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = [trainer.step(it) for it in range(15)]
    for parts in stats:
        assert parts["loss"] == pytest.approx(parts["source_loss"] + parts["vq_loss"] * cfg.vq.weight + parts["target_loss"], rel=1e-5)
    assert np.mean([s["target_loss"] for s in stats[-5:]]) < np.mean([s["target_loss"] for s in stats[:5]])
    assert np.mean([s["source_loss"] for s in stats[-5:]]) < np.mean([s["source_loss"] for s in stats[:5]])
    for name in ("items.a", "items.b", "items.t", "encoder.mix.weight"):
        assert not torch.equal(model.get_parameter(name), init[name]), name


def test_source_grad_adds_the_rescale_weighted_source_gradient_to_the_outer_gradient():
    """G^p = Σ_i w_i^p (g_i^p + μ (θ^p − φ_i^p) / α) for shared tensors (docs/design.md Eq. (8b))."""
    mu, alpha = 0.7, 0.5
    before, after, results, grad, weights = _one_outer_step({"source_grad": mu, "inner_lr": alpha})
    added = set()
    for name, p in after.items():
        g = grad[name].clone() if name in grad else None
        if not name.startswith(SOURCE_TABLES):
            for pos, r in enumerate(results):
                if name in r.source_grad and name in r.meta_grad:
                    g = g + mu * weights[name][pos] * r.source_grad[name]
                    added.add(name)
        expected = before[name] - 0.3 * g if g is not None else before[name]
        assert torch.allclose(p, expected, atol=1e-6), name
    assert "encoder.mix.weight" in added and "items.t" in added  # the encoder and the VQ codebook get the source term
    assert not added & set(SOURCE_TABLES)  # never a source's own table
    # each task sends its source gradient (θ − φ_i) / α: the outer step needs no α
    *_, with_deltas, _, _ = _one_outer_step({"source_grad": mu, "inner_lr": alpha, "persist_shared": 0.5})
    for r in with_deltas:
        assert set(r.source_grad) == set(r.source_delta) - set(SOURCE_TABLES)
        for name, source_grad in r.source_grad.items():
            torch.testing.assert_close(source_grad, -r.source_delta[name] / alpha)


def test_decay_bias_and_norm_false_exempts_biases_and_layer_norms_from_weight_decay():
    from metarec.models.recommender import Recommender
    from metarec.optimizer import make_optimizer

    cfg = toy_config(train={"weight_decay": 0.5, "decay_bias_and_norm": False})
    model = Recommender({"t": 5, "a": 4}, cfg.model)
    decayed, exempt = make_optimizer(model, cfg).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    exempt_names = sorted(names[id(p)] for p in exempt["params"])
    assert decayed["weight_decay"] == 0.5 and exempt["weight_decay"] == 0.0
    assert "bias.t" in exempt_names and "encoder.layer_norm.weight" in exempt_names and "encoder.layer_norm.bias" in exempt_names
    assert all(n.startswith("bias.") or n.endswith(".bias") or "layer_norm" in n for n in exempt_names)
    assert "items.t" in {names[id(p)] for p in decayed["params"]}
    assert len(decayed["params"]) + len(exempt["params"]) == len(names)
    (single,) = make_optimizer(model, toy_config(train={"weight_decay": 0.5})).param_groups  # the default: one group
    assert single["weight_decay"] == 0.5
