"""Looking inside a model: dense attention maps, the paper's Figure 2.

Letters: B texts, T tokens, L layers.

`attention_maps` runs the model's one forward pass (any family) over short texts as a plain causal
pass (no cache) and asks it for every layer's softmax weights. It copies every layer's weights to
the host: meant for a few short texts, not for streaming.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from streamjax.model.config import ModelConfig
from streamjax.model.transformer import check_tokens, forward


def attention_maps(params: dict, config: ModelConfig, tokens, layers: Sequence[int] | None = None) -> np.ndarray:
    """Attention weights [len(layers), T, T] of a dense causal pass, averaged over heads and texts.

    tokens: [B, T] (or [T]) texts; row t of a map is how query t spreads its attention over keys 0..t.
    layers: which layers to return (default all), e.g. (0, 1, 2, config.num_layers - 1).
    """
    tokens = np.atleast_2d(np.asarray(tokens))
    check_tokens(tokens, config)
    layers = range(config.num_layers) if layers is None else layers
    bad = [layer for layer in layers if not 0 <= layer < config.num_layers]
    if bad:
        raise ValueError(f"layers {bad} are not in the model's [0, {config.num_layers})")
    weights = forward(params, None, tokens, config, logits="none", return_weights=True).weights  # [B, N, T, T] each
    return np.stack([np.asarray(weights[layer], np.float32).mean(axis=(0, 1)) for layer in layers])


def sink_attention_share(maps: np.ndarray, num_first: int = 1) -> np.ndarray:
    """Per map [..., T, T]: mean share of attention that queries after the first `num_first` tokens
    give to those first tokens (the attention sinks); a uniform causal map gives about num_first / (t + 1)."""
    return maps[..., num_first:, :num_first].sum(axis=-1).mean(axis=-1)


def plot_attention_maps(path: str | os.PathLike, maps: np.ndarray, layers: Sequence[int], title: str = "") -> None:
    """Save a PNG of maps [len(layers), T, T] as heatmaps, one panel per layer, as in the paper's Figure 2."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(3.2 * len(layers), 3.4), dpi=110)
    FigureCanvasAgg(figure)
    for index, (layer_map, layer) in enumerate(zip(maps, layers)):
        axes = figure.add_subplot(1, len(layers), index + 1)
        future = np.triu(np.ones_like(layer_map, bool), k=1)
        image = axes.imshow(np.ma.masked_where(future, layer_map), cmap="viridis", vmin=0.0)
        axes.set_title(f"layer {layer}", fontsize=9)
        axes.set_xlabel("key token")
        axes.set_ylabel("query token")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        figure.colorbar(image, ax=axes, fraction=0.046)
    if title:
        figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(os.fspath(path))
