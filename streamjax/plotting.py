"""Plots of evaluation results (matplotlib's object API, no pyplot state, no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


def running_log_ppl(nll: np.ndarray, window: int = 0) -> np.ndarray:
    """Log perplexity after each prediction of `nll` [N]: the cumulative mean NLL (window 0), or the
    mean of the last `window` predictions (fewer at the start)."""
    sums = np.concatenate([[0.0], np.cumsum(np.asarray(nll, np.float64))])
    count = np.arange(1, len(nll) + 1)
    if window <= 0:
        return sums[1:] / count
    start = np.maximum(count - window, 0)
    return (sums[1:] - sums[start]) / (count - start)


def plot_log_ppl(
    path: str | os.PathLike, nll_by_run: Mapping[str, np.ndarray], window: int = 0, title: str = ""
) -> None:
    """Save a PNG of log PPL vs tokens processed, one line per run (x: index of the predicted token)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name, nll in nll_by_run.items():
        axes.plot(np.arange(1, len(nll) + 1), running_log_ppl(nll, window), label=name, linewidth=1.2)
    axes.set_xlabel("input length (tokens)")
    axes.set_ylabel("log PPL")
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(os.fspath(path))
