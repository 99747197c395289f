"""A rough run-time projection on CPU, to warn before a run that would take hours.

Seconds per step are modelled from measurements on a 2-core x86_64 CPU (benchmarks/
results/transfer/transfer.md: LRURec 64x2 on amazon-video-games): a target batch of 128 windows
of 50 items costs about 0.5 s, and each MetaRec/joint source task about 0.67 s per
64 x 20 source window-items (second order included), both linear in batch x window.
That puts the reference metarec_video.yaml near the 10 s per step seen on such a
machine and its CPU-sized twin near 2.5 s. It ignores item counts, hidden size and
load: it is for "minutes or days?", not for planning.
"""

from __future__ import annotations

from pathlib import Path

from metarec.config import Config

TARGET_S_PER_WINDOW_ITEM = 0.5 / (128 * 50)
SOURCE_TASK_S_PER_WINDOW_ITEM = 0.67 / (64 * 20)
WARN_ABOVE_S = 3600.0


def seconds_per_step(cfg: Config) -> float:
    seconds = TARGET_S_PER_WINDOW_ITEM * cfg.train.batch_size * cfg.data.max_len
    if cfg.method != "target_only":
        source_batch = cfg.meta.source_batch_size or cfg.train.batch_size
        source_len = cfg.data.source_max_len or cfg.data.max_len
        seconds += cfg.meta.tasks_per_iter * SOURCE_TASK_S_PER_WINDOW_ITEM * source_batch * source_len
    return seconds


def projected_cpu_seconds(cfg: Config) -> float:
    """Training time of the full budget (`train.max_steps`) on a 2-core CPU, roughly."""
    return cfg.train.max_steps * seconds_per_step(cfg)


def cpu_time_warning(cfg: Config, config_path: str | None = None) -> str | None:
    """One line if the run trains on CPU and its projected time is over an hour, else None.

    Suggests `<config>_cpu.yaml` when one lies next to `config_path`."""
    import torch

    device = cfg.train.device
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return None  # a GPU run (whether this machine has the GPU is checked when the run starts)
    seconds = projected_cpu_seconds(cfg)
    if seconds <= WARN_ABOVE_S:
        return None
    advice = "lower train.max_steps (configs/*_cpu.yaml are CPU-sized)"
    if config_path is not None:
        path = Path(config_path)
        twin = path.with_name(f"{path.stem}_cpu{path.suffix}")
        if not path.stem.endswith("_cpu") and twin.is_file():
            advice = f"for a CPU-sized run use {twin}"
    return (f"warning: on CPU this run may take about {seconds / 3600:.0f} h ({cfg.train.max_steps} steps x "
            f"~{seconds_per_step(cfg):.1f} s on a 2-core machine); {advice}")
