"""Saved conversations: one chat conversation (`streamjax.stream.chat.Conversation`) in one safetensors file.

A session file `NAME.session.safetensors` holds everything a conversation needs to go on exactly as if it
had never stopped:

- the cache: every array of its `SinkCache` (a hybrid cache's `sliding` sub-cache included), one tensor
  each, named by its key path in the cache's pytree (".keys[0]", ".sliding.values[1]", ".next_position");
  keys and values keep their dtype bit for bit (bfloat16, which safetensors' numpy API does not know, is
  stored as its raw uint16 bits and the dtype named in the metadata). The stream position is the cache's
  `next_position`.
- the metadata (strings): a format tag, the model's spec and a digest of its `ModelConfig` (a session
  from another model is refused), the cache's static fields (sinks, window, the sliding sub-cache's, the
  layer types, the dtype), the messages and the last reply's text as JSON, the caller's `extra` as JSON,
  and a SHA-256 digest over the metadata and every tensor's name, dtype, shape and bytes, checked on load.
- the sampling state is the number of turns: chat turn n draws with seed `config.seed + n`
  (`streamjax.stream.chat.turn_settings`) and a turn's draws depend on nothing else besides the cache, so
  the messages (which count the turns) restore it.

The file is written by `streamjax.runs.writes.write_bytes` (atomic and durable): a kill during a save
leaves the old file or the new one. A file that is unreadable, truncated or whose digest disagrees raises
`CorruptFile` naming it; one from another model or cache layout raises ValueError naming both.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from streamjax.model import sharding
from streamjax.model.cache import SinkCache, init_cache
from streamjax.runs import distributed, writes
from streamjax.stream import chat

FORMAT = "streamjax-session/1"
SESSION_SUFFIX = ".session.safetensors"
NAME_RULE = "a session name is 1 to 128 characters from A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.'"
_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
# dtypes safetensors' numpy API cannot store, kept as their raw bits of the same width
_RAW_BITS = {"bfloat16": np.uint16}
_REMEDY = "delete it (or load another session) and start the conversation again"


def session_path(directory: str | os.PathLike, name: str) -> pathlib.Path:
    """`directory/NAME.session.safetensors`; ValueError for a name that is not a plain file name (`NAME_RULE`)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("."):
        raise ValueError(f"bad session name {name!r}: {NAME_RULE}")
    return pathlib.Path(directory).expanduser() / f"{name}{SESSION_SUFFIX}"


def save_conversation(
    path: str | os.PathLike,
    model: chat.ChatModel,
    conversation: chat.Conversation,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write `conversation` (a cache of one stream) and `extra` (JSON-able) to `path`, atomically. In a
    distributed run every process calls it (the cache is gathered from all), process 0 writes the file,
    and all return once it is written (or its write failed, raising in process 0)."""
    if conversation.cache.batch_size != 1:
        raise ValueError(f"a session holds one stream; this cache has {conversation.cache.batch_size}")
    tensors = _cache_tensors(conversation.cache)
    metadata = {
        "format": FORMAT,
        "model_spec": model.spec,
        "model_config_digest": _config_digest(model.config),
        "cache_layout": json.dumps(_cache_layout(conversation.cache), sort_keys=True),
        "tensor_dtypes": json.dumps({name: str(array.dtype) for name, array in tensors.items()}, sort_keys=True),
        "messages": json.dumps(conversation.messages),
        "reply_text": json.dumps(conversation.reply_text),
        "extra": json.dumps(dict(extra or {}), sort_keys=True),
    }
    stored = {name: _stored(array) for name, array in tensors.items()}
    metadata["digest"] = _digest(metadata, tensors)
    try:
        if distributed.is_writer():
            writes.write_bytes(path, safetensors.numpy.save(stored, metadata=metadata))
    finally:  # also after a failed write, so the other processes do not wait for it
        distributed.barrier(f"sessions: {path} saved")


def load_conversation(path: str | os.PathLike, model: chat.ChatModel) -> tuple[chat.Conversation, dict]:
    """The conversation saved at `path` and its `extra` ({} if none), the cache on the model's mesh.

    Raises FileNotFoundError, `CorruptFile` (unreadable or digest mismatch), or ValueError when the
    session was saved from another model or with a cache layout this model does not use.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved session at {path}")
    metadata, tensors = _read(path)
    _check_model(path, metadata, model)
    layout = json.loads(metadata["cache_layout"])
    cache = _cache_from(path, tensors, layout, model)
    if model.mesh is not None:
        cache = sharding.shard_cache(cache, model.mesh)
    messages, reply_text = json.loads(metadata["messages"]), json.loads(metadata["reply_text"])
    return chat.Conversation(cache, messages, reply_text), json.loads(metadata["extra"])


def _config_digest(config) -> str:
    """SHA-256 of a `ModelConfig`'s fields (as sorted JSON): equal for the same architecture."""
    fields = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return hashlib.sha256(fields.encode("utf-8")).hexdigest()


def _cache_layout(cache: SinkCache) -> dict[str, Any]:
    """The static fields of a cache that a session must match: sinks, window, dtype, layer types, and
    the sliding sub-cache's sinks and window (None without one)."""
    sliding = cache.sliding
    return {
        "num_sinks": cache.num_sinks,
        "window": cache.window,
        "dtype": str(jnp.dtype(cache.dtype)),
        "layer_types": list(cache.layer_types) if cache.layer_types is not None else None,
        "sliding_sinks": None if sliding is None else sliding.num_sinks,
        "sliding_window": None if sliding is None else sliding.window,
    }


def _cache_tensors(cache: SinkCache) -> dict[str, np.ndarray]:
    """{key path: host array} of every array of the cache."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(cache)
    return {jax.tree_util.keystr(key_path): sharding.to_host(leaf) for key_path, leaf in leaves}


def _stored(array: np.ndarray) -> np.ndarray:
    raw = _RAW_BITS.get(str(array.dtype))
    return np.ascontiguousarray(array if raw is None else array.view(raw))


def _digest(metadata: Mapping[str, str], tensors: Mapping[str, np.ndarray]) -> str:
    """SHA-256 of the metadata (less the digest) and each tensor's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "digest"}, sort_keys=True).encode())
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(json.dumps([name, str(array.dtype), list(array.shape)]).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _read(path: pathlib.Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors in their saved dtypes) of a session file; `CorruptFile` for anything unreadable."""
    try:
        with safetensors.safe_open(path, "np") as file:
            metadata = file.metadata() or {}
            tensors = {name: file.get_tensor(name) for name in file.keys()}
        dtypes = json.loads(metadata["tensor_dtypes"])
        tensors = {name: array.view(jnp.dtype(dtypes[name])) for name, array in tensors.items()}
    except Exception as error:  # safetensors raises its own errors, and a damaged header anything
        raise writes.CorruptFile(f"{path} is not a readable session file ({error}); {_REMEDY}") from None
    if metadata.get("format") != FORMAT:
        raise writes.CorruptFile(f"{path} is not a {FORMAT} session (format {metadata.get('format')!r}); {_REMEDY}")
    if metadata.get("digest") != _digest(metadata, tensors):
        raise writes.CorruptFile(f"{path} is corrupt (its SHA-256 digest does not match its content); {_REMEDY}")
    return metadata, tensors


def _check_model(path: pathlib.Path, metadata: Mapping[str, str], model: chat.ChatModel) -> None:
    saved = (metadata["model_spec"], metadata["model_config_digest"])
    loaded = (model.spec, _config_digest(model.config))
    if saved != loaded:
        raise ValueError(
            f"{path} was saved from model {saved[0]!r} (config digest {saved[1][:12]}), not from the loaded model "
            f"{loaded[0]!r} (config digest {loaded[1][:12]}): load it with the model it was saved from"
        )


def _cache_from(path: pathlib.Path, tensors: Mapping[str, np.ndarray], layout: Mapping, model: chat.ChatModel):
    """The cache the tensors fill, after checking that its layout is the one this model builds."""
    dtype = jnp.dtype(jax.tree.leaves(model.params)[0].dtype)
    sliding = {}
    if layout["sliding_window"] is not None:
        sliding = {"sliding_sinks": layout["sliding_sinks"], "sliding_window": layout["sliding_window"]}
    build = lambda: init_cache(model.config, 1, layout["num_sinks"], layout["window"], dtype, **sliding)  # noqa: E731
    try:
        template = jax.eval_shape(build)
    except ValueError as error:
        raise ValueError(f"{path} holds a cache this model cannot use: {error}") from None
    expected = _cache_layout(template)
    if expected != layout:
        differences = [f"{key} {layout[key]!r} (session) vs {expected[key]!r} (model)" for key in layout
                       if layout[key] != expected.get(key)]  # fmt: skip
        raise ValueError(f"{path} holds a cache of another layout: {', '.join(differences)}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    names = [jax.tree_util.keystr(key_path) for key_path, _ in leaves]
    shapes = {name: (tuple(leaf.shape), jnp.dtype(leaf.dtype)) for name, (_, leaf) in zip(names, leaves)}
    found = {name: (tuple(array.shape), jnp.dtype(array.dtype)) for name, array in tensors.items()}
    if found != shapes:
        wrong = [f"{name} {found.get(name)} vs {shapes.get(name)}" for name in sorted({*found, *shapes})
                 if found.get(name) != shapes.get(name)]  # fmt: skip
        raise ValueError(f"{path} holds cache arrays this model does not build: {', '.join(wrong)} (session vs model)")
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(tensors[name]) for name in names])
