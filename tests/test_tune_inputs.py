"""`metarec tune` inputs refused before Ray starts or anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from metarec.cli import cli
from test_tune_seal import _space


def _files(tmp: Path) -> list[Path]:
    return sorted(p for p in tmp.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", ["../escaped", "/tmp/abs-experiment", "a/b", ".hidden", ""])
def test_an_experiment_name_is_one_path_component(tmp_path, tiny_domains, name):
    import ray

    space = _space(tmp_path, tiny_domains)
    before = _files(tmp_path)
    for args in (["--name", name], []):
        if not args:  # the space file's own name
            raw = yaml.safe_load(Path(space).read_text())
            Path(space).write_text(yaml.safe_dump({**raw, "name": name}))
            before = _files(tmp_path)
        result = CliRunner().invoke(cli, ["tune", space, "--storage-path", str(tmp_path / "store"), *args])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1 and "an experiment name is one directory under the storage path" in lines[0], result.output
        assert _files(tmp_path) == before and not (tmp_path / "store").exists()
    assert not Path("/tmp/abs-experiment").exists() and not (tmp_path / "escaped").exists()
    assert not ray.is_initialized()


@pytest.mark.parametrize("command", ["train", "tune"])
def test_a_local_ray_without_token_auth_is_refused(tmp_path, tiny_domains, monkeypatch, command):
    import ray

    from test_bad_inputs_2 import config

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if command == "train":
        args = ["train", str(config(tmp_path, tiny_domains)), "--ray", "--out", str(tmp_path / "run"), "--set", "data.sources=[src-a, src-b]"]
    else:
        args = ["tune", _space(tmp_path, tiny_domains), "--storage-path", str(tmp_path / "store")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert lines == ["error: RAY_AUTH_MODE='disabled': metarec does not start a local Ray instance without token authentication "
                     "(any local process could run code in it); unset RAY_AUTH_MODE or set it to token"], result.output
    assert not ray.is_initialized() and not (tmp_path / "run").exists() and not (tmp_path / "store").exists()
