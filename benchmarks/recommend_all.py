"""`metarec recommend --all-users` on the full amazon-video-games target: users/s and peak RSS.

Prepares `../shared/data/amazon-video-games.txt` (31,013 users, 23,715 items) and two
prefixes of its users (25% and 50%, same items), builds the model of
`configs/metarec_video_cpu.yaml` target-only on the whole target (LRURec, d=64, 2 blocks,
max_len 50; seeded, untrained: the cost of scoring does not depend on the weights) and
saves it as the best checkpoint of one run directory per user set. Then runs what
`metarec recommend RUN --all-users --out ... -k 10` runs in a fresh process per user set,
timing the call and reading the process's CPU time and peak RSS (`wait4`), so the rows
show how time and memory grow with the number of users. Writes benchmarks/results/recommend_all/{rows.json,README.md}.

    OMP_NUM_THREADS=2 python benchmarks/recommend_all.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.common import PREPARED, machine  # noqa: E402

TARGET = "amazon-video-games"
FRACTIONS = (0.25, 0.5, 1.0)
OUT = REPO / "benchmarks" / "results" / "recommend_all"


def prefix_domain(root: str, fraction: float) -> str:
    """The first `fraction` of the target's users as a domain of its own, with all its items (same IDs)."""
    from metarec.data.domain import Domain, load_item_map
    from metarec.data.prepare import write_domain
    from metarec.data.readers import SequenceTable

    if fraction == 1.0:
        return TARGET
    full = Domain.load(root, TARGET)
    keys = sorted(load_item_map(root, TARGET).items(), key=lambda kv: kv[1])
    n = int(full.n_users * fraction)
    seqs = full.sequences[:n]
    name = f"{TARGET}-first{int(fraction * 100)}pct"
    write_domain(SequenceTable(users=full.users[:n], offsets=np.concatenate(([0], np.cumsum([len(s) for s in seqs]))),
                               items=np.concatenate(seqs), item_keys=[k for k, _ in keys]),
                 root, name, source=f"first {n} users of {TARGET}")
    return name


def make_run(root: str, target: str, run_dir: str) -> None:
    """A run directory whose best checkpoint is the seeded, untrained target-only model."""
    import yaml

    from metarec.config import config_from_dict
    from metarec.data.domain import Domain
    from metarec.models.recommender import Recommender
    from metarec.run_dir import RunDir

    raw = yaml.safe_load((REPO / "configs" / "metarec_video_cpu.yaml").read_text())
    raw.update(name=f"recommend_all_{target}")
    raw["data"] = {"root": root, "target": target, "max_len": raw["data"]["max_len"]}
    raw["meta"] = {"enabled": False}
    cfg = config_from_dict(raw)
    import torch

    torch.manual_seed(cfg.seed)
    model = Recommender({target: Domain.load(root, target).n_items}, cfg.model)
    run = RunDir(run_dir)
    run.write_config(cfg)
    run.save_best(model, {"step": 0})


SCORE = """
import json, sys, time
from metarec.recommend_all import recommend_all_users
start = time.perf_counter()
recommend_all_users(sys.argv[1], sys.argv[2], k=10, progress=False)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def measure(run_dir: str, out: str) -> dict[str, float]:
    """What `metarec recommend RUN --all-users --out OUT -k 10` runs (`recommend_all_users`), in a
    fresh process: its scoring wall time, and the process's wall time, CPU time and peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", SCORE, run_dir, out], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    process_seconds = time.perf_counter() - start
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"recommend failed: {stderr.decode()[-2000:]}")
    return {"seconds": json.loads(stdout)["seconds"], "process_seconds": process_seconds,
            "process_cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per user set (the fastest is reported)")
    args = parser.parse_args()
    from metarec.data.domain import Domain
    from metarec.data.prepare import prepare_shared

    root = str(PREPARED)
    prepare_shared(root, [TARGET])
    rows = []
    with tempfile.TemporaryDirectory(prefix="recommend_all-") as scratch:
        for fraction in FRACTIONS:
            target = prefix_domain(root, fraction)
            run_dir = os.path.join(scratch, f"run-{target}")
            make_run(root, target, run_dir)
            out = os.path.join(scratch, f"{target}.parquet")
            best = min((measure(run_dir, out) for _ in range(args.repeats)), key=lambda m: m["seconds"])
            domain = Domain.load(root, target)
            rows.append({
                "target": target,
                "users": domain.n_users,
                "items": domain.n_items,
                "seconds": round(best["seconds"], 2),
                "users_per_s": round(domain.n_users / best["seconds"], 1),
                "process_seconds": round(best["process_seconds"], 2),
                "process_cpu_seconds": round(best["process_cpu_seconds"], 2),
                "peak_rss_gib": round(best["peak_rss_gib"], 3),
                "output_mib": round(os.path.getsize(out) / 2**20, 2),
            })
            print(json.dumps(rows[-1]), flush=True)
    first, last = rows[0], rows[-1]
    meta = {
        "command": "OMP_NUM_THREADS={} python {}".format(os.environ.get("OMP_NUM_THREADS", "(unset)"),
                                                         " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])),
        "machine": machine(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_at_start": os.getloadavg()[0],
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "rows.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# `metarec recommend --all-users`: users/s and peak RSS (CPU)",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']} (load average {meta['load_average_at_start']:.2f} at start; shared with other jobs)",
        f"- date: {meta['date']}",
        "- model: `configs/metarec_video_cpu.yaml`'s LRURec (d=64, 2 blocks, max_len 50), target-only, seeded and untrained",
        "  (scoring cost does not depend on the weights); k=10, chunks of `train.eval_batch_size`=256 users;",
        "  each row is a fresh process running what `metarec recommend RUN --all-users --out X.parquet -k 10` runs",
        "  (`recommend_all_users`): `seconds` and users/s time that call (model load, reading, scoring, Parquet",
        "  writing); `process` columns are the whole process (imports included, wall and CPU time); peak RSS is its",
        "  `ru_maxrss`.",
        "- the 25% and 50% rows are the first users of amazon-video-games, with all of its items.",
        "",
        "| target | users | items | seconds | users/s | process s (wall) | process s (CPU) | peak RSS (GiB) | output (MiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['target']} | {r['users']} | {r['items']} | {r['seconds']} | {r['users_per_s']} | {r['process_seconds']} "
                     f"| {r['process_cpu_seconds']} | {r['peak_rss_gib']} | {r['output_mib']} |")
    lines += [
        "",
        f"Peak RSS stays at {min(r['peak_rss_gib'] for r in rows):.2f}-"
        f"{max(r['peak_rss_gib'] for r in rows):.2f} GiB while the users grow {last['users'] / first['users']:.0f}x: users are",
        "read, scored and written chunk by chunk, so memory does not grow with their number.",
        f"CPU time grows by {(last['process_cpu_seconds'] - first['process_cpu_seconds']) / (last['users'] - first['users']) * 1e3:.2f} ms per user "
        f"from the first row to the last ({(last['users'] - first['users']) / max(last['process_cpu_seconds'] - first['process_cpu_seconds'], 1e-9):.0f} users per CPU-second,",
        "without the process start), a figure less sensitive than wall time to the other jobs on the machine.",
    ]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT}/rows.json and README.md")


if __name__ == "__main__":
    main()
