import json
from pathlib import Path

import pytest

from metarec.config import apply_overrides, config_from_dict, load_config
from metarec.errors import ConfigError


def base():
    return {"data": {"root": "/tmp/x", "target": "t", "sources": ["a", "b"]}}


def test_defaults_and_method():
    cfg = config_from_dict(base())
    assert cfg.model.backbone == "lru" and cfg.rescale.direction == "source_descent"
    assert cfg.method == "metarec" and cfg.train.lr == 2.7e-3
    raw = base()
    raw["data"]["sources"] = []
    assert config_from_dict(raw).train.lr == 1e-3  # target-only's own default learning rate
    raw["train"] = {"lr": 5e-4}
    assert config_from_dict(raw).train.lr == 5e-4
    raw = base()
    raw["meta"] = {"enabled": False}
    assert config_from_dict(raw).method == "joint"
    raw["data"]["sources"] = []
    assert config_from_dict(raw).method == "target_only"


def test_unknown_key_names_it_and_suggests_nearest():
    raw = base()
    raw["rescale"] = {"tua": 0.5}
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "my.yaml")
    msg = str(e.value)
    assert "my.yaml" in msg and "rescale.tua" in msg and "rescale.tau" in msg


def test_unknown_top_level_section():
    raw = base()
    raw["trian"] = {"lr": 1}
    with pytest.raises(ConfigError, match=r"'trian'.*'train'"):
        config_from_dict(raw)


def test_target_listed_as_source_is_rejected():
    raw = base()
    raw["data"]["sources"] = ["a", "t"]
    with pytest.raises(ConfigError, match="target 't' is also listed as a source"):
        config_from_dict(raw)


def test_heads_must_divide_hidden():
    raw = base()
    raw["vq"] = {"heads": 3}
    with pytest.raises(ConfigError, match="vq.heads"):
        config_from_dict(raw)


def test_overrides_are_validated_like_file_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  root: r\n  target: t\n")
    cfg = load_config(path, ["train.lr=3e-4", "vq.heads=2", "data.sources=[a]"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.vq.heads == 2 and cfg.data.sources == ["a"]
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(path, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["train.lr"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)


REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("entry, sources", [("metarec_tuned", True), ("lru_target_only_tuned", False)])
def test_a_config_naming_only_the_data_trains_with_the_searched_settings(entry, sources):
    """The defaults are the amazon-scientific searches' choices (rounded to two digits)."""
    searched = json.loads((REPO / "benchmarks/results/scientific/scientific_tuned.json").read_text())[entry]["overrides"]
    cfg = load_config(REPO / "configs/scientific/defaults.yaml", [] if sources else ["data.sources=[]"])
    assert cfg.method == ("metarec" if sources else "target_only")
    for key, value in searched.items():
        section, name = key.split(".")
        got = getattr(getattr(cfg, section), name)
        assert got == (pytest.approx(value, rel=0.02) if isinstance(value, float) else value), key
