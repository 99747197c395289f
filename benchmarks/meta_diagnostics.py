"""How far does the inner step move θ, and how much does the meta gradient differ from
the plain target gradient?

For a MetaRec config, at θ after `--warmup` MetaRec iterations, over `--batches` draws of
n tasks, per parameter group (`encoder`, `items.<target>`, `items.<source>`/`bias.<source>`):
- ‖φ − θ‖ (the inner step, mean over tasks) and ‖Δθ‖ of one outer AdamW step,
- cos(Σ_i w_i g_i, ∇_θ L_target(θ)) on the same target batches (dropout off by default,
  so the cosine compares the same network): 1.0 means the meta
  gradient is just the target gradient and MetaRec reduces to target-only training with
  n target batches per step.

    python benchmarks/meta_diagnostics.py --target-users 1000 --inner-lr 0.01 0.1 1.0
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections import defaultdict

import torch
from common import bench_config, header, prepare_shared_data, write_results

from metarec.config import config_from_dict
from metarec.meta.inner_loop import inner_loop
from metarec.meta.rescale import combine
from metarec.meta.run_task import run_task, source_loss_options
from metarec.objective import domain_loss
from metarec.optimizer import make_optimizer
from metarec.train import Trainer


def group_of(name: str, target: str) -> str:
    if name.startswith("encoder."):
        return "encoder"
    kind, domain = name.split(".", 1)
    return f"{kind}.target" if domain == target else f"{kind}.source"


def measure(trainer: Trainer, step: int, batches: int) -> dict[str, dict[str, float]]:
    cfg, problem = trainer.cfg, trainer.problem
    ctx = problem.task_context()
    model, target = problem.model, problem.target
    sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for b in range(batches):
        specs = trainer.sampler.sample(10_000_000 + step * 100 + b)
        theta = {n: p.detach() for n, p in model.named_parameters()}
        results = [run_task(theta, spec, ctx) for spec in specs]
        grad, _ = combine([r.meta_grad for r in results], [r.sims for r in results], [r.touched for r in results], cfg.rescale.tau, cfg.rescale.enabled)
        # plain target gradient at θ on the same target batches
        params = {n: t.detach().clone().requires_grad_(True) for n, t in theta.items()}
        model.train()
        loss = 0.0
        for spec in specs:
            inputs, labels = ctx.windows[target].batch(spec.target_rows)
            torch.manual_seed(spec.seed)
            loss = loss + domain_loss(model, params, target, inputs, labels, target=target).total / len(specs)
        tgrad = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
        # inner step sizes ‖φ − θ‖
        inner = defaultdict(float)
        for spec in specs:
            src_inputs, src_labels = ctx.windows[spec.source].batch(spec.source_rows)
            th = {n: t.detach().clone().requires_grad_(True) for n, t in theta.items()}
            torch.manual_seed(spec.seed)
            phi = inner_loop(model, th, lambda m, p: domain_loss(m, p, spec.source, src_inputs, src_labels, target=target, **source_loss_options(cfg)).total,
                             cfg.meta.inner_steps, cfg.meta.inner_lr, True)
            for n in theta:
                inner[group_of(n, target)] += float((phi[n] - th[n]).detach().pow(2).sum()) / len(specs)
        # one outer step's size: apply to a copy of the optimizer and model
        model_copy = copy.deepcopy(model)
        opt = make_optimizer(model_copy, cfg)
        opt.load_state_dict(trainer.optimizer.state_dict())
        before = {n: p.detach().clone() for n, p in model_copy.named_parameters()}
        for n, p in model_copy.named_parameters():
            p.grad = grad[n].clone() if n in grad else None
        torch.nn.utils.clip_grad_norm_([p for p in model_copy.parameters() if p.grad is not None], cfg.train.grad_clip)
        opt.step()
        groups = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # dot, |g|², |t|², |Δθ|²
        for n, p in model_copy.named_parameters():
            g = grad.get(n)
            t = tgrad.get(n)
            acc = groups[group_of(n, target)]
            if g is not None and t is not None:
                acc[0] += float((g * t).sum())
            acc[1] += 0.0 if g is None else float(g.pow(2).sum())
            acc[2] += 0.0 if t is None else float(t.pow(2).sum())
            acc[3] += float((p.detach() - before[n]).pow(2).sum())
        for name, (dot, gg, tt, dd) in groups.items():
            s = sums[name]
            s["cos(meta_grad, target_grad)"] += (dot / max((gg * tt) ** 0.5, 1e-30)) / batches
            s["‖inner step‖"] += inner[name] ** 0.5 / batches
            s["‖outer step‖"] += dd**0.5 / batches
            s["‖meta_grad‖"] += gg**0.5 / batches
            s["‖target_grad‖"] += tt**0.5 / batches
    return {k: dict(v) for k, v in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="amazon-video-games")
    ap.add_argument("--sources", nargs="+", default=["amazon-beauty", "amazon-sports", "yelp", "movielens-1m"])
    ap.add_argument("--target-users", type=int, default=1000)
    ap.add_argument("--inner-lr", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    ap.add_argument("--first-order", action="store_true")
    ap.add_argument("--warmup", type=int, nargs="+", default=[0, 30], help="MetaRec iterations before measuring")
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.0, help="0: the two gradients see the same network (no dropout noise in the cosine)")
    ap.add_argument("--results-name", default="meta_diagnostics")
    args = ap.parse_args()
    root = prepare_shared_data()
    rows = []
    for alpha in args.inner_lr:
        raw = bench_config("metarec_video", {
            "name": "diag", "seed": 0, "data.root": root, "data.target": args.target, "data.sources": args.sources,
            "data.source_max_len": 20, "data.target_users": args.target_users, "data.subsample_seed": 0,
            "data.subsample_items": "compact", "model.dropout": args.dropout,
            "train.max_steps": 10**6, "train.eval_every": 10**6, "train.patience": 10, "train.source_negatives": 1024,
            "train.checkpoint_every": 0, "train.progress": False,
            "meta.inner_lr": alpha, "meta.source_batch_size": 64, "meta.first_order": args.first_order,
        })
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer.from_config(config_from_dict(raw), tmp)
            done = 0
            for warm in sorted(args.warmup):
                while done < warm:
                    trainer.step(done)
                    done += 1
                for group, vals in sorted(measure(trainer, done, args.batches).items()):
                    row = {"inner_lr": alpha, "first_order": args.first_order, "iteration": done, "group": group, **{k: round(v, 6) for k, v in vals.items()}}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    meta = header("Meta diagnostics: inner-step size and meta gradient vs target gradient", f"{args.target} {args.target_users} users (compact), sources {args.sources}, window 20, batch 64, 1024 negatives, n=3, dropout {args.dropout}, {args.batches} task draws per point")
    write_results(args.results_name, meta, rows, experiment="meta_diagnostics")


if __name__ == "__main__":
    main()
