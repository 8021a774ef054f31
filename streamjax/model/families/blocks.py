"""Building blocks the family files share: activations, the two-matrix MLP, the gated MLP (Llama's SwiGLU,
Gemma's GeGLU), and the pre-norm LayerNorm decoder layer of MPT, GPT-NeoX and Falcon (the norms themselves
are `streamjax.model.norms`).

Letters: B streams, T new tokens, D model dim, F MLP dim.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from streamjax.model.attention import LayerCache, LayerOutputs, add_bias, self_attention
from streamjax.model.cache import ChunkPlan
from streamjax.model.config import ModelConfig
from streamjax.model.norms import layer_norm

# Hugging Face activation names -> functions ("gelu" is the exact erf form, the others its tanh form).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def norm(p: dict, name: str, x: jax.Array, config: ModelConfig) -> jax.Array:
    """The LayerNorm `name` of params `p` (with `name_bias` if it has one) applied to x [..., D]."""
    return layer_norm(x, p[name], p.get(f"{name}_bias"), config.norm_eps)


def mlp_block(p: dict, h: jax.Array, config: ModelConfig) -> jax.Array:
    """down(act(up(h))) of h [B, T, D], with biases where the params have them."""
    up = add_bias(jnp.einsum("btd,df->btf", h, p["up"]), p.get("up_bias"))
    return add_bias(jnp.einsum("btf,fd->btd", ACTIVATIONS[config.hidden_act](up), p["down"]), p.get("down_bias"))


def gated_mlp(p: dict, h: jax.Array, config: ModelConfig) -> jax.Array:
    """down(act(gate(h)) * up(h)) of h [B, T, D]: `gate_up` [D, 2, F] (gate and up in one product), `down`
    [F, D], biases `gate_up_bias` [2, F] and `down_bias` [D] where the params have them, act the config's
    `hidden_act` (SiLU: Llama's SwiGLU; tanh GELU: Gemma's GeGLU)."""
    gate_up = add_bias(jnp.einsum("btd,dpf->btpf", h, p["gate_up"]), p.get("gate_up_bias"))
    hidden = ACTIVATIONS[config.hidden_act](gate_up[:, :, 0]) * gate_up[:, :, 1]
    return add_bias(jnp.einsum("btf,fd->btd", hidden, p["down"]), p.get("down_bias"))


def layer_norm_decoder_layer(
    p: dict, x: jax.Array, layer_cache: LayerCache | None, plan: ChunkPlan, config: ModelConfig
) -> tuple[jax.Array, LayerOutputs]:
    """One pre-norm block in `config.residual_layout`; norms are `attn_norm` and (unless shared) `mlp_norm`.

    sequential: x + attn(attn_norm(x)), then + mlp(mlp_norm(.)); parallel: x + attn(attn_norm(x)) +
    mlp(mlp_norm(x)); parallel_shared_norm: x + attn(h) + mlp(h) with h = attn_norm(x).
    """
    h = norm(p, "attn_norm", x, config)
    attended, outputs = self_attention(p, h, layer_cache, plan, config)
    if config.residual_layout == "sequential":
        x = x + attended
        return x + mlp_block(p, norm(p, "mlp_norm", x, config), config), outputs
    if config.residual_layout == "parallel":
        h = norm(p, "mlp_norm", x, config)
    return x + attended + mlp_block(p, h, config), outputs


def layer_norm_final(params: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
    """The final LayerNorm `final_norm` (with `final_norm_bias` if the model has one)."""
    return norm(params, "final_norm", x, config)
