"""The private Ray APIs sit behind one version check (metarec/ray/private.py) that agrees
with pyproject.toml's bound on ray; an untested Ray is one clear line, not a crash inside Ray."""

import re
from pathlib import Path

import pytest
import ray

from metarec.ray.private import TESTED_RAY, UntestedRayError, check_ray_version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_the_installed_ray_is_a_tested_one():
    check_ray_version()  # raises if not
    check_ray_version(ray.__version__)


@pytest.mark.parametrize("version", ["2.50.0", "2.55.3", "2.60.0", "2.60.9"])
def test_tested_versions_pass(version):
    check_ray_version(version)


@pytest.mark.parametrize("version", ["2.61.0", "3.0.0", "2.49.1", "nightly"])
def test_an_untested_ray_is_one_line_naming_the_fix(version):
    with pytest.raises(UntestedRayError) as err:
        check_ray_version(version)
    message = str(err.value)
    assert "\n" not in message and f"Ray {version} is not one metarec was tested with" in message
    assert "ray[default,train,tune]>=2.50,<2.61" in message


def test_pyproject_bounds_ray_where_the_check_does():
    (lo_major, lo_minor), (hi_major, hi_minor) = TESTED_RAY
    spec = re.search(r'"ray\[default,train,tune\]([^"]+)"', PYPROJECT.read_text()).group(1)
    assert spec == f">={lo_major}.{lo_minor},<{hi_major}.{hi_minor + 1}"
