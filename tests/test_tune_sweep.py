"""`metarec tune` on Ray: a 4-trial ASHA sweep on tiny synthetic data that is
interrupted (Ctrl-C) after a trial has finished and resumed, and its best config.

The sweep runs through the CLI in a subprocess (it must be interruptible); trials run one
at a time so that the interruption always finds finished and unfinished trials.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from metarec.errors import ConfigError
from tune.sweep import run_sweep
from tune_files import EVAL_EVERY, METAREC, N_EVALS, N_TRIALS, make_files, space_dict, write_yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HANG_GUARD_S = 1800  # subprocess limits only catch a hung sweep; a loaded machine may take minutes


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return make_files(tmp_path_factory.mktemp("tune"))


def _result_steps(trial_dir: Path) -> list[int]:
    """Validation steps Tune has logged for a trial (complete lines of its result.json)."""
    path = trial_dir / "result.json"
    return [json.loads(line)["step"] for line in path.read_text().split("\n")[:-1]] if path.exists() else []


def _val_steps(run_dir: Path) -> list[int]:
    """Validation steps of a trial's run, from its history.jsonl (final once metrics.json exists)."""
    path = run_dir / "history.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["step"] for r in rows if "val" in r]


def _finished_trials(experiment: Path) -> dict[str, tuple[list[int], int]]:
    """Trials that wrote metrics.json *and* whose every report Tune has logged: their
    reported steps and metrics.json's mtime.

    A trial writes metrics.json right after its last report, while the driver may not
    have logged that report yet; such a trial is not finished for the test until it has.
    """
    finished = {}
    for d in experiment.iterdir():
        metrics = d / "run" / "metrics.json"
        if not metrics.exists():
            continue
        steps = _result_steps(d)
        if steps and set(steps) >= set(_val_steps(d / "run")):
            finished[d.name] = (steps, metrics.stat().st_mtime_ns)
    return finished


def _running_trials(experiment: Path, finished: dict) -> list[str]:
    return [d.name for d in experiment.iterdir() if d.is_dir() and d.name not in finished and _result_steps(d)]


@pytest.fixture(scope="module")
def sweep(files) -> dict:
    """Run the sweep, Ctrl-C it once a trial has finished, resume it; what the tests check."""
    experiment = Path(files["store"]) / "s"
    cmd = [*METAREC, "tune", files["space"], "--storage-path", files["store"], "--name", "s"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait until a trial has finished (all its reports logged) and the next one has reported.
    # Trials run one at a time, so Tune has then recorded the finished one as terminated, and
    # Ctrl-C catches the next one mid-run (unless ASHA has just stopped it). The test waits for
    # that state, not for a time; the deadline only keeps a hung sweep from hanging the suite.
    deadline, finished = time.time() + HANG_GUARD_S, {}
    while first.poll() is None and time.time() < deadline:
        finished = _finished_trials(experiment) if experiment.exists() else {}
        if finished and _running_trials(experiment, finished):
            break
        time.sleep(0.1)
    assert first.poll() is None, "the sweep ended before it could be interrupted:\n" + first.stdout.read()[-3000:]
    assert finished, "no trial finished in time"
    before = {d.name: _result_steps(d) for d in experiment.iterdir() if d.is_dir()}
    first.send_signal(signal.SIGINT)
    out1, _ = first.communicate(timeout=HANG_GUARD_S)
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return {
        "experiment": experiment,
        "interrupted": (first.returncode, out1),
        "before": before,
        "finished_before": finished,
        "rows": json.loads((experiment / "results.json").read_text()),
        "summary_out": resumed.stdout,
    }


def test_interrupted_sweep_says_how_to_resume(sweep):
    code, out = sweep["interrupted"]
    assert code == 2 and "sweep interrupted" in out and "--resume" in out


def test_resumed_sweep_finishes_every_trial_without_rerunning(sweep):
    experiment, rows = sweep["experiment"], sweep["rows"]
    assert len(rows) == N_TRIALS and all(r["status"] != "error" for r in rows)
    for row in rows:
        steps, before = _result_steps(experiment / row["trial_id"]), sweep["before"].get(row["trial_id"], [])
        assert steps[: len(before)] == before  # nothing lost
        # A trial caught mid-run continues from its last checkpoint that Tune had registered:
        # at most its last evaluation (reported, checkpoint not yet registered) is done again; it never starts over.
        backs = [(a, b) for a, b in zip(steps, steps[1:]) if b <= a]
        assert len(backs) <= 1 and all(a == b for a, b in backs), f"{row['trial_id']} went back: {steps}"
        assert sorted(set(steps)) == [EVAL_EVERY * (i + 1) for i in range(row["evals"])]
        assert row["test"] is not None and 0.0 <= row["test"]["NDCG@10"] <= 1.0
    for trial_id, (steps, mtime) in sweep["finished_before"].items():  # finished before Ctrl-C: not run again
        assert _result_steps(experiment / trial_id) == steps
        assert (experiment / trial_id / "run" / "metrics.json").stat().st_mtime_ns == mtime


@pytest.fixture(scope="module")
def uninterrupted_rows(files) -> list[dict]:
    """The same seeded sweep run straight through: ASHA's decisions do not depend on
    where an interruption happened to fall (a resumed trial re-enters its rung)."""
    store = Path(files["tmp"]) / "store-straight"
    res = subprocess.run([*METAREC, "tune", files["space"], "--storage-path", str(store), "--name", "straight"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return {"rows": json.loads((store / "straight" / "results.json").read_text()), "stderr": res.stderr}


def test_asha_stopped_a_trial_early(uninterrupted_rows):
    rows = uninterrupted_rows["rows"]
    stopped = [r for r in rows if r["status"] == "stopped early"]
    completed = [r for r in rows if r["status"] == "completed"]
    assert stopped and completed
    assert any(r["evals"] < N_EVALS for r in stopped)  # cut short, not only at the last rung
    for r in stopped:
        assert r["evals"] <= N_EVALS
        assert not Path(r["run_dir"], "metrics.json").exists()
        assert r["test_source"].startswith("best checkpoint")
    for r in completed:
        assert r["evals"] == N_EVALS and r["test_source"] == "metrics.json"


def test_sweep_prints_a_line_per_trial_report(uninterrupted_rows):
    rows, err = uninterrupted_rows["rows"], uninterrupted_rows["stderr"]
    for r in rows:
        lines = [line for line in err.splitlines() if line.startswith(f"trial {r['trial_id']} step ")]
        assert len(lines) == r["evals"], (r["trial_id"], lines)
        assert lines[0].startswith(f"trial {r['trial_id']} step {EVAL_EVERY}: val NDCG@10 ")
        assert f"tau={r['params']['rescale.tau']:.3g}" in lines[0]
        assert f"trial {r['trial_id']} done" in err


def test_outputs_and_best_config_trains(sweep, tmp_path):
    experiment, rows = sweep["experiment"], sweep["rows"]
    best = max(rows, key=lambda r: r["best_val_NDCG@10"])
    history = [json.loads(line) for line in Path(best["run_dir"], "history.jsonl").read_text().splitlines()]
    assert best["best_val_NDCG@10"] == max(r["val"]["NDCG@10"] for r in history if "val" in r)
    md = (experiment / "results.md").read_text()
    assert all(f"| {r['trial_id']} |" in md for r in rows)
    assert (experiment / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads(sweep["summary_out"][sweep["summary_out"].rindex("\n{") :])
    assert summary["best_trial"] == best["trial_id"] and summary["trials"] == N_TRIALS

    best_config = experiment / "best_config.yaml"
    tuned = yaml.safe_load(best_config.read_text())
    for key, value in best["params"].items():
        section, leaf = key.split(".")
        assert tuned[section][leaf] == value
    out = tmp_path / "best_run"
    run = subprocess.run([*METAREC, "train", str(best_config), "--out", str(out), "--set", "train.max_steps=5"], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 5


def test_existing_sweep_needs_resume_and_resume_needs_a_sweep(sweep, files, tmp_path):
    with pytest.raises(ConfigError, match="already holds a sweep"):
        run_sweep(files["space"], storage_path=files["store"], name="s")
    with pytest.raises(ConfigError, match="no sweep to resume"):
        run_sweep(files["space"], storage_path=str(tmp_path), name="s", resume=True)


def test_ray_runner_trial_places_its_workers_in_the_trial_placement_group(files, tmp_path):
    """runner: ray reserves 1 driver + ray.num_workers worker bundles; on 2 CPUs the trial can
    only finish if its SourceTaskWorker actors run inside that placement group."""
    space = write_yaml(tmp_path / "ray.yaml", space_dict(files["base"], name="ray_runner", num_samples=1, runner="ray",
                                               overrides={"ray.num_workers": 1}))
    run = subprocess.run([*METAREC, "tune", space, "--storage-path", str(tmp_path / "store"), "--set", "train.max_steps=10"],
                         capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (row,) = json.loads((tmp_path / "store" / "ray_runner" / "results.json").read_text())
    assert row["status"] == "completed" and row["evals"] == 2  # --set train.max_steps=10 reached the trial
    assert "Logical resource usage: 2.0/" in run.stdout


