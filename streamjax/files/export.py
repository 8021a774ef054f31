"""Saving a Llama as a Hugging Face checkpoint directory: the inverse of `streamjax.files.weights` for the
llama family, so that a model trained here loads both in streamjax (`loading.load_model(dir)`,
`--config.model=DIR`) and in transformers (`LlamaForCausalLM.from_pretrained(dir)`).

Letters: D model dim, F MLP dim, V vocab, N query heads, K kv heads, G = N // K, H head dim.

`save_model` checks everything it is given before it writes anything (the family, every param's shape
against the config's specs, the directory, the dtype, the tokenizer), writes into `<dir>.tmp-<pid>`,
syncs it, and only then renames it to `<dir>`. A killed save leaves at most that `.tmp-<pid>` directory
(or, while it replaces an older checkpoint, the old one as `<dir>.old-<pid>`), never a `<dir>` that
looks complete but is not.

A Llama with a sink softmax (`ModelConfig.softmax` "zero_sink" or "sink_logit") is written with
`"model_type": "llama_attention_sink"` and `"softmax"` in config.json (transformers refuses it rather
than computing a standard softmax) and, for "sink_logit", `model.layers.{i}.self_attn.sinks` [N].
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from streamjax.files import loading
from streamjax.model import families
from streamjax.model.config import ModelConfig, UnsupportedConfigError
from streamjax.model.families.llama import SINK_MODEL_TYPE
from streamjax.model.params import is_spec
from streamjax.runs import writes

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
WEIGHTS_FILE = "model.safetensors"


class ExportError(ValueError):
    """A model, directory or tokenizer that cannot be saved as asked; raised before anything is written."""


def hf_config(
    config: ModelConfig, bos_token_id: int | None = None, eos_token_id: int | list[int] | None = None
) -> dict[str, Any]:
    """The Hugging Face `LlamaConfig` dict of a llama `config` (config.json), which
    `families.config_from_hf` turns back into an equal ModelConfig (checked here).

    The token ids are written even when None, so that transformers does not assume its defaults (1, 2).
    """
    _check_llama(config)
    hf = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(config.vocab_size),
        "hidden_size": int(config.hidden_size),
        "intermediate_size": int(config.intermediate_size),
        "num_hidden_layers": int(config.num_layers),
        "num_attention_heads": int(config.num_heads),
        "num_key_value_heads": int(config.num_kv_heads),
        "head_dim": int(config.head_dim),
        "hidden_act": "silu",
        "max_position_embeddings": int(config.max_position_embeddings),
        "rms_norm_eps": float(config.norm_eps),
        "tie_word_embeddings": bool(config.tie_embeddings),
        "rope_theta": float(config.rope_theta),
        "attention_bias": bool(config.attention_bias),
        "mlp_bias": bool(config.mlp_bias),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
    }
    if config.rope_scaling is not None:  # its items carry "rope_type", as `config.rope_from_hf` stores them
        hf["rope_scaling"] = dict(config.rope_scaling)
    softmax = getattr(config, "softmax", "standard")
    if softmax != "standard":
        hf.update(model_type=SINK_MODEL_TYPE, softmax=softmax)
    _check_round_trip(hf, config)
    return hf


def _check_llama(config: ModelConfig) -> None:
    if config.family != "llama":
        raise ExportError(f"only llama models can be exported; this config's family is {config.family!r}")


def _check_round_trip(hf: dict[str, Any], config: ModelConfig) -> None:
    """ExportError unless `hf` loads back as `config`: a llama config with, say, `clip_qkv` set has no
    Hugging Face llama equivalent and would load as a different model."""
    try:
        loaded = families.config_from_hf(hf)
    except UnsupportedConfigError as error:
        raise ExportError(f"the config cannot be written as a Hugging Face llama config: {error}") from None
    differing = [
        field.name for field in dataclasses.fields(config) if getattr(loaded, field.name) != getattr(config, field.name)
    ]
    if differing:
        described = ", ".join(
            f"{name}={getattr(config, name)!r} (it would load as {getattr(loaded, name)!r})" for name in differing
        )
        raise ExportError(f"a Hugging Face llama config cannot express {described}")


def check_params(params: dict, config: ModelConfig) -> None:
    """ExportError naming every param missing from `params`, not in the config's specs, or mis-shaped."""
    specs = families.param_specs(config)
    expected = {jax.tree_util.keystr(path): spec.shape for path, spec in _leaves(specs, is_leaf=is_spec)}
    given = {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in _leaves(params)}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mis_shaped = sorted(
        f"{name} {given[name]} (expected {expected[name]})"
        for name in expected.keys() & given.keys()
        if given[name] != tuple(expected[name])
    )
    problems = [
        f"{label}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}"
        for label, names in (("missing", missing), ("not in the config", unexpected), ("mis-shaped", mis_shaped))
        if names
    ]
    if problems:
        raise ExportError(f"params do not match the {config.family} config's specs; {'; '.join(problems)}")


def _leaves(tree: Any, is_leaf=None) -> list:
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]


def parse_dtype(dtype: str | Any) -> np.dtype:
    """The numpy dtype to save in: a name or dtype `loading.parse_dtype` reads, one of DTYPES (float32, bfloat16)."""
    try:
        name = loading.parse_dtype(dtype).name
    except (TypeError, ValueError):
        name = repr(dtype)
    if name not in DTYPES:
        raise ExportError(f"cannot save in dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def hf_tensors(params: dict, config: ModelConfig, dtype: str | Any = "float32") -> dict[str, np.ndarray]:
    """Hugging Face Llama tensors (on the host, in `dtype`) of streamjax llama `params`: exactly what
    `weights.convert_tensors` turns back into them. A tied head is not written (as transformers saves it).
    """
    _check_llama(config)
    target = parse_dtype(dtype)
    check_params(params, config)
    host = jax.tree.map(lambda array: np.asarray(array, np.float32), jax.device_get(params))
    tensors = {"model.embed_tokens.weight": host["embed"], "model.norm.weight": host["final_norm"]}
    if not config.tie_embeddings:
        tensors["lm_head.weight"] = host["lm_head"].T  # [D, V] -> [V, D]
    for index, layer in enumerate(host["layers"]):
        tensors.update(_layer_tensors(f"model.layers.{index}", layer, config))
    return {name: np.ascontiguousarray(array.astype(target)) for name, array in tensors.items()}


def _layer_tensors(prefix: str, p: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """One layer's tensors, Hugging Face linear weights as [out, in]."""
    N, H, D = config.num_heads, config.head_dim, config.hidden_size
    G = N // config.num_kv_heads
    attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
    q, k, v = _split_qkv(np.moveaxis(p["qkv"], 0, -1), G)  # [D, K, G + 2, H] -> [K, G + 2, H, D]
    tensors = {
        f"{prefix}.input_layernorm.weight": p["attn_norm"],
        f"{prefix}.post_attention_layernorm.weight": p["mlp_norm"],
        f"{attn}.q_proj.weight": q,
        f"{attn}.k_proj.weight": k,
        f"{attn}.v_proj.weight": v,
        f"{attn}.o_proj.weight": p["o"].reshape(N * H, D).T,
        f"{mlp}.gate_proj.weight": p["gate_up"][:, 0].T,
        f"{mlp}.up_proj.weight": p["gate_up"][:, 1].T,
        f"{mlp}.down_proj.weight": p["down"].T,
    }
    if config.attention_bias:
        q_bias, k_bias, v_bias = _split_qkv(p["qkv_bias"], G)
        tensors |= {f"{attn}.q_proj.bias": q_bias, f"{attn}.k_proj.bias": k_bias, f"{attn}.v_proj.bias": v_bias}
        tensors[f"{attn}.o_proj.bias"] = p["o_bias"]
    if config.mlp_bias:
        tensors |= {f"{mlp}.gate_proj.bias": p["gate_up_bias"][0], f"{mlp}.up_proj.bias": p["gate_up_bias"][1]}
        tensors[f"{mlp}.down_proj.bias"] = p["down_bias"]
    if getattr(config, "softmax", "standard") == "sink_logit":
        tensors[f"{attn}.sinks"] = p["sink_logit"]
    return tensors


def _split_qkv(grouped: np.ndarray, G: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[K, G + 2, H, ...] (per kv head its G queries, its key, its value) -> q [N * H, ...], k, v [K * H, ...]."""
    rest = grouped.shape[3:]
    return tuple(grouped[:, part].reshape(-1, *rest) for part in (slice(0, G), G, G + 1))


def save_model(
    directory: str | os.PathLike,
    params: dict,
    config: ModelConfig,
    tokenizer: Any | None = None,
    dtype: str | Any = "float32",
) -> pathlib.Path:
    """Write a llama model as a Hugging Face checkpoint directory: config.json, model.safetensors and,
    given a transformers tokenizer (e.g. `PreTrainedTokenizerFast`), its files; returns the directory.

    An existing checkpoint directory (one with a config.json, or an empty one) is replaced; anything
    else at `directory` is refused. Every check runs before anything is written.
    """
    directory = pathlib.Path(os.path.abspath(os.fspath(directory)))
    _check_destination(directory)
    _check_tokenizer(tokenizer, config)
    token_ids = (
        {} if tokenizer is None else {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    )
    config_json = hf_config(config, **token_ids) | {"dtype": parse_dtype(dtype).name}
    tensors = hf_tensors(params, config, dtype)
    staging = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier process of the same pid that was killed
    try:
        _write(staging, config_json, tensors, tokenizer)
        _replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # there only if writing or renaming failed
    return directory


def _check_destination(directory: pathlib.Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise ExportError(f"cannot save a model to {directory}: it is a file, not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / "config.json").is_file():
        raise ExportError(
            f"{directory} exists and is not a checkpoint directory (it has files but no config.json); saving "
            "would replace it whole, so choose a new directory, an empty one or an earlier checkpoint's"
        )


def _check_tokenizer(tokenizer: Any | None, config: ModelConfig) -> None:
    if tokenizer is None:
        return
    if not callable(getattr(tokenizer, "save_pretrained", None)):
        raise ExportError(
            f"tokenizer {type(tokenizer).__name__} has no save_pretrained; pass a transformers tokenizer "
            "(PreTrainedTokenizerFast) or none"
        )
    if len(tokenizer) > config.vocab_size:
        raise ExportError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
            "it would produce ids the model has no embedding for"
        )


def _write(staging: pathlib.Path, config_json: dict, tensors: dict[str, np.ndarray], tokenizer: Any | None) -> None:
    """Every file of the checkpoint into `staging`, config.json last, all synced to disk."""
    staging.mkdir(parents=True)
    save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})  # "pt": transformers requires it
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    (staging / "config.json").write_text(json.dumps(config_json, indent=2) + "\n", encoding="utf-8")
    writes.fsync_tree(staging)


def _replace(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Rename the finished `staging` to `directory`; an existing one is moved aside first, deleted after."""
    if not directory.exists():
        os.rename(staging, directory)
    else:
        old = directory.with_name(f"{directory.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(directory, old)
        os.rename(staging, directory)
        shutil.rmtree(old)
    writes.fsync(directory.parent)
