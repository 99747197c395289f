"""`metarec plot`: PNG figures of a run directory's training history.

- `training_curves.png`: training losses vs step (raw, faint, and a rolling mean) and
  validation NDCG@10 vs step with the best step marked;
- `source_weights.png` (MetaRec runs only): heatmap of the per-source softmax weights
  w_i (docs/design.md §4 step 5, averaged per source by the trainer) over iterations, binned
  into at most `MAX_HEATMAP_COLUMNS` columns (colour = mean weight in the bin; grey =
  source not sampled in that bin).

matplotlib (a base dependency) is imported lazily, all of it in `_matplotlib()` before
anything is drawn, so an environment without it gets one MetaRecError (one line, exit
status 2 from the CLI) instead of a traceback. Figures are drawn through the Agg canvas
directly (no pyplot, no global backend switch), and the PNG bytes are written with
`metarec.fs`, so the run directory may be local or `s3://`.
"""

from __future__ import annotations

import io
from types import SimpleNamespace
from typing import Any

import numpy as np

from metarec import fs
from metarec.errors import MetaRecError

CURVES_FILE = "training_curves.png"
WEIGHTS_FILE = "source_weights.png"
LOSS_KEYS = ("loss", "target_loss", "source_loss", "vq_loss")
VAL_METRIC = "NDCG@10"
MAX_HEATMAP_COLUMNS = 100


MISSING_MATPLOTLIB = "plotting needs matplotlib, which is not importable here: pip install matplotlib (or 'metarec[plot]')"


def _matplotlib() -> SimpleNamespace:
    """Every matplotlib name the figures use; MetaRecError (one line) if matplotlib is missing."""
    try:
        from matplotlib import colormaps
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise MetaRecError(MISSING_MATPLOTLIB) from None
    return SimpleNamespace(colormaps=colormaps, FigureCanvasAgg=FigureCanvasAgg, Figure=Figure, MaxNLocator=MaxNLocator)


def _figure(width: float, height: float):
    """An Agg-backed Figure."""
    mpl = _matplotlib()
    fig = mpl.Figure(figsize=(width, height), dpi=110, layout="constrained")
    mpl.FigureCanvasAgg(fig)
    return fig


def loss_series(rows: list[dict[str, Any]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (steps, values) of every loss the rows report; `loss` is left out where it
    only repeats `target_loss` (target-only runs)."""
    series = {}
    for key in LOSS_KEYS:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            steps, values = np.array(points, dtype=np.float64).T
            series[key] = (steps, values)
    if "loss" in series and all(r.get("loss") == r.get("target_loss") for r in rows if "loss" in r):
        del series["loss"]
    return series


def rolling_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` values at each position (fewer at the start)."""
    sums = np.cumsum(np.concatenate(([0.0], values)))
    ends = np.arange(1, values.size + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def weight_matrix(rows: list[dict[str, Any]], max_columns: int = MAX_HEATMAP_COLUMNS) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(sources, bin edges in steps (columns + 1,), sources × columns mean weights; NaN = not sampled).

    Consecutive weight rows are grouped into at most `max_columns` bins of equal row count;
    a bin spans from half a step before its first row to half a step before the next bin's.
    """
    weighted = [r for r in rows if isinstance(r.get("weights"), dict) and r["weights"]]
    sources = sorted({s for r in weighted for s in r["weights"]})
    per_step = np.full((len(sources), len(weighted)), np.nan)
    for col, r in enumerate(weighted):
        for i, s in enumerate(sources):
            if s in r["weights"]:
                per_step[i, col] = r["weights"][s]
    steps = np.array([r["step"] for r in weighted], dtype=np.float64)
    bins = np.array_split(np.arange(len(weighted)), min(max_columns, len(weighted)))
    matrix = np.stack([_mean_of_present(per_step[:, b]) for b in bins], axis=1)
    edges = np.array([steps[b[0]] - 0.5 for b in bins] + [steps[bins[-1][-1]] + 0.5])
    return sources, edges, matrix


def _mean_of_present(block: np.ndarray) -> np.ndarray:
    """Row means over the non-NaN entries; NaN for a row with none."""
    present = ~np.isnan(block)
    counts = present.sum(axis=1)
    sums = np.where(present, block, 0.0).sum(axis=1)
    return np.divide(sums, counts, out=np.full(counts.shape, np.nan), where=counts > 0)


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _draw_loss(ax, name: str, steps: np.ndarray, values: np.ndarray, color: str, linestyle: str = "-"):
    """Raw values (faint when smoothed) plus a rolling mean over ~1/25 of the run; returns the legend handle."""
    window = max(1, steps.size // 25)
    raw = ax.plot(steps, values, color=color, linestyle=linestyle, alpha=0.25 if window > 1 else 1.0, linewidth=0.8, label=name)[0]
    if window == 1:
        return raw
    return ax.plot(steps, rolling_mean(values, window), color=color, linestyle=linestyle, linewidth=1.6,
                   label=f"{name} (mean of {window})")[0]


def draw_curves(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG of the loss curves (left) and validation NDCG@10 (right)."""
    MaxNLocator = _matplotlib().MaxNLocator
    fig = _figure(11, 4)
    ax_loss, ax_val = fig.subplots(1, 2)
    series = loss_series(rows)
    vq = series.pop("vq_loss", None)
    handles = [_draw_loss(ax_loss, name, steps, values, f"C{i}") for i, (name, (steps, values)) in enumerate(series.items())]
    top = ax_loss
    if vq is not None:  # L_vq is orders of magnitude smaller than the recommendation losses: own axis
        top = ax_loss.twinx()
        handles.append(_draw_loss(top, "vq_loss", *vq, "C3", linestyle="--"))
        top.set_ylabel("vq_loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    top.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=len(handles), fontsize="small", frameon=False)
    ax_loss.grid(alpha=0.3)

    evals = [(r["step"], r["val"][VAL_METRIC]) for r in rows if isinstance(r.get("val"), dict) and VAL_METRIC in r["val"]]
    if evals:
        steps, values = np.array(evals, dtype=np.float64).T
        ax_val.plot(steps, values, marker="o", markersize=3)
        best = int(np.argmax(values))
        ax_val.plot(steps[best], values[best], marker="*", markersize=12, color="tab:red", linestyle="none",
                    label=f"best {values[best]:.4f} @ step {int(steps[best])}")
        ax_val.legend(loc="lower right", fontsize="small")
    else:
        ax_val.text(0.5, 0.5, "no validation yet", ha="center", va="center", transform=ax_val.transAxes)
    ax_val.set(xlabel="step", ylabel=VAL_METRIC, title=f"validation {VAL_METRIC}")
    ax_val.grid(alpha=0.3)
    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    return _png(fig)


def draw_source_weights(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG heatmap: sources × iterations, colour = mean softmax weight."""
    mpl = _matplotlib()
    colormaps, MaxNLocator = mpl.colormaps, mpl.MaxNLocator
    sources, edges, matrix = weight_matrix(rows)
    fig = _figure(10, 1.2 + 0.45 * len(sources))
    ax = fig.subplots()
    cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
    mesh = ax.pcolormesh(edges, np.arange(len(sources) + 1), np.ma.masked_invalid(matrix), cmap=cmap, vmin=0.0, vmax=1.0)
    ax.set_yticks(np.arange(len(sources)) + 0.5, labels=sources)
    ax.invert_yaxis()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    note = "; grey = not sampled" if np.isnan(matrix).any() else ""
    ax.set(xlabel="iteration", ylabel="source", title=f"{title}: source task weights (softmax, mean per bin{note})")
    fig.colorbar(mesh, ax=ax, label="mean weight")
    return _png(fig)


def draw_scatter(groups: dict[str | None, tuple[list[float], list[float]]], *, xlabel: str, ylabel: str, title: str,
                 log_x: bool = False) -> bytes:
    """PNG scatter plot, one colour per group of (xs, ys); a legend when the groups are labelled
    (`metarec tune`'s sweep.png)."""
    fig = _figure(5.5, 3.8)
    ax = fig.subplots()
    for label, (xs, ys) in groups.items():
        ax.scatter(xs, ys, label=label, alpha=0.8)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if any(label is not None for label in groups):
        ax.legend(fontsize=8)
    return _png(fig)


def plot_run(run_dir: str) -> list[str]:
    """Draw RUN_DIR's figures into RUN_DIR (local or s3://); return the written paths.

    Always `training_curves.png`; `source_weights.png` only if the history has source
    weights (MetaRec runs).
    """
    run_dir = run_dir.rstrip("/")
    from metarec.run_dir import RunDir  # (imports torch: not needed to draw)

    rows = RunDir(run_dir).read_history()
    _matplotlib()  # fail before drawing anything
    title = run_dir.rsplit("/", 1)[-1]
    figures = {CURVES_FILE: draw_curves(rows, title)}
    if any(isinstance(r.get("weights"), dict) and r["weights"] for r in rows):
        figures[WEIGHTS_FILE] = draw_source_weights(rows, title)
    paths = []
    for name, png in figures.items():
        path = fs.join(run_dir, name)
        fs.atomic_write_bytes(path, png)
        paths.append(path)
    return paths
