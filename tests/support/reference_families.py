"""Independent token-by-token StreamingLLM references for MPT, GPT-NeoX and Falcon in numpy (float64).

Like `reference.py` for Llama, each reads Hugging Face weights by their Hugging Face names and follows
the transformers modeling code for one token at a time: it keeps every token's key (before RoPE) and
value per layer, and the token at stream index t attends to the first S tokens, the W before it and
itself, at positions 0, 1, ... within that kept list (RoPE rotates by those positions, ALiBi penalises
their differences). Slopes and inverse frequencies come from transformers' own functions and buffers.
"""

from __future__ import annotations

import numpy as np
from scipy.special import erf

from support.reference import kept_indices


def _layer_norm(x, weight, bias, eps):
    centred = x - x.mean(-1, keepdims=True)
    normed = centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return normed * weight + (0.0 if bias is None else bias)


def _gelu(x):
    return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _rope(x, position, inv_freq):
    """x [heads, H]: its first R = 2 * len(inv_freq) dims rotated by `position` (half-split layout)."""
    rotary = 2 * len(inv_freq)
    angles = position * inv_freq
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = np.split(x[:, :rotary], 2, axis=-1)
    rotated = np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return np.concatenate([rotated, x[:, rotary:]], axis=-1)


class _Stream:
    """Weights by Hugging Face name (float64) and, per layer, every token's key and value so far."""

    def __init__(self, state_dict, num_layers, num_sinks, window):
        self.sd = {name: np.asarray(value, np.float64) for name, value in state_dict.items()}
        self.keys = [[] for _ in range(num_layers)]
        self.values = [[] for _ in range(num_layers)]
        self.num_sinks, self.window = num_sinks, window

    def linear(self, name, x):
        return x @ self.sd[f"{name}.weight"].T + self.sd.get(f"{name}.bias", 0.0)

    def norm(self, name, x, eps):
        return _layer_norm(x, self.sd[f"{name}.weight"], self.sd.get(f"{name}.bias"), eps)

    def attend(self, layer, q, k, v, scale, inv_freq=None, slopes=None, alibi_before_scale=False):
        """Store k, v [K, H] of the newest token; attend with q [N, H] over the kept tokens -> [N * H]."""
        self.keys[layer].append(k)
        self.values[layer].append(v)
        kept = kept_indices(len(self.keys[layer]) - 1, self.num_sinks, self.window)
        positions = np.arange(len(kept))
        keys = np.stack([self.keys[layer][j] for j in kept])  # [S, K, H]
        values = np.stack([self.values[layer][j] for j in kept])
        if inv_freq is not None:
            q = _rope(q, positions[-1], inv_freq)
            keys = np.stack([_rope(key, position, inv_freq) for key, position in zip(keys, positions)])
        group = q.shape[0] // keys.shape[1]
        keys, values = np.repeat(keys, group, axis=1), np.repeat(values, group, axis=1)
        scores = np.einsum("nh,snh->ns", q, keys)
        bias = 0.0 if slopes is None else slopes[:, None] * (positions - positions[-1])[None, :]
        scores = (scores + bias) * scale if alibi_before_scale else scores * scale + bias
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        return np.einsum("ns,snh->nh", weights, values).reshape(-1)


def mpt_stream_logits(state_dict, hf_config, tokens, num_sinks, window, slopes) -> np.ndarray:
    """Logits [T, V] of `MptForCausalLM` streamed with S sinks and window W; slopes [N] per head."""
    num_heads, eps = hf_config.n_heads, hf_config.layer_norm_epsilon
    head_dim = hf_config.d_model // num_heads
    attn = hf_config.attn_config
    scale = attn.softmax_scale or 1 / np.sqrt(head_dim)
    stream = _Stream(state_dict, hf_config.n_layers, num_sinks, window)
    outputs = []
    for token in tokens:
        x = stream.sd["transformer.wte.weight"][token]
        for layer in range(hf_config.n_layers):
            block = f"transformer.blocks.{layer}"
            qkv = stream.linear(f"{block}.attn.Wqkv", stream.norm(f"{block}.norm_1", x, eps))
            if attn.clip_qkv:
                qkv = np.clip(qkv, -attn.clip_qkv, attn.clip_qkv)
            q, k, v = (part.reshape(num_heads, head_dim) for part in np.split(qkv, 3))
            x = x + stream.linear(f"{block}.attn.out_proj", stream.attend(layer, q, k, v, scale, slopes=slopes))
            h = stream.norm(f"{block}.norm_2", x, eps)
            x = x + stream.linear(f"{block}.ffn.down_proj", _gelu(stream.linear(f"{block}.ffn.up_proj", h)))
        x = stream.norm("transformer.norm_f", x, eps)
        outputs.append(x @ stream.sd.get("lm_head.weight", stream.sd["transformer.wte.weight"]).T)
    return np.stack(outputs)


def gpt_neox_stream_logits(state_dict, hf_config, tokens, num_sinks, window, inv_freq) -> np.ndarray:
    """Logits [T, V] of `GPTNeoXForCausalLM` streamed with S sinks and window W (gelu MLP)."""
    num_heads, eps = hf_config.num_attention_heads, hf_config.layer_norm_eps
    head_dim = hf_config.hidden_size // num_heads
    stream = _Stream(state_dict, hf_config.num_hidden_layers, num_sinks, window)

    def mlp(prefix, h):
        return stream.linear(f"{prefix}.mlp.dense_4h_to_h", _gelu(stream.linear(f"{prefix}.mlp.dense_h_to_4h", h)))

    outputs = []
    for token in tokens:
        x = stream.sd["gpt_neox.embed_in.weight"][token]
        for layer in range(hf_config.num_hidden_layers):
            prefix = f"gpt_neox.layers.{layer}"
            h = stream.norm(f"{prefix}.input_layernorm", x, eps)
            qkv = stream.linear(f"{prefix}.attention.query_key_value", h).reshape(num_heads, 3 * head_dim)
            q, k, v = np.split(qkv, 3, axis=-1)
            attended = stream.attend(layer, q, k, v, head_dim**-0.5, inv_freq=inv_freq)
            attended = stream.linear(f"{prefix}.attention.dense", attended)
            if hf_config.use_parallel_residual:
                x = x + attended + mlp(prefix, stream.norm(f"{prefix}.post_attention_layernorm", x, eps))
            else:
                x = x + attended
                x = x + mlp(prefix, stream.norm(f"{prefix}.post_attention_layernorm", x, eps))
        x = stream.norm("gpt_neox.final_layer_norm", x, eps)
        head = stream.sd.get("embed_out.weight", stream.sd.get("lm_head.weight", stream.sd["gpt_neox.embed_in.weight"]))
        outputs.append(x @ head.T)
    return np.stack(outputs)


def _falcon_split(fused, hf_config):
    """q [N, H], k [K, H], v [K, H] of the fused projection, as transformers' `_split_heads`."""
    num_heads = hf_config.num_attention_heads
    head_dim = hf_config.hidden_size // num_heads
    if hf_config.new_decoder_architecture:
        grouped = fused.reshape(hf_config.num_kv_heads, -1, head_dim)  # [K, G + 2, H]
        return grouped[:, :-2].reshape(num_heads, head_dim), grouped[:, -2], grouped[:, -1]
    if hf_config.multi_query:
        heads = fused.reshape(num_heads + 2, head_dim)
        return heads[:-2], heads[-2:-1], heads[-1:]
    heads = fused.reshape(num_heads, 3, head_dim)
    return heads[:, 0], heads[:, 1], heads[:, 2]


def falcon_stream_logits(state_dict, hf_config, tokens, num_sinks, window, inv_freq=None, slopes=None) -> np.ndarray:
    """Logits [T, V] of `FalconForCausalLM` streamed with S sinks and window W.

    Rotary models pass `inv_freq`; ALiBi models pass `slopes` [N] (added to q.k before the 1/sqrt(H)).
    """
    eps, new_arch = hf_config.layer_norm_epsilon, hf_config.new_decoder_architecture
    head_dim = hf_config.hidden_size // hf_config.num_attention_heads
    two_norms = new_arch and hf_config.num_ln_in_parallel_attn in (None, 2)
    stream = _Stream(state_dict, hf_config.num_hidden_layers, num_sinks, window)
    outputs = []
    for token in tokens:
        x = stream.sd["transformer.word_embeddings.weight"][token]
        for layer in range(hf_config.num_hidden_layers):
            prefix = f"transformer.h.{layer}"
            h = stream.norm(f"{prefix}.{'ln_attn' if two_norms else 'input_layernorm'}", x, eps)
            q, k, v = _falcon_split(stream.linear(f"{prefix}.self_attention.query_key_value", h), hf_config)
            attended = stream.attend(layer, q, k, v, head_dim**-0.5, inv_freq, slopes, alibi_before_scale=True)
            attended = stream.linear(f"{prefix}.self_attention.dense", attended)
            if new_arch or hf_config.parallel_attn:
                mlp_in = stream.norm(f"{prefix}.ln_mlp", x, eps) if two_norms else h
            else:
                x = x + attended
                attended = 0.0
                mlp_in = stream.norm(f"{prefix}.post_attention_layernorm", x, eps)
            up = stream.linear(f"{prefix}.mlp.dense_h_to_4h", mlp_in)
            x = x + attended + stream.linear(f"{prefix}.mlp.dense_4h_to_h", _gelu(up))
        x = stream.norm("transformer.ln_f", x, eps)
        outputs.append(x @ stream.sd.get("lm_head.weight", stream.sd["transformer.word_embeddings.weight"]).T)
    return np.stack(outputs)
