"""A stand-in model that reads exactly what its cache holds: StreamEval's positive control.

A family written against the protocol of `streamjax.families` (`model_type` "recall"), so the
benchmark runs it as it runs a real model: loaded from a checkpoint directory, fed and asked through
the chat template, answering by `streamjax.stream.generation` on the same cache. It reads the byte-level
ChatML stream of `conftest.save_byte_tokenizer(..., specials_first=True)` (<|endoftext|> 0,
<|im_start|> 1, <|im_end|> 2, byte b as id 3 + b).

The embedding and the tied head are the identity (V = D: a token goes in one-hot and the next one
comes out as one-hot logits). The one layer stores each token's id as its key and value, so the
cache holds the token ids in its slots; each position gathers the ids it can see (the sinks and the
window, through the chunk plan's masks, as attention sees them) and a host function answers. After
the generation prompt that follows a StreamEval question ("... in line N?"), it writes the value of
"line N: REGISTER_CONTENT is <V>" if the whole line is among the tokens it sees, then <|im_end|>;
without the line it ends the turn at once (an empty answer). The sinks (the stream's first tokens)
and the window (its last ones) are read as two separate texts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from streamjax.model import params as P
from streamjax.model.attention import LayerCache, LayerOutputs
from streamjax.model.cache import ChunkPlan, sink_block
from streamjax.model.config import ModelConfig

NAME = "recall"
HF_MODEL_TYPES = ("recall",)
TIED_HEAD = ("lm_head.weight", "embed.weight")

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
END_OF_TURN = SPECIAL_TOKENS.index("<|im_end|>")
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
TOKEN_TEXT = np.array([*SPECIAL_TOKENS, *map(chr, range(256))], dtype=object)  # the stream is ASCII
_ASKED = re.compile(r"in line (\d+)\?<\|im_end\|>\n<\|im_start\|>assistant\n([^<]*)\Z")


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    return ModelConfig(
        family=NAME, vocab_size=VOCAB_SIZE, hidden_size=VOCAB_SIZE, num_layers=1, num_heads=1, num_kv_heads=1,
        head_dim=1, intermediate_size=1, norm_eps=0.0, tie_embeddings=True,
        max_position_embeddings=hf["max_position_embeddings"], position="alibi",
    )  # fmt: skip


def layer_specs(config: ModelConfig) -> dict:
    return {}


def final_norm_specs(config: ModelConfig) -> dict:
    return {}


def hf_tensor_rules(config: ModelConfig) -> list[P.TensorRule]:
    """Its checkpoint holds the embedding alone, "embed.weight" [V, V] (the identity)."""
    return [P.TensorRule("embed.weight", ("embed",))]


def decoder_layer(
    p: dict, x: jax.Array, layer_cache: LayerCache | None, plan: ChunkPlan, config: ModelConfig
) -> tuple[jax.Array, LayerOutputs]:
    """One-hot tokens x [B, T, V] -> one-hot next tokens [B, T, V]; keys and values [B, 1, T, 1] the ids."""
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    entries = tokens[:, None, :, None].astype(x.dtype)
    seen = _seen_tokens(tokens, entries, layer_cache, plan)
    next_ids = jax.pure_callback(next_tokens, jax.ShapeDtypeStruct(tokens.shape, jnp.int32), *seen)
    masks = jnp.concatenate([seen[1], seen[4]], axis=-1).astype(jnp.float32)  # [B, T, S + C + T]
    weights = (masks / masks.sum(-1, keepdims=True))[:, None]  # it reads all it sees, equally
    return jax.nn.one_hot(next_ids, config.vocab_size, dtype=x.dtype), LayerOutputs(entries, entries, weights)


def _seen_tokens(tokens, entries, layer_cache: LayerCache | None, plan: ChunkPlan) -> tuple[jax.Array, ...]:
    """(sink ids [B, S], sink mask [B, T, S], window ids [B, C + T] (cache slots, then the chunk), their
    offsets from the chunk start [B, C + T], window mask [B, T, C + T]): what each query can see."""
    if layer_cache is None:
        no_sinks = jnp.zeros((tokens.shape[0], 0), jnp.int32)
        return no_sinks, plan.sink_mask, tokens, plan.window_key_positions, plan.window_mask
    ids = lambda values: jnp.round(values[:, 0, :, 0]).astype(jnp.int32)  # noqa: E731
    sinks = ids(sink_block(layer_cache.values[:, :, : plan.num_sinks], entries, plan))
    window = jnp.concatenate([ids(layer_cache.values), tokens], axis=1)
    return sinks, plan.sink_mask, window, plan.window_key_positions, plan.window_mask


def next_tokens(sink_ids, sink_mask, window_ids, window_offsets, window_mask) -> np.ndarray:
    """[B, T] int32: each query's next token from the texts it sees (see `next_token`)."""
    answers = np.empty(window_mask.shape[:2], np.int32)
    for b, t in np.ndindex(*answers.shape):
        order = np.argsort(window_offsets[b], kind="stable")
        window = window_ids[b][order][window_mask[b, t][order]]
        texts = ["".join(TOKEN_TEXT[sink_ids[b][sink_mask[b, t]]]), "".join(TOKEN_TEXT[window])]
        answers[b, t] = next_token(texts)
    return answers


def next_token(texts: list[str]) -> int:
    """The next token after the last of `texts` (the window, ending at the query): the next character
    of the asked line's value while answering, else <|im_end|>."""
    asked = _ASKED.search(texts[-1])
    if asked is None:
        return END_OF_TURN
    line, answered = asked.groups()
    values = [m.group(1) for text in texts for m in re.finditer(rf"line {line}: REGISTER_CONTENT is <(\d+)>", text)]
    value = values[-1] if values else ""
    if len(answered) < len(value) and value.startswith(answered):
        return len(SPECIAL_TOKENS) + ord(value[len(answered)])
    return END_OF_TURN


def final_norm(params: dict, x: jax.Array, config: ModelConfig) -> jax.Array:
    return x
