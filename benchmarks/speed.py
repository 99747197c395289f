"""Speed of the training steps, the meta iteration and full-ranking evaluation.

    python benchmarks/speed.py --official /tmp/lrurec            # CPU, 2 threads
    python benchmarks/speed.py --quick                           # < 2 min on 2 idle cores, rows as JSON on stdout
    python benchmarks/speed.py --device cuda --official /tmp/lrurec

Rows (`what` x `shape`): `lru_train_step` and `sasrec_train_step` at the LRURec
shapes (`video`: L 50, 23,715 items; `ml-1m`: L 200, 3,416 items; batch 128, AdamW,
full-softmax cross-entropy at every non-padding position), `target_only_step`,
`joint_step` and `metarec_iteration` at the reference config
(`configs/metarec_video.yaml`, the joint step on the same batches as the meta
iteration), and `eval_full_ranking` of the amazon-video-games target (validation
split: every user x every item).

`impl` says which code ran: `fast` (metarec as shipped), `reference` (metarec with
`metarec.fastpath.reference_paths()`, i.e. the code before the fast paths) and
`official` (the official LRURec model file `model/lru.py`, imported from the folder
given with `--official`, never copied; the rows are skipped without it). The
implementations of one row group run interleaved in one process (A, B, C, A, B, C,
...) on the same batches and the medians are reported, so load from other processes
hits them alike; `vs_official` and `vs_reference` are ratios of throughputs (higher =
metarec faster). Each group runs in a fresh process; `peak_memory_gib` is that
process's peak RSS (VmHWM; on CUDA the peak allocated GPU memory), i.e. of all the
implementations of its group together, except for evaluation, which measures each
implementation in a process of its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, bench_config, experiment_dir, header, prepare_shared_data, write_results  # noqa: E402

from metarec import fastpath  # noqa: E402
from metarec.config import config_from_dict  # noqa: E402

SHAPES = {"video": ("amazon-video-games", 50), "ml-1m": ("movielens-1m", 200)}
BATCH = 128


# ----------------------------------------------------------------------------- helpers


def _peak_memory_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    with open("/proc/self/status") as f:
        kib = int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    return kib / 2**20


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


CPU_SECONDS: dict[str, float] = {}  # impl key -> median process CPU seconds per call (this process)
ATEN_OPS: dict[str, int] = {}  # impl key -> aten operators per call (`aten_ops`)


def interleaved(fns: dict[str, Callable[[int], None]], warmup: int, reps: int, device: str) -> dict[str, float]:
    """Median wall seconds per call of each function, calls alternating A, B, C, A, B, C, ...

    Also records the median process CPU seconds per call in CPU_SECONDS: on a shared,
    oversubscribed machine wall time stretches with the load, CPU time much less.
    """
    for i in range(warmup):
        for fn in fns.values():
            fn(i)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup, warmup + reps):
        for name, fn in fns.items():
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            fn(i)
            _sync(device)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    CPU_SECONDS.update({k: statistics.median(v) for k, v in cpu.items()})
    ATEN_OPS.update({name: aten_ops(fn, warmup + reps) for name, fn in fns.items()})
    return {k: statistics.median(v) for k, v in times.items()}


# Operators that only make views, metadata or allocations, or that dispatch to others
# counted themselves: not counted as kernel launches.
_NOT_KERNELS = {
    "aten::" + op
    for op in (
        "view as_strided slice select unsqueeze squeeze transpose t permute expand reshape _reshape_alias alias detach "
        "view_as_real view_as_complex _unsafe_view split chunk unbind narrow empty empty_strided empty_like lift_fresh "
        "resolve_conj resolve_neg result_type is_nonzero contiguous to _to_copy item _local_scalar_dense zeros_like "
        "ones_like conj _conj matmul linear dropout numpy_T"
    ).split()
}


def aten_ops(fn: Callable[[int], None], i: int) -> int:
    """aten operators one call of `fn` runs, views and wrappers left out: on a GPU each is
    about one kernel launch, the cost that dominates small models there."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(i)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::") and e.key not in _NOT_KERNELS)


def _trainer(cfg_dict: dict[str, Any], device: str, out: str):
    from metarec.train import Trainer

    cfg_dict = json.loads(json.dumps(cfg_dict))
    cfg_dict.setdefault("train", {}).update({"device": device, "progress": False})
    return Trainer.from_config(config_from_dict(cfg_dict), out)


def _step_fn(trainer, reference: bool) -> Callable[[int], None]:
    def run(i: int) -> None:
        with fastpath.reference_paths(reference):
            trainer.step(i)

    return run


def _shape_config(root: str, shape: str, backbone: str) -> dict[str, Any]:
    """The LRURec settings (configs/target_only_video.yaml) at one of the SHAPES."""
    dataset, max_len = SHAPES[shape]
    return bench_config("target_only_video", {
        "name": f"speed_{backbone}_{shape}", "data.root": root, "data.target": dataset, "data.max_len": max_len,
        "model.backbone": backbone, "train.batch_size": BATCH,
    })


def _reference_config(root: str, meta: bool = True) -> dict[str, Any]:
    return bench_config("metarec_video", {"data.root": root, "meta.enabled": meta})


def _official_step(folder: str, windows, n_items: int, device: str, seed: int = 0) -> Callable[[int], None]:
    """One training step of the official LRURec model (its model file, its loss: CE with
    ignore_index=0 over all B x L positions), AdamW lr 1e-3, wd 0.01, on our windows."""
    spec = importlib.util.spec_from_file_location("official_lrurec_model", os.path.join(folder, "lru.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = types.SimpleNamespace(
        num_items=n_items, bert_hidden_units=64, bert_num_blocks=2, bert_dropout=0.2, bert_attn_dropout=0.2, dataset_code="video"
    )
    torch.manual_seed(seed)
    model = module.LRU(args).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    ce = torch.nn.CrossEntropyLoss(ignore_index=0)
    rng = np.random.default_rng(seed)

    def run(i: int) -> None:
        inputs, labels = (t.to(device) for t in windows.batch(windows.sample_rows(rng, BATCH)))
        logits = model(inputs)[0]
        loss = ce(logits.view(-1, logits.size(-1)), labels.view(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return run


# ------------------------------------------------------------------------ row groups


def group_train_step(a, backbone: str, shape: str) -> list[dict[str, Any]]:
    cfg = _shape_config(a.root, shape, backbone)
    fns = {
        "fast": _step_fn(_trainer(cfg, a.device, f"{a.tmp}/{backbone}_{shape}_fast"), reference=False),
        "reference": _step_fn(_trainer(cfg, a.device, f"{a.tmp}/{backbone}_{shape}_ref"), reference=True),
    }
    if backbone == "lru" and a.official:
        tr = _trainer(cfg, a.device, f"{a.tmp}/{backbone}_{shape}_off")
        target = tr.problem.target
        fns["official"] = _official_step(a.official, tr.problem.windows[target], tr.problem.domains[target].n_items, a.device)
    secs = interleaved(fns, a.warmup, a.reps, a.device)
    return _rows(a, f"{backbone}_train_step", shape, secs, BATCH, "sequences_per_s")


def group_reference(a) -> list[dict[str, Any]]:
    """target-only, joint and MetaRec at the reference config; joint and meta on the same batches."""
    tgt = bench_config("target_only_video", {"data.root": a.root})
    fns = {
        "target_only_step/fast": _step_fn(_trainer(tgt, a.device, f"{a.tmp}/tgt_fast"), False),
        "target_only_step/reference": _step_fn(_trainer(tgt, a.device, f"{a.tmp}/tgt_ref"), True),
        "joint_step/fast": _step_fn(_trainer(_reference_config(a.root, meta=False), a.device, f"{a.tmp}/joint_fast"), False),
        "metarec_iteration/fast": _step_fn(_trainer(_reference_config(a.root), a.device, f"{a.tmp}/meta_fast"), False),
        "joint_step/reference": _step_fn(_trainer(_reference_config(a.root, meta=False), a.device, f"{a.tmp}/joint_ref"), True),
        "metarec_iteration/reference": _step_fn(_trainer(_reference_config(a.root), a.device, f"{a.tmp}/meta_ref"), True),
    }
    secs = interleaved(fns, a.warmup, a.meta_reps, a.device)
    cpu = dict(CPU_SECONDS)
    n_tasks = _reference_config(a.root)["meta"]["tasks_per_iter"]
    rows = []
    ops = dict(ATEN_OPS)
    for what, per in (("target_only_step", BATCH), ("joint_step", n_tasks * BATCH), ("metarec_iteration", n_tasks * BATCH)):
        CPU_SECONDS.clear()
        CPU_SECONDS.update({k.split("/")[1]: v for k, v in cpu.items() if k.startswith(what + "/")})
        ATEN_OPS.clear()
        ATEN_OPS.update({k.split("/")[1]: v for k, v in ops.items() if k.startswith(what + "/")})
        rows += _rows(a, what, "reference", {k.split("/")[1]: v for k, v in secs.items() if k.startswith(what + "/")}, per, "sequences_per_s")
    for impl in ("fast", "reference"):
        meta = next(r for r in rows if r["what"] == "metarec_iteration" and r["impl"] == impl)
        meta["vs_joint_step"] = round(meta["seconds"] / secs[f"joint_step/{impl}"], 3)
        meta["vs_joint_step_cpu"] = round(cpu[f"metarec_iteration/{impl}"] / cpu[f"joint_step/{impl}"], 3)
    return rows


def group_eval(a, impl: str) -> list[dict[str, Any]]:
    from metarec.problem import build_problem, target_metrics

    cfg = bench_config("target_only_video", {"data.root": a.root, "train.device": a.device, "train.progress": False})
    problem = build_problem(config_from_dict(cfg))
    times, cpu = [], []
    for _ in range(a.eval_reps):
        _sync(a.device)
        t, c = time.perf_counter(), time.process_time()
        with fastpath.reference_paths(impl == "reference"):
            metrics = target_metrics(problem, "val")
        _sync(a.device)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    secs = statistics.median(times)
    return [_row(a, "eval_full_ranking", "video", impl, secs, cpu_seconds=round(statistics.median(cpu), 4), users_per_s=round(metrics["n_users"] / secs, 1), n_users=metrics["n_users"], ndcg10=round(metrics["NDCG@10"], 6))]


def _row(a, what: str, shape: str, impl: str, seconds: float, **extra) -> dict[str, Any]:
    return {
        "device": a.device,
        "what": what,
        "shape": shape,
        "impl": impl,
        "seconds": round(seconds, 4),
        **extra,
        "threads": torch.get_num_threads(),
        "peak_memory_gib": round(_peak_memory_gib(a.device), 3),
    }


def _rows(a, what: str, shape: str, secs: dict[str, float], per_call: int, unit: str) -> list[dict[str, Any]]:
    rows = []
    for impl, s in secs.items():
        row = _row(a, what, shape, impl, s, cpu_seconds=round(CPU_SECONDS.get(impl, float("nan")), 4), **{unit: round(per_call / s, 1)}, aten_ops=ATEN_OPS.get(impl))
        if impl == "fast":
            for other in ("official", "reference"):
                if other in secs:
                    row[f"vs_{other}"] = round(secs[other] / s, 3)
                    row[f"vs_{other}_cpu"] = round(CPU_SECONDS[other] / CPU_SECONDS[impl], 3)
        rows.append(row)
    return rows


GROUPS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "lru/video": lambda a: group_train_step(a, "lru", "video"),
    "lru/ml-1m": lambda a: group_train_step(a, "lru", "ml-1m"),
    "sasrec/video": lambda a: group_train_step(a, "sasrec", "video"),
    "sasrec/ml-1m": lambda a: group_train_step(a, "sasrec", "ml-1m"),
    "reference": group_reference,
    "eval/fast": lambda a: group_eval(a, "fast"),
    "eval/reference": lambda a: group_eval(a, "reference"),
}


# ------------------------------------------------------------------------------ main


def _load() -> str:
    try:
        return open("/proc/loadavg").read().split()[0]
    except OSError:
        return "?"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--quick", action="store_true", help="few repetitions, no result files; rows as JSON lines on stdout")
    ap.add_argument("--official", default=None, help="folder holding the official LRURec model/lru.py (e.g. /tmp/lrurec)")
    ap.add_argument("--groups", nargs="+", default=None, choices=sorted(GROUPS), help="run only these row groups")
    ap.add_argument("--merge", action="store_true", help="replace only the rows of the groups run in the existing results")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.warmup, a.reps, a.meta_reps, a.eval_reps = (1, 3, 2, 1) if a.quick else (1, 5, 3, 1)
    a.tmp = str(REPO / ".cache" / "speed_runs")

    if a.worker:  # one row group in this (fresh) process
        torch.set_num_threads(a.threads)
        rows = GROUPS[a.worker](a)
        print(json.dumps(rows))
        return

    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    if a.official and not os.path.exists(os.path.join(a.official, "lru.py")):
        print(f"--official {a.official}: no lru.py there; official rows skipped", file=sys.stderr)
        a.official = None
    root = prepare_shared_data()
    names = a.groups or list(GROUPS)
    if a.quick and not a.groups:
        names = ["lru/video", "lru/ml-1m", "reference", "eval/fast"]
    rows: list[dict[str, Any]] = []
    for name in names:
        cmd = [sys.executable, __file__, "--worker", name, "--root", root, "--device", a.device, "--threads", str(a.threads)]
        cmd += ["--quick"] if a.quick else []
        cmd += ["--official", a.official] if a.official else []
        load_before = _load()
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, cwd=REPO).stdout
        group_rows = json.loads(out.strip().splitlines()[-1])
        for r in group_rows:
            r["load"] = f"{load_before}->{_load()}"
            if a.quick:
                print(json.dumps(r), flush=True)
            else:
                print(json.dumps(r), file=sys.stderr, flush=True)
        rows += group_rows
    if a.quick:
        return
    meta = header("Speed: training steps, meta iteration, full-ranking evaluation", f"{a.threads} threads, {a.reps} interleaved repetitions per train-step row ({a.meta_reps} for the reference config), {a.eval_reps} evaluations")
    meta["official"] = "official LRURec model/lru.py (github.com/yueqirex/LRURec), imported at run time" if a.official else None
    name = f"speed_{a.device}" if a.device != "cpu" else "speed"
    folder = experiment_dir("speed")
    if a.merge and (folder / f"{name}.json").exists():
        key = lambda r: (r["device"], r["what"], r["shape"], r["impl"], r["threads"])  # noqa: E731
        new = {key(r) for r in rows}
        old = [r for r in json.loads((folder / f"{name}.json").read_text()) if key(r) not in new]
        rows = old + rows
        order = [w for w in ("lru_train_step", "sasrec_train_step", "target_only_step", "joint_step", "metarec_iteration", "eval_full_ranking")]
        rows.sort(key=lambda r: (order.index(r["what"]) if r["what"] in order else len(order), -r["threads"]))
        earlier = folder / f"{name}.meta.json"
        if old and earlier.exists():  # say which command measured which rows
            before = json.loads(earlier.read_text())
            meta["command"] = f"{before['command']}; then {meta['command']} (merged: its rows replace those it measured)"
            meta["budget"] = f"{before['budget']}; then {meta['budget']}"
    write_results(name, meta, rows, notes=NOTES, experiment="speed")


NOTES = [
    "`seconds`: median per call; `sequences_per_s`: training sequences per second (joint step and meta iteration: n tasks x (source + target) batches counted as n x 128);",
    "`vs_official` / `vs_reference`: throughput of the fast path over the other implementation, measured interleaved in the same process;",
    "`vs_joint_step`: meta-iteration time over the joint-step time on the same batches; `load`: 1-minute load average before -> after the group (the machine is shared).",
    "`aten_ops`: aten operators one call runs (profiled once after the timed calls; views and wrappers left out), about the kernel launches a GPU would pay for.",
    "`cpu_seconds`: median process CPU time per call; `*_cpu` ratios use it. On an oversubscribed machine wall time stretches with the load and CPU time much less, so the `_cpu` ratios are the steadier comparison.",
]


if __name__ == "__main__":
    main()
