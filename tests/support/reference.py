"""An independent token-by-token StreamingLLM reference in numpy, written from the paper's definition.

It reads Hugging Face weights by their Hugging Face names (not streamjax's params) and keeps, per
layer, a plain list of every token's key (before RoPE) and value. For the token at stream index t it
keeps the first S and the last W tokens before t plus t itself, assigns them positions 0, 1, ... in
that order (positions within the cache), and attends with those positions.

`softmax` (`ModelConfig.softmax`) written as what it means: "zero_sink" prepends a key and a value of
zeros (its logit q.0 is 0 at any position), "sink_logit" prepends a column holding each head's learned
logit `model.layers.{i}.self_attn.sinks` [N] and a value of zeros.

The Llama-style families that differ from Llama in their tensors are read from the tensors: a
projection has a bias where the checkpoint has one (Qwen2: q, k and v), and where it has
`self_attn.q_norm` and `k_norm` (Qwen3) each query and key head is RMS-normed before RoPE, so the
kept keys are normed and un-rotated.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def kept_indices(t: int, num_sinks: int, window: int) -> list[int]:
    """Stream indices the token at index t attends to: the first S, the W before t, and t."""
    recent = range(max(0, t - window), t + 1)
    return sorted(set(range(min(num_sinks, t + 1))) | set(recent))


def _rms_norm(x, weight, eps):
    return weight * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _linear(sd, name, h):
    """h @ `name`.weight.T, plus `name`.bias where the checkpoint has one."""
    return h @ sd[f"{name}.weight"].T + sd.get(f"{name}.bias", 0)


def _head_norm(sd, name, heads, eps):
    """heads [n, H] RMS-normed by `name`.weight where the checkpoint has it (Qwen3's q_norm, k_norm)."""
    weight = sd.get(f"{name}.weight")
    return heads if weight is None else _rms_norm(heads, weight, eps)


def _rope(x, position, inv_freq):
    """x [heads, H] rotated by `position` (half-split layout)."""
    angles = position * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = np.split(x, 2, axis=-1)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


@dataclasses.dataclass(frozen=True)
class SlidingLayers:
    """The cache of a hybrid model's sliding layers: which layers, their sinks and window, their RoPE."""

    layers: tuple[int, ...]
    num_sinks: int
    window: int
    inv_freq: np.ndarray


def llama_stream_logits(
    state_dict,
    hf_config,
    tokens,
    num_sinks: int,
    window: int,
    inv_freq,
    softmax: str = "standard",
    sliding: SlidingLayers | None = None,
) -> np.ndarray:
    """Logits [T, V] of one stream of `tokens`, one token at a time (float64). The layers of `sliding`
    keep its sinks and window and rotate with its frequencies; every other layer keeps `num_sinks`,
    `window` and rotates with `inv_freq`."""
    sd = {name: np.asarray(value, np.float64) for name, value in state_dict.items()}
    num_layers, num_heads = hf_config.num_hidden_layers, hf_config.num_attention_heads
    num_kv_heads, eps = hf_config.num_key_value_heads, hf_config.rms_norm_eps
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    keys = [[] for _ in range(num_layers)]
    values = [[] for _ in range(num_layers)]
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    outputs = []
    layer_caches = [(num_sinks, window, inv_freq)] * num_layers
    for layer in sliding.layers if sliding else ():
        layer_caches[layer] = (sliding.num_sinks, sliding.window, sliding.inv_freq)
    for t, token in enumerate(tokens):
        x = sd["model.embed_tokens.weight"][token]
        for layer, (layer_sinks, layer_window, layer_freq) in enumerate(layer_caches):
            kept = kept_indices(t, layer_sinks, layer_window)
            p = lambda name: sd[f"model.layers.{layer}.{name}"]  # noqa: E731
            linear = lambda name, h: _linear(sd, f"model.layers.{layer}.{name}", h)  # noqa: E731
            head_norm = lambda name, h: _head_norm(sd, f"model.layers.{layer}.{name}", h, eps)  # noqa: E731
            h = _rms_norm(x, p("input_layernorm.weight"), eps)
            q = head_norm("self_attn.q_norm", linear("self_attn.q_proj", h).reshape(num_heads, head_dim))
            k = linear("self_attn.k_proj", h).reshape(num_kv_heads, head_dim)
            keys[layer].append(head_norm("self_attn.k_norm", k))
            values[layer].append(linear("self_attn.v_proj", h).reshape(num_kv_heads, head_dim))
            q = _rope(q, len(kept) - 1, layer_freq)
            k = np.stack([_rope(keys[layer][j], pos, layer_freq) for pos, j in enumerate(kept)])  # [S, K, H]
            v = np.stack([values[layer][j] for j in kept])
            group = num_heads // num_kv_heads
            k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
            if softmax != "standard":  # one more key and value, both zeros: its logit q.0 is 0
                k, v = (np.concatenate([np.zeros_like(a[:1]), a]) for a in (k, v))
            scores = np.einsum("nh,snh->ns", q, k) / np.sqrt(head_dim)
            if softmax == "sink_logit":  # that column's logit is instead the head's learned one, unscaled
                scores[:, 0] = p("self_attn.sinks")
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            weights /= weights.sum(-1, keepdims=True)
            attended = np.einsum("ns,snh->nh", weights, v).reshape(-1)
            x = x + linear("self_attn.o_proj", attended)
            h = _rms_norm(x, p("post_attention_layernorm.weight"), eps)
            gate, up = h @ p("mlp.gate_proj.weight").T, h @ p("mlp.up_proj.weight").T
            x = x + (gate / (1 + np.exp(-gate)) * up) @ p("mlp.down_proj.weight").T
        outputs.append(_rms_norm(x, sd["model.norm.weight"], eps) @ head.T)
    return np.stack(outputs)
