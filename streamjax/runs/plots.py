"""Plots of evaluation results (matplotlib's object API, no pyplot state, no display needed)."""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Mapping

import numpy as np

from streamjax.runs import writes


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
    """Save a PNG of log PPL vs tokens processed, one line per run (x: index of the predicted token): the
    cumulative mean NLL and, with `window` >= 1, beside it the mean of the last `window` predictions (a
    cumulative mean hides the moment a method collapses). `footer` (e.g. `provenance.made_by()`) goes under the plot."""
    views = [("cumulative mean NLL", 0)] + ([(f"mean NLL of the last {window} predictions", window)] if window else [])
    figure, panels = new_figure(len(views), 1, width=6.0 * len(views), height=4.5)
    for axes, (label, view_window) in zip(panels, views):
        for name, nll in nll_by_run.items():
            axes.plot(np.arange(1, len(nll) + 1), running_log_ppl(nll, view_window), label=name, linewidth=1.0)
        axes.set_xlabel("input length (tokens)")
        axes.set_ylabel(f"log PPL ({label})")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    finish_figure(figure, path, title, footer)


def plot_segments(
    path: str | os.PathLike, segments_by_run: Mapping[str, list[Mapping]], title: str = "", footer: str = ""
) -> None:
    """Save a PNG of a long stream over its segments (the paper's Figure 5 and what it cost), one line per
    run: log PPL of each segment, milliseconds per token, and the process's resident memory. Each
    segment is a dict with `end` (predictions so far), `log_ppl`, `ms_per_token` and `rss_mib`."""
    rows = (
        ("log_ppl", "log PPL of the segment"),
        ("ms_per_token", "ms per token"),
        ("rss_mib", "resident memory (MiB)"),
    )
    figure, panels = new_figure(1, len(rows), width=8.0, height=8.0)
    for axes, (key, label) in zip(panels, rows):
        for name, segments in segments_by_run.items():
            points = [(row["end"], row[key]) for row in segments if row.get(key) is not None]
            if points:
                axes.plot(*zip(*points), marker=".", markersize=3, label=name, linewidth=1.0)
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    panels[-1].set_xlabel("tokens processed")
    finish_figure(figure, path, title, footer)


def new_figure(columns: int, rows: int, width: float, height: float):
    """(figure, its rows x columns panels) of `width` x `height` inches, drawn off-screen (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    panels = [figure.add_subplot(rows, columns, index + 1) for index in range(rows * columns)]
    return figure, panels


def finish_figure(figure, path: str | os.PathLike, title: str = "", footer: str = "") -> None:
    """Title the figure, lay it out, write `footer` (the provenance) under it and save it (`save_figure`)."""
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0.03 if footer else 0, 1, 1))
    if footer:
        add_footer(figure, footer)
    save_figure(figure, path)


def save_figure(figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as the file `path` (its format from the suffix), atomically and durably
    (`writes.write_bytes`): a kill or a full disk never leaves half a picture."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format=pathlib.Path(path).suffix.lstrip(".") or "png")
    writes.write_bytes(path, buffer.getvalue())


def add_footer(figure, text: str) -> None:
    """Write `text` (e.g. `provenance.made_by()`) small at the bottom of a matplotlib figure."""
    figure.text(0.01, 0.005, text, fontsize=5.5, color="0.35", ha="left", va="bottom", wrap=True)


def plot_training(
    path: str | os.PathLike,
    histories: Mapping[str, Mapping],
    layouts: list[str],
    smoothing: int = 10,
    title: str = "",
    footer: str = "",
) -> None:
    """Save a PNG of training runs, one colour per run: the training loss per step (mean of the last
    `smoothing` steps) with the held-out loss at each evaluation, and beside it the streaming perplexity
    at the first and last cache layout of `layouts` (e.g. "0+64" solid, "4+60" dashed) against the step.
    Each history has per-step `loss` and `evaluations` [{step, heldout_loss, ppl: {layout: value}}]."""
    figure, (losses, ppl) = new_figure(2, 1, width=12.0, height=4.5)
    for index, (name, history) in enumerate(histories.items()):
        colour = f"C{index}"
        steps = np.arange(1, len(history["loss"]) + 1)
        losses.plot(steps, running_log_ppl(np.asarray(history["loss"]), smoothing), color=colour, label=name, lw=1.0)
        evaluations = history["evaluations"]
        at = [row["step"] for row in evaluations]
        losses.plot(at, [row["heldout_loss"] for row in evaluations], "o", color=colour, markersize=3)
        for layout, style in zip((layouts[0], layouts[-1]), ("-", "--")):
            ppl.plot(at, [row["ppl"][layout] for row in evaluations], style, color=colour, label=f"{name} {layout}")
    losses.set_xlabel("step")
    losses.set_ylabel(f"loss (line: training, mean of {smoothing} steps; dots: held-out)")
    ppl.set_xlabel("step")
    ppl.set_ylabel("held-out streaming perplexity")
    ppl.set_yscale("log")
    for axes in (losses, ppl):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    finish_figure(figure, path, title, footer)
