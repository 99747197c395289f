"""One stderr line per trial report of a `metarec tune` sweep, and one per finished trial.

Ray's status tables say which trials run; these lines say how each is doing, as soon as
it reports (after every validation of its run), e.g.

    trial 3f2a_00001 step 250: val NDCG@10 0.01234 (best 0.01301 @ 125) tau=0.31 heads=4 ...
"""

from __future__ import annotations

import sys
from typing import Any

from ray.tune import Callback


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _value(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def report_line(trial_id: str, result: dict[str, Any], metric: str, params: dict[str, Any]) -> str:
    best, best_step = result.get(f"best_{metric}"), result.get("best_step")
    line = f"trial {trial_id} step {result.get('step')}: val {metric} {result.get(metric, float('nan')):.5f}"
    if best is not None:
        line += f" (best {best:.5f} @ {best_step})"
    return line + "".join(f" {_short(k)}={_value(v)}" for k, v in params.items())


class TrialProgress(Callback):
    """Prints `report_line` for every trial result and a line when a trial ends."""

    def __init__(self, metric: str, param_keys: list[str]):
        self.metric = metric
        self.param_keys = list(param_keys)

    def _params(self, trial) -> dict[str, Any]:
        return {k: trial.config.get(k) for k in self.param_keys if k in trial.config}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(report_line(trial.trial_id, result, self.metric, self._params(trial)), file=sys.stderr, flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} done", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"trial {trial.trial_id} failed (see its error.txt)", file=sys.stderr, flush=True)
