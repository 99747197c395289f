"""Give every committed row of a transfer_converge.py rows file the full config it ran with.

Rows written since 2026-12-04 record `config` (every setting, defaults included) and
`commit` (the code they ran). Older rows recorded only their method name and searched overrides, so a row run
before a library default changed would rerun differently today. This script reconstructs
each such row's config from what the row ran: the protocol's settings
(`transfer_converge.base_overrides` with the command's sources), the method, the tuned
overrides, the row's `eval_every`, and the library defaults of the time the row was
committed (`git blame`). Two defaults changed under these rows without an experiment
config pinning them:

- `train.batch_order`: random until 6748a19 (2026-12-02 02:00 UTC), epoch since;
- `meta.source_grad`: 0 until 25a14b1 (2026-12-01 22:20 UTC), 3 since.

A row committed near a change may have run under either value, so every candidate is
checked the same way `transfer_converge.py rerun --first-eval` checks a row: train to the
first validation with today's code and compare with the row's stored curve. The first
candidate that reproduces it is written, with `config_check` saying so; where none does
(code that changed since, e.g. rows of 2026-11-27), the first candidate is written and
`config_check` says it was not reproduced. Rows are rewritten in place, one atomic
replace per file, after all checks (each check is kept in NAME/.STEM_backfill.jsonl as it
finishes, so an interrupted backfill goes on where it stopped); a row that has a config is
never touched.

    python benchmarks/backfill_row_configs.py --name scientific --sources amazon-beauty amazon-sports amazon-video-games
    python benchmarks/backfill_row_configs.py --name scientific --stem refit_on_validation --sources amazon-beauty amazon-sports amazon-video-games
    python benchmarks/backfill_row_configs.py --name transfer_converge
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import transfer_converge as tc
from common import REPO, prepare_shared_data
from harmful_sources import harmful_copy, is_harmful

EPOCH_ORDER_SINCE = 1796176859  # 6748a19, 2026-12-02 02:00:59 UTC: train.batch_order defaults to epoch
SOURCE_GRAD_SINCE = 1796163596  # 25a14b1, 2026-12-01 22:19:56 UTC: meta.source_grad defaults to 3


def commit_times(path: Path) -> list[int]:
    """Committer time of the commit that recorded each line of `path` as committed at HEAD
    (git blame, following copies; the rows keep their order when their configs are added)."""
    out = subprocess.run(["git", "blame", "-C", "-C", "-M", "--line-porcelain", "HEAD", "--", str(path.relative_to(REPO))],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return [int(line.split()[1]) for line in out.splitlines() if line.startswith("committer-time ")]


def explicit_keys(method: str, tuned: dict) -> set[str]:
    name, *pairs = method.split("+")
    keys = {p.split("=", 1)[0] for p in pairs}
    return keys | set(tuned.get(name, {}).get("overrides", {})) | set(tc.METHODS.get(tuned.get(name, {}).get("base", name), {}))


def candidates(row: dict, when: int, args, root: str, tuned: dict) -> list[dict]:
    """The configs the row may have run with, the likeliest (by its commit time) first."""
    ap = tc.build_parser()
    run_args = ap.parse_args(["run", "--name", args.name, "--target", row["dataset"], "--sources", *(row.get("sources") or args.sources)])
    raw, _ = tc.method_config(run_args, root, row["dataset"], row["target_users"], row["seed"], row["method"], tuned)
    raw["train"]["eval_every"] = row["eval_every"]
    explicit = explicit_keys(row["method"], tuned)
    orders = [None] if "train.batch_order" in explicit else (["random", "epoch"] if when <= EPOCH_ORDER_SINCE + 3 * 3600 else ["epoch", "random"])
    meta = raw.get("meta", {}).get("enabled", True) and raw["data"]["sources"]
    grads = [None] if "meta.source_grad" in explicit or not meta else ([0.0, 3.0] if when <= SOURCE_GRAD_SINCE + 3 * 3600 else [3.0, 0.0])
    out = []
    for order in orders:
        for grad in grads:
            cand = copy.deepcopy(raw)
            if order is not None:
                cand["train"]["batch_order"] = order
            if grad is not None:
                cand.setdefault("meta", {})["source_grad"] = grad
            out.append(cand)
    return out


def first_eval(job: dict) -> float:
    """Val NDCG@10 at the first validation of the job's config (today's code)."""
    tc.run_one(job)
    return json.loads(Path(job["detail_path"]).read_text())["val_curve"][0][1]


def stop_mismatch(row: dict, raw: dict) -> str:
    """"" if the row's length agrees with the config's patience and step cap, else why not."""
    train = raw["train"]
    stopped = row["steps"] == row["best_step"] + train["patience"] * train["eval_every"]
    if row["converged"] and not stopped:
        return f"; but {row['steps']} steps is not best step {row['best_step']} + patience {train['patience']} x {train['eval_every']}"
    if not row["converged"] and row["steps"] != train["max_steps"]:
        return f"; but an unconverged run of {row['steps']} steps, not train.max_steps {train['max_steps']}"
    return ""


def check_row(task: dict) -> dict:
    """Try the row's candidates in order; the first whose first validation matches the stored one wins."""
    from metarec.config import config_from_dict

    tried = []
    for i, raw in enumerate(task["candidates"]):
        short = copy.deepcopy(raw)
        short["train"]["max_steps"] = short["train"]["eval_every"]
        job = {"method": task["method"], "seed": task["seed"], "threads": 1, "eval_every": short["train"]["eval_every"], "source_set": task["source_set"],
               "config": short, "overrides": {}, "detail_path": f"{task['tmp']}/{i}.json"}
        value = first_eval(job)
        tried.append(f"{value:.6f} (batch_order {raw['train'].get('batch_order')}, source_grad {raw.get('meta', {}).get('source_grad')})")
        if abs(value - task["stored"]) <= 1e-6:
            return {"config": tc.row_config(config_from_dict(raw)),
                    "config_check": f"reconstructed; today's code reproduces its first validation (val NDCG@10 {value:.6f} at step {raw['train']['eval_every']})" + stop_mismatch(task["row"], raw)}
    raw = task["candidates"][0]
    return {"config": tc.row_config(config_from_dict(raw)),
            "config_check": f"reconstructed, not reproduced by today's code: first validation {task['stored']:.6f} stored, {'; '.join(tried)}" + stop_mismatch(task["row"], raw)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--stem", default=None)
    ap.add_argument("--sources", nargs="+", default=tc.DEFAULT_SOURCES, help="the sources of rows that do not record theirs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=None, help="only the rows of these methods (default: all)")
    args = ap.parse_args()
    path = tc.rows_path(args.name, args.stem)
    lines = path.read_text().splitlines()
    times = commit_times(path)
    rows = [json.loads(line) for line in lines]
    if len(times) != len(rows):
        sys.exit(f"{path}: {len(rows)} rows, {len(times)} committed at HEAD; commit the rows before a backfill")
    root = prepare_shared_data()
    tuned = tc.load_tuned(args.name)
    tmp = tempfile.mkdtemp(prefix="backfill-")
    tasks = {}
    for i, (row, when) in enumerate(zip(rows, times)):
        if "config" in row or (args.methods and row["method"] not in args.methods):
            continue
        for source in row.get("sources") or args.sources:
            if is_harmful(source):
                harmful_copy(root, source)
        stored = json.loads(Path(tc.detail_path(args.name, tc.key_of(row), args.stem)).read_text())["val_curve"][0][1]
        os.makedirs(f"{tmp}/{i}")
        tasks[i] = {"candidates": candidates(row, when, args, root, tuned), "stored": stored, "row": row, "method": row["method"], "seed": row["seed"],
                    "source_set": row.get("source_set"), "tmp": f"{tmp}/{i}"}
    cache = path.with_name(f".{path.stem}_backfill.jsonl")  # checks done so far: {"line": i, "key": ..., **result}
    done = [json.loads(line) for line in cache.read_text().splitlines()] if cache.exists() else []
    for d in done:
        if d["line"] in tasks and d["key"] == list(tc.key_of(rows[d["line"]])):
            del tasks[d["line"]]
            rows[d["line"]].update({k: d[k] for k in ("config", "config_check")})
    print(f"{len(tasks)} of {len(rows)} rows of {path} to give a config", file=sys.stderr, flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(check_row, task): i for i, task in tasks.items()}
        for future in as_completed(futures):
            i, result = futures[future], future.result()
            rows[i].update(result)
            with cache.open("a") as f:
                f.write(json.dumps({"line": i, "key": list(tc.key_of(rows[i])), **result}) + "\n")
            print(json.dumps({"method": rows[i]["method"], "seed": rows[i]["seed"], "source_set": rows[i].get("source_set"), "check": result["config_check"]}), flush=True)
    new = path.with_name(f".{path.name}.new")
    new.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(new, path)
    if all("config" in r for r in rows):
        cache.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
