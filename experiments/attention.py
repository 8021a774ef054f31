"""Attention maps (the paper's Figure 2): where each layer's attention goes in short texts, averaged over heads and
texts, and the share of attention the first token gets in each layer (the attention sink).

The texts are `num_texts` consecutive pieces of `length` tokens of a corpus, each starting with the tokenizer's
leading special tokens (a <bos>) when `bos` is set, as the model saw its training texts. The maps come from the
model's own dense causal pass (`streamjax.stream.attention_maps`), so a model's sliding layers slide.

`run(config, workdir)` is what `python -m experiments.attention` calls (fields: configs/attention.py). It writes
`attention_maps.png` (one panel per layer), `maps.npy` (float32 [layers, length, length]) and `attention.json`
(every layer's type and first-token share, the mean per layer type, a uniform causal map's share, the config,
the command and commit, digests of the weights and texts). `maps.npy` holds every layer; the PNG shows the layers
of `config.layers`.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np

from experiments.program import main
from streamjax.files import corpora, loading
from streamjax.runs import provenance, writes
from streamjax.stream import attention_maps


def parse_layers(layers: str) -> list[int]:
    """ "0,5,11" -> [0, 5, 11]; a ValueError naming the field for anything else."""
    try:
        parsed = [int(item) for item in layers.split(",")]
    except ValueError:
        raise ValueError(f"layers must be comma-separated layer indices like '0,5,11', got {layers!r}") from None
    if len(set(parsed)) != len(parsed):
        raise ValueError(f"layers {layers!r} names a layer twice")
    return parsed


def texts(tokenizer: Any, data: str, num_texts: int, length: int, bos: bool) -> np.ndarray:
    """Token ids [num_texts, length]: consecutive pieces of the corpus, each after the tokenizer's leading
    special tokens if `bos` (those count in `length`)."""
    if num_texts < 1 or length < 2:
        raise ValueError(f"num_texts must be >= 1 and length >= 2, got {num_texts} and {length}")
    corpus_leading = corpora.special_tokens(tokenizer, "a")[0]  # the corpus' tokens start with them, once
    leading = corpus_leading if bos else []
    body = length - len(leading)
    if body < 1:
        raise ValueError(f"length {length} leaves no room for text after the {len(leading)} leading special tokens")
    start = len(corpus_leading)
    tokens = corpora.load_corpus_tokens(data, tokenizer, num_tokens=start + num_texts * body)[start:]
    if len(tokens) < num_texts * body:
        raise ValueError(f"corpus {data!r} has {len(tokens)} tokens, fewer than {num_texts} texts of {body} need")
    pieces = tokens.reshape(num_texts, body)
    return np.concatenate([np.tile(np.asarray(leading, np.int32), (num_texts, 1)), pieces], axis=1).astype(np.int32)


def uniform_share(length: int) -> float:
    """The first token's share under uniform causal attention, averaged over queries 1..length-1: mean 1/(t+1)."""
    return float(np.mean(1.0 / np.arange(2, length + 1)))


def run(config, workdir: str | os.PathLike) -> dict[str, Any]:
    """Every layer's map over the config's texts: maps.npy [L, T, T] and each layer's first-token share in
    attention.json, the panels of `config.layers` in attention_maps.png. Returns what attention.json holds."""
    shown = parse_layers(config.layers)
    source = loading.resolve_model(config.model)
    tokenizer = loading.load_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"model {config.model!r} has no tokenizer files, so the text cannot be tokenized")
    tokens = texts(tokenizer, config.data, config.num_texts, config.length, config.bos)
    model_config, params = loading.load_weights(source, loading.parse_dtype(config.dtype))
    bad = [layer for layer in shown if not 0 <= layer < model_config.num_layers]
    if bad:
        raise ValueError(f"layers {bad} are not in the model's [0, {model_config.num_layers})")
    maps = attention_maps.attention_maps(params, model_config, tokens)  # every layer: [L, T, T]
    rows = [
        {"layer": layer, "type": kind, "first_token_share": float(share)}
        for layer, (kind, share) in enumerate(
            zip(model_config.layer_type_of, attention_maps.sink_attention_share(maps))
        )
    ]
    kinds = sorted({row["type"] for row in rows})
    report = {
        "config": config.to_dict(), "made_by": provenance.made_by(), "model": config.model,
        "weights_sha256": loading.weights_sha256(source), "tokens_sha256": provenance.tokens_sha256(tokens),
        "uniform_share": uniform_share(config.length),
        "mean_first_token_share": {
            kind: float(np.mean([row["first_token_share"] for row in rows if row["type"] == kind])) for kind in kinds
        },
        "layers": rows,
    }  # fmt: skip
    workdir = pathlib.Path(workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    np.save(workdir / "maps.npy", maps.astype(np.float32))
    title = _title(config, [rows[layer] for layer in shown])
    attention_maps.plot_attention_maps(workdir / "attention_maps.png", maps[shown], shown, title=title)
    writes.write_json(workdir / "attention.json", report)
    for row in rows:
        print(f"layer {row['layer']:3d} ({row['type']}): {row['first_token_share']:6.1%} on the first token")
    print(f"uniform causal attention: {report['uniform_share']:.1%}; mean per type {report['mean_first_token_share']}")
    return report


def _title(config, rows: list[dict[str, Any]]) -> str:
    """The figure's title: the model, the texts and which panels are of which layer type."""
    kinds: dict[str, list[str]] = {}
    for row in rows:
        kinds.setdefault(row["type"].replace("_attention", ""), []).append(str(row["layer"]))
    layers = "; ".join(f"{kind}: layers {', '.join(names)}" for kind, names in kinds.items())
    first = "each after the tokenizer's leading special tokens" if config.bos else "no special token first"
    return f"{config.model}, {config.num_texts} texts of {config.length} tokens, {first} ({layers})"


if __name__ == "__main__":
    main(run)
