"""`metarec tune` without Ray: a bad search space, override or metric is one clear error
before any trial (and before Ray starts); a space resolves its base config and `--set`;
a finished trial that a resume hands back is not run again."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from metarec.errors import ConfigError
from tune.space import load_space
from tune.sweep import run_sweep
from tune_files import N_EVALS, make_files, space_dict, write_yaml


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    return make_files(tmp_path_factory.mktemp("tune"))


@pytest.mark.parametrize(
    "params, key, words",
    [
        ({"rescale.taux": {"loguniform": [0.1, 1.0]}}, "rescale.taux", "unknown config key"),
        ({"rescale.tau": {"loguniform": [1.0, 1.0]}}, "rescale.tau", "empty range"),
        ({"train.lr": {"loguniform": [0.0, 1.0]}}, "train.lr", "positive"),
        ({"vq.heads": {"choice": [2, 3, 4, 5]}}, "vq.heads", "[3, 5] do not divide model.hidden=16"),
        ({"vq.heads": {"choice": []}}, "vq.heads", "non-empty"),
        ({"meta.inner_lr": {"lognormal": [0.1, 1.0]}}, "meta.inner_lr", "unknown distribution 'lognormal'"),
        ({"meta.inner_steps": {"uniform": [1, 3]}}, "meta.inner_steps", "integer"),
        ({"model.dropout": {"uniform": [0.1, 1.5]}}, "model.dropout", "less than 1"),  # a corner the config rejects
        ({"train.max_steps": {"choice": [10, 20]}}, "train.max_steps", "overrides"),
        ({"data.train_on_validation": {"choice": [False, True]}}, "data.train_on_validation", "ranked on items it trained on"),
    ],
)
def test_bad_space_is_rejected_before_any_trial(files, tmp_path, params, key, words):
    import ray

    space = write_yaml(tmp_path / "bad.yaml", space_dict(files["base"], params=params))
    store = tmp_path / "store"
    with pytest.raises(ConfigError) as err:
        run_sweep(space, storage_path=str(store))
    assert key in str(err.value) and words in str(err.value)
    assert not ray.is_initialized() and not store.exists()


def test_bad_overrides_and_metric_are_rejected(files, tmp_path):
    with pytest.raises(ConfigError, match="overrides: unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_space(write_yaml(tmp_path / "a.yaml", space_dict(files["base"], overrides={"train.max_step": 3})))
    with pytest.raises(ConfigError, match="metric 'NDCG@11'"):
        load_space(write_yaml(tmp_path / "b.yaml", space_dict(files["base"], metric="NDCG@11")))
    with pytest.raises(ConfigError, match="unknown key 'schedular'"):
        load_space(write_yaml(tmp_path / "c.yaml", space_dict(files["base"], schedular={})))


@pytest.mark.parametrize("where", ["overrides", "--set", "base config"])
def test_a_refit_cannot_be_searched(files, tmp_path, where):
    """data.train_on_validation trains on the validation items the sweep ranks trials by: refused, wherever it is set."""
    base = yaml.safe_load(Path(files["base"]).read_text())
    if where == "base config":
        base["data"]["train_on_validation"] = True
    space = space_dict(write_yaml(tmp_path / "base.yaml", base), **({"overrides": {"data.train_on_validation": True}} if where == "overrides" else {}))
    path = write_yaml(tmp_path / "space.yaml", space)
    sets = ["data.train_on_validation=true"] if where == "--set" else []
    with pytest.raises(ConfigError, match=r"data.train_on_validation is true: a refit trains on the validation items"):
        load_space(path, sets)
    load_space(path, ["data.train_on_validation=false"])  # the same space without the refit loads


def test_space_resolves_base_config_and_overrides(files):
    space = load_space(files["space"])
    assert space.base_config_path == files["base"]
    assert space.max_evaluations == N_EVALS
    cfg = space.config({"rescale.tau": 0.5, "vq.heads": 2})
    assert (cfg.rescale.tau, cfg.vq.heads, cfg.model.hidden) == (0.5, 2, 16)
    assert space.params["meta.inner_lr"].values == (1e-3, 1e-1)  # YAML's "1e-3" strings read as numbers


def test_a_finished_trial_handed_back_by_resume_is_not_run_again(files, tmp_path, monkeypatch):
    """An interrupt can land after a trial wrote its test metrics but before Tune saved
    that; `--resume` then hands the trial back, and it must not train or rewrite anything."""
    from types import SimpleNamespace

    from ray import tune as ray_tune

    from tune.sweep import metarec_trial, trial_run_dir

    run = Path(trial_run_dir(str(tmp_path), "t0"))
    (run / "checkpoints" / "best").mkdir(parents=True)
    (run / "metrics.json").write_text('{"test": {"NDCG@10": 0.5}}')
    before = {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in run.rglob("*")}
    monkeypatch.setattr(ray_tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t0"))
    monkeypatch.setattr(ray_tune, "get_checkpoint", lambda: pytest.fail("a finished trial must not restore a checkpoint"))
    metarec_trial({"rescale.tau": 0.5, "vq.heads": 2, "meta.inner_lr": 0.01, "train.lr": 1e-3}, space=load_space(files["space"]), experiment_uri=str(tmp_path))
    assert {p: (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None) for p in run.rglob("*")} == before


def test_set_overrides_the_trial_config_but_not_a_tuned_parameter(files):
    space = load_space(files["space"], ["train.max_steps=10", "train.eval_every=5"])
    assert space.base_config.train.max_steps == 10 and space.max_evaluations == 2
    assert space.config({"rescale.tau": 0.5, "vq.heads": 2}).train.max_steps == 10
    with pytest.raises(ConfigError, match=r"--set 'train.max_step=3': unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_space(files["space"], ["train.max_step=3"])
    with pytest.raises(ConfigError, match="'rescale.tau' is a tuned parameter"):
        load_space(files["space"], ["rescale.tau=0.5"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_space(files["space"], ["train.max_steps"])


def test_the_readme_small_budget_example_space_loads():
    """README: `metarec tune tune/spaces/cpu.yaml --num-samples 4 --set train.max_steps=100`."""
    space = load_space(Path(__file__).resolve().parent.parent / "tune" / "spaces" / "cpu.yaml", ["train.max_steps=100"])
    cfg = space.base_config
    assert cfg.train.max_steps == 100 and cfg.train.eval_every == 25 and space.max_evaluations == 4
    assert cfg.data.target_users == 2000 and cfg.train.device == "cpu"
