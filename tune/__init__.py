"""Ray Tune sweeps for metarec (`metarec tune SPACE`): search-space files and the sweep driver.

This package is named `tune`; Ray Tune itself is imported as `from ray import tune as ray_tune`.
"""

from tune.space import SearchSpace, load_space
from tune.sweep import run_sweep

__all__ = ["SearchSpace", "load_space", "run_sweep"]
