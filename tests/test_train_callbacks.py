"""The Trainer's one extension mechanism (docs/design.md §6): callbacks see each step in
order, every validation row once, and may add keys the run records; a strategy's shard
is the batch the step trains on and its sync_grads sees every gradient before the step."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metarec import launch
from metarec.callbacks import Callback
from metarec.checkpoint import load_checkpoint
from metarec.config import config_from_dict
from metarec.train import Trainer, train

STEPS, EVAL_EVERY = 7, 3  # validations after steps 3, 6 and the last, 7


def tiny_config(root: str, sources=(), **train_over):
    return config_from_dict({
        "name": "callbacks",
        "seed": 1,
        "data": {"root": root, "target": "target", "sources": list(sources), "max_len": 6},
        "model": {"hidden": 16, "blocks": 1},
        "train": {"batch_size": 8, "device": "cpu", "progress": False, "max_steps": STEPS, "eval_every": EVAL_EVERY,
                  "checkpoint_every": EVAL_EVERY, "patience": 10, **train_over},
        "vq": {"heads": 2},
        "meta": {"enabled": False, "tasks_per_iter": 2},
    })


class Recorder(Callback):
    """Records every call; tags each row in `on_step_row`; checks what `on_eval` may rely on."""

    def __init__(self):
        self.events: list[tuple] = []
        self.eval_rows: list[dict] = []

    def on_step_begin(self, step, trainer):
        self.events.append(("begin", step))

    def on_step_row(self, row, trainer):
        self.events.append(("row", row["step"], "val" in row))
        row["tag"] = f"seen-{row['step']}"

    def on_eval(self, row, trainer):
        assert trainer.state.history[-1] is row  # recorded before the callback runs
        step_dirs = dict(trainer.run.step_checkpoints())
        self.events.append(("eval", row["step"], row["step"] in step_dirs))
        self.eval_rows.append(json.loads(json.dumps(row)))

    def on_step_end(self, row, trainer):
        self.events.append(("end", row["step"]))


def test_callbacks_see_every_step_in_order_and_every_eval_row(tiny_domains, tmp_path):
    out = tmp_path / "run"
    first, second = Recorder(), Recorder()
    train(tiny_config(tiny_domains), str(out), callbacks=[first, second])
    want = []
    for step in range(STEPS):
        evaluated = (step + 1) % EVAL_EVERY == 0 or step + 1 == STEPS
        want += [("begin", step), ("row", step + 1, False)]
        want += [("eval", step + 1, (step + 1) % EVAL_EVERY == 0)] if evaluated else []  # step 7: no checkpoint due
        want += [("end", step + 1)]
    assert first.events == second.events == want
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert first.eval_rows == [r for r in history if "val" in r] and len(first.eval_rows) == 3
    assert [r["tag"] for r in history] == [f"seen-{s}" for s in range(1, STEPS + 1)]
    saved = load_checkpoint(str(out / "checkpoints" / "step-00000006")).state["run"]["history"]
    assert saved[-1]["step"] == 6 and saved[-1]["tag"] == "seen-6"  # keys added in on_step_row are checkpointed


class EveryOther:
    """A strategy: every other row of a batch; records what it shards and syncs."""

    def __init__(self):
        self.batches: list[np.ndarray] = []
        self.shards: list[np.ndarray] = []
        self.synced: list[tuple[int, int]] = []

    def shard(self, rows):
        self.batches.append(rows)
        self.shards.append(rows[::2])
        return self.shards[-1]

    def sync_grads(self, params, step):
        params = list(params)
        self.synced.append((step, sum(p.grad is not None for p in params)))


@pytest.mark.parametrize("sources", [(), ("src-a", "src-b")], ids=["target_only", "joint"])
def test_a_strategys_shard_is_the_batch_and_its_sync_sees_the_gradients(tiny_domains, sources):
    strategy = EveryOther()
    trainer = Trainer.from_config(tiny_config(tiny_domains, sources), "unused", strategy=strategy)
    batched = []
    for windows in trainer.problem.windows.values():
        real = windows.batch
        windows.batch = lambda rows, real=real: batched.append(rows) or real(rows)
    for step in range(2):
        trainer.step(step)
    tasks = 1 if not sources else trainer.cfg.meta.tasks_per_iter
    assert len(strategy.shards) == 2 * tasks * (1 if not sources else 2)  # target rows (+ each task's source rows)
    assert sorted(map(id, batched)) == sorted(map(id, strategy.shards))  # the step trains on the shards, nothing else
    assert all(len(s) == (len(b) + 1) // 2 and len(b) > 1 for b, s in zip(strategy.batches, strategy.shards))
    with_grad = sum(p.requires_grad for p in trainer.model.parameters())
    assert [step for step, _ in strategy.synced] == [0, 1] and all(0 < n <= with_grad for _, n in strategy.synced)


def test_callbacks_are_refused_where_the_loop_runs_on_ray_train_workers(tiny_domains, tmp_path):
    with pytest.raises(ValueError, match="Ray Train workers"):
        launch.run(tiny_config(tiny_domains), str(tmp_path / "run"), "ray_train", callbacks=[Callback()])
    assert not (tmp_path / "run").exists()
