"""Bad inputs, second round: each is one `error:` line (exit 2) naming what and where,
and nothing is half-written."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from metarec import fs
from metarec.cli import cli


def invoke(*args) -> "CliRunner.invoke":
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_error_line(output: str, *fragments: str) -> str:
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def config(tmp_path: Path, root: str, **train) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({
        "name": "bad", "data": {"root": root, "target": "target"}, "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": 4, "eval_every": 2, **train},
    }))
    return path


def leftovers(run: Path) -> list[str]:
    return sorted(str(p.relative_to(run)) for p in run.rglob(".*") if p.name != ".lock") if run.exists() else []


# ---------------------------------------------------------------- config files


@pytest.mark.parametrize("text, got", [("- a\n- b\n", "got a list"), ("hello\n", "got 'hello'"), ("3\n", "got 3")])
def test_a_config_whose_top_level_is_not_a_mapping_is_refused(tmp_path, text, got):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    for extra in ([], ["--set", "train.lr=0.1"]):
        result = invoke("train", path, "--out", tmp_path / "run", *extra)
        assert result.exit_code == 2
        one_error_line(result.output, str(path), "expected a mapping", got)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, line", [
    ("name: a\ndata:\n  target: t\ntrain:\n  lr: 0.1\n  lr: 0.2\n", "line 6, column 3: duplicate key 'lr' (first on line 5)"),
    ("name: a\nname: b\ndata: {target: t}\n", "line 2, column 1: duplicate key 'name' (first on line 1)"),
    ("name: a\ndata: {target: t, target: u}\n", "line 2, column 19: duplicate key 'target' (first on line 2)"),
])
def test_duplicate_yaml_keys_are_refused_with_their_line(tmp_path, text, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    result = invoke("train", path, "--out", tmp_path / "run")
    assert result.exit_code == 2
    one_error_line(result.output, str(path), line)


def test_yaml_merge_keys_are_not_duplicates():
    from metarec.config import load_yaml

    assert load_yaml("a: &x {b: 1}\nc:\n  <<: *x\n  d: 2\n") == {"a": {"b": 1}, "c": {"b": 1, "d": 2}}


@pytest.mark.parametrize("key", ["train.lr", "train.max_steps", "model.hidden", "meta.persist_shared", "data.target_users"])
def test_a_boolean_is_not_a_number(tmp_path, tiny_domains, key):
    result = invoke("train", config(tmp_path, tiny_domains), "--out", tmp_path / "run", "--set", f"{key}=true")
    assert result.exit_code == 2
    one_error_line(result.output, f"invalid value for '{key}': expected a number, not a boolean (got True)")
    assert not (tmp_path / "run").exists()


def test_booleans_still_set_boolean_keys(tmp_path, tiny_domains):
    from metarec.config import load_config

    cfg = load_config(config(tmp_path, tiny_domains), ["train.progress=true", "vq.enabled=false", "train.lr=1"])
    assert (cfg.train.progress, cfg.vq.enabled, cfg.train.lr) == (True, False, 1.0)


# ---------------------------------------------------------------- locations


@pytest.mark.parametrize("where", ["out", "root", "evaluate"])
def test_an_unknown_uri_scheme_is_one_line(tmp_path, tiny_domains, where):
    cfg = config(tmp_path, tiny_domains)
    if where == "out":
        result = invoke("train", cfg, "--out", "ab://x/y")
    elif where == "root":
        result = invoke("train", cfg, "--out", tmp_path / "run", "--set", "data.root=ab://x")
    else:
        result = invoke("evaluate", "ab://x/y")
    assert result.exit_code == 2
    one_error_line(result.output, "ab://x", "not a usable location")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- writes that fail


def _limit_file_size(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_file_too_large_names_the_file_and_writes_nothing_half(tmp_path, tiny_domains):
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "metarec.cli", "train", str(config(tmp_path, tiny_domains)), "--out", str(run)],
                         preexec_fn=_limit_file_size(20_000), capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 2, res.stderr
    line = one_error_line(res.stderr, "file too large", "tensors.safetensors")
    assert str(run / "checkpoints") in line
    assert leftovers(run) == [] and not (run / "checkpoints" / "best").exists()


def test_a_full_disk_reported_without_a_file_name_gets_one(tmp_path, monkeypatch):
    """pyarrow's write errors carry no file name ("Error writing bytes to file. Detail: [errno 28] ...")."""
    from metarec.errors import describe_os_error

    class Stream:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    class Full:
        def create_dir(self, path, recursive=True):
            pass

        def open_output_stream(self, path, compression=None):
            return Stream()

    monkeypatch.setattr(fs, "resolve", lambda location: (Full(), str(location)))
    with pytest.raises(OSError) as err:
        fs.write_bytes(str(tmp_path / "history.jsonl"), b"x")
    assert describe_os_error(err.value).startswith(f"disk full (no space left on device) while writing '{tmp_path / 'history.jsonl'}'")


# ---------------------------------------------------------------- resume of finished runs


def snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.rglob("*")) if p.is_file()}


def test_resume_of_an_early_stopped_run_says_it_is_finished_and_changes_nothing(tmp_path, tiny_domains):
    cfg = config(tmp_path, tiny_domains, max_steps=200, eval_every=1, patience=1, checkpoint_every=1, lr=1.0)
    run = tmp_path / "run"
    first = invoke("train", cfg, "--out", run)
    assert first.exit_code == 0, first.output
    assert "early stop at step" in first.output
    before = snapshot(run)
    again = invoke("train", cfg, "--out", run, "--resume")
    assert again.exit_code == 2
    one_error_line(again.output, "the run has finished: it stopped early at step", "nothing was changed")
    assert snapshot(run) == before
    longer = invoke("train", cfg, "--out", run, "--resume", "--set", "train.max_steps=300")  # still early-stopped
    assert longer.exit_code == 2 and snapshot(run) == before


def test_resume_of_a_run_finished_at_max_steps_changes_nothing(tmp_path, tiny_domains):
    cfg = config(tmp_path, tiny_domains, checkpoint_every=2)
    run = tmp_path / "run"
    assert invoke("train", cfg, "--out", run).exit_code == 0
    before = snapshot(run)
    again = invoke("train", cfg, "--out", run, "--resume")
    assert again.exit_code == 2
    one_error_line(again.output, "the run has finished (4 of train.max_steps=4 steps)")
    assert snapshot(run) == before


def test_resume_with_max_steps_below_the_steps_done_is_refused(tmp_path, tiny_domains):
    cfg = config(tmp_path, tiny_domains, max_steps=8, checkpoint_every=2)
    run = tmp_path / "run"
    assert invoke("train", cfg, "--out", run).exit_code == 0
    (run / "metrics.json").unlink()  # as if killed after its last step
    before = snapshot(run)
    for max_steps in (2, 6, 7):
        result = invoke("train", cfg, "--out", run, "--resume", "--set", f"train.max_steps={max_steps}")
        assert result.exit_code == 2
        one_error_line(result.output, f"train.max_steps={max_steps}", "already done 8 steps")
        assert snapshot(run) == before
    assert invoke("train", cfg, "--out", run, "--resume").exit_code == 0  # 8 steps: finishes it
    assert (run / "metrics.json").exists()


# ---------------------------------------------------------------- model size


def test_model_hidden_has_a_sane_range(tmp_path, tiny_domains):
    from metarec.config import MAX_HIDDEN

    result = invoke("train", config(tmp_path, tiny_domains), "--out", tmp_path / "run", "--set", "model.hidden=65536")
    assert result.exit_code == 2
    one_error_line(result.output, "invalid value for 'model.hidden'", f"less than or equal to {MAX_HIDDEN}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: you tried to allocate 17179869184 bytes."),
    MemoryError(),
])
def test_a_model_that_cannot_be_allocated_is_one_line(tmp_path, tiny_domains, monkeypatch, error):
    import metarec.problem

    def no_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(metarec.problem, "Recommender", no_memory)
    result = invoke("train", config(tmp_path, tiny_domains), "--out", tmp_path / "run", "--set", "model.hidden=4096")
    assert result.exit_code == 2
    one_error_line(result.output, "model.hidden=4096, model.blocks=1: cannot allocate the model on cpu")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- interaction tables


def prepare(src: Path, out: Path, *extra):
    return invoke("prepare", src, "--format", "interactions", "--name", "d", "--out", out, *extra)


def prepared_rows(out: Path) -> dict[str, tuple[list[int], list[int]]]:
    import pyarrow.parquet as pq

    table = pq.read_table(out / "d" / "data.parquet").to_pylist()
    return {r["user"]: (r["items"], r["timestamps"]) for r in table}


def test_plain_iso_dates_are_timestamps(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text("user,item,timestamp\nu1,i1,2024-01-03\nu1,i2,2024-01-01\nu1,i3,2024-01-02\nu2,i1,2024-01-01\n")
    result = prepare(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    day = 86400
    items, stamps = prepared_rows(tmp_path / "out")["u1"]
    assert stamps == [1704067200, 1704067200 + day, 1704067200 + 2 * day]  # sorted by date: i2, i3, i1
    assert len(set(items)) == 3


def test_a_column_mixing_epoch_seconds_and_iso_times_is_read_and_a_bad_value_is_the_one_blamed(tmp_path):
    src = tmp_path / "m.csv"
    src.write_text("user,item,timestamp\nu1,i1,1700000000\nu1,i2,2024-01-02T00:00:00\nu1,i3,1700000002\nu2,i1,1700000000\n")
    result = prepare(src, tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert prepared_rows(tmp_path / "out")["u1"][1] == [1700000000, 1700000002, 1704153600]
    src.write_text("user,item,timestamp\nu1,i1,1700000000\nu1,i2,2024-01-02T00:00:00\nu1,i3,yesterday\nu2,i1,1700000000\n")
    result = prepare(src, tmp_path / "out2")
    assert result.exit_code == 2
    one_error_line(result.output, "row 3: timestamp 'yesterday'")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_timestamp_is_refused(tmp_path, bad):
    import warnings

    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "d.parquet"
    pq.write_table(pa.table({"user": ["u1", "u1", "u1", "u2"], "item": ["a", "b", "c", "a"], "timestamp": [1.0, bad, 3.0, 1.0]}), src)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy warning leaks either
        result = prepare(src, tmp_path / "out")
    assert result.exit_code == 2
    one_error_line(result.output, f"row 2: timestamp {bad} in column 'timestamp' is not a finite number")
    assert not (tmp_path / "out" / "d").exists()


@pytest.mark.parametrize("data, raw", [
    ("user,item,timestamp\nu1,i1,1\nu1,i2,2,\x1b]0;pwned\x07\n".encode(), ["\x1b", "\x07"]),
    ("user,item,timestamp\nu1,i1,1\nu1,i2,2,x\n".encode("utf-16"), ["\x00"]),
])
def test_csv_parse_errors_reach_the_terminal_escaped(tmp_path, data, raw):
    src = tmp_path / "d.csv"
    src.write_bytes(data)
    result = prepare(src, tmp_path / "out")
    assert result.exit_code == 2
    line = one_error_line(result.output, "d.csv")
    assert not any(c in result.output for c in raw), repr(line)
    assert all(c.isprintable() for c in line)


# ---------------------------------------------------------------- the data a run was trained on


def test_a_run_names_its_data_absolutely_and_refuses_other_data(tmp_path, tiny_domains, monkeypatch):
    import json
    import shutil

    from metarec.data.synthetic import generate_domains

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_domains, work / "prepared")
    monkeypatch.chdir(work)
    cfg = config(work, "prepared", checkpoint_every=2)  # a relative data.root, like the default
    assert invoke("train", cfg, "--out", "run").exit_code == 0
    run = work / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["root"] == str(work / "prepared")
    test = json.loads((run / "metrics.json").read_text())["test"]

    elsewhere = tmp_path / "elsewhere"  # another directory, with its own (other) ./prepared
    generate_domains(elsewhere / "prepared", names=("target",), n_users={"target": 40}, n_items={"target": 32},
                     seq_len={"target": 6}, n_concepts=8, seed=7)
    monkeypatch.chdir(elsewhere)
    evaluated = invoke("evaluate", run)
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output[evaluated.output.index("{"):]) == test  # the run's own data

    # The data under the run's root prepared again (other content): refused by every reader.
    shutil.rmtree(work / "prepared" / "target")
    shutil.copytree(elsewhere / "prepared" / "target", work / "prepared" / "target")
    (run / "metrics.json").unlink()
    before = snapshot(run)
    for args in (["evaluate", run], ["recommend", run, "--history", "1 2 3"]):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        one_error_line(result.output, "the run was trained on other data: domain 'target' had sha256")
    resumed = invoke("train", cfg, "--out", run, "--resume")  # from elsewhere, ./prepared is another root
    assert resumed.exit_code == 2
    one_error_line(resumed.output, "cannot resume with a changed config (data.root: ")
    monkeypatch.chdir(work)  # the same root, whose data changed
    resumed = invoke("train", cfg, "--out", run, "--resume")
    assert resumed.exit_code == 2
    one_error_line(resumed.output, "the run was trained on other data: domain 'target' had sha256")
    assert snapshot(run) == before


# ---------------------------------------------------------------- checkpoint integrity


def flip_a_byte(path: Path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x01  # inside the last tensor's bytes: still a valid safetensors file
    path.write_bytes(bytes(data))


def test_flipped_weights_in_best_are_refused(tmp_path, tiny_domains):
    run = tmp_path / "run"
    assert invoke("train", config(tmp_path, tiny_domains), "--out", run).exit_code == 0
    flip_a_byte(run / "checkpoints" / "best" / "tensors.safetensors")
    for args in (["evaluate", run], ["recommend", run, "--history", "1 2 3"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        one_error_line(result.output, "best/tensors.safetensors: sha256 does not match the one state.json records")


def test_a_corrupted_newest_step_checkpoint_falls_back_to_the_previous_one(tmp_path, tiny_domains):
    import json

    cfg = config(tmp_path, tiny_domains, max_steps=8, checkpoint_every=2)
    straight, run = tmp_path / "straight", tmp_path / "run"
    assert invoke("train", cfg, "--out", straight).exit_code == 0
    assert invoke("train", cfg, "--out", run, "--set", "train.max_steps=6").exit_code == 0
    flip_a_byte(run / "checkpoints" / "step-00000006" / "tensors.safetensors")
    with pytest.warns(UserWarning, match="step-00000006/tensors.safetensors: sha256 does not match"):
        result = invoke("train", cfg, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output and "at step 4" in result.output
    assert json.loads((run / "metrics.json").read_text())["test"] == json.loads((straight / "metrics.json").read_text())["test"]


def test_the_scratch_folder_a_killed_ray_train_driver_left_is_removed_by_the_next_start(tmp_path, tiny_domains):
    cfg = config(tmp_path, tiny_domains, max_steps=4, checkpoint_every=2)
    run = tmp_path / "run"
    assert invoke("train", cfg, "--out", run, "--set", "train.max_steps=2").exit_code == 0
    scratch = run / f".ray-train-scratch.tmp-{'d' * 32}"
    (scratch / "rank1-x" / "checkpoints").mkdir(parents=True)
    (scratch / f"pg-{'e' * 32}").write_text("")
    result = invoke("train", cfg, "--out", run, "--resume")
    assert result.exit_code == 0, result.output
    assert not scratch.exists() and "removed 1 stale temp entry" in result.output
