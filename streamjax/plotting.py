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
    path: str | os.PathLike, nll_by_run: Mapping[str, np.ndarray], window: int = 0, title: str = "", footer: str = ""
) -> None:
    """Save a PNG of log PPL vs tokens processed, one line per run (x: index of the predicted token);
    `footer` (e.g. `provenance()`) is written under the plot."""
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
    figure.tight_layout(rect=(0, 0.03 if footer else 0, 1, 1))
    if footer:
        add_footer(figure, footer)
    figure.savefig(os.fspath(path))


def provenance() -> str:
    """ "<command line> @ <commit>": what made a result, for plot footers and JSON. The commit is the
    repository's HEAD ("+dirty" with uncommitted changes to tracked files), or "unknown" outside git."""
    import shlex
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    git = lambda *args: subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)  # noqa: E731
    try:
        head, status = git("rev-parse", "--short=12", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        commit = (
            head.stdout.strip() + ("+dirty" if status.stdout.strip() else "") if head.returncode == 0 else "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    program = sys.argv[0] if sys.argv else "python"
    module = (
        os.path.splitext(os.path.relpath(program, root))[0].replace(os.sep, ".") if program.endswith(".py") else program
    )
    return f"python -m {module} {shlex.join(sys.argv[1:])} @ {commit}".replace("  ", " ")


def add_footer(figure, text: str) -> None:
    """Write `text` (e.g. `provenance()`) small at the bottom of a matplotlib figure."""
    figure.text(0.01, 0.005, text, fontsize=5.5, color="0.35", ha="left", va="bottom", wrap=True)
