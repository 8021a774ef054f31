"""Loading a model by one string: a named model ("smollm2", "gemma3"), a GGUF file, a Hugging Face directory, or a
cached hub id.

`resolve_model` turns the string into a `ModelSource` without reading any weights, so a bad spec
fails at once; `load_tokenizer` and `load_model` then read what the source holds. Nothing here
downloads from the hub: a hub id must already be in the local Hugging Face cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
from typing import Any

import jax.numpy as jnp
from jax.sharding import Mesh

from streamjax.files import assets, gguf, weights
from streamjax.model import families
from streamjax.model.config import ModelConfig

DEFAULT_MODEL = "smollm2"
# Named models: the GGUF assets of `streamjax.files.assets` (fetched and checked on first use).
NAMED_MODELS = {"smollm2": assets.smollm2_gguf_path, "gemma3": assets.gemma3_gguf_path}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Files that say a Hugging Face directory carries a tokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a model spec points: `kind` is "gguf" (a file) or "hf" (a checkpoint directory)."""

    spec: str
    kind: str
    path: pathlib.Path


def resolve_model(spec: str = DEFAULT_MODEL) -> ModelSource:
    """The file or directory a model spec names; raises FileNotFoundError saying what was tried."""
    if spec in NAMED_MODELS:
        return ModelSource(spec, "gguf", NAMED_MODELS[spec]())
    path = pathlib.Path(spec).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {path} is not a .gguf file; pass a GGUF file or a checkpoint directory")
        return ModelSource(spec, "gguf", path)
    if path.is_dir():
        return ModelSource(spec, "hf", path)
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model {spec!r} does not exist")
    return ModelSource(spec, "hf", _cached_hub_snapshot(spec))


def _cached_hub_snapshot(repo_id: str) -> pathlib.Path:
    """The local snapshot of a hub repo, from the Hugging Face cache only (never the network)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return pathlib.Path(snapshot_download(repo_id, local_files_only=True))
    except HFValidationError:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a named model ({', '.join(NAMED_MODELS)}), an existing .gguf file or "
            "directory, nor a hub id"
        ) from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"model {repo_id!r} is not a local file or directory, and not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE}; download it first (`hf download {repo_id}`) or pass a local path"
        ) from None


def load_tokenizer(source: ModelSource) -> Any | None:
    """The source's tokenizer, or None for a checkpoint directory that has no tokenizer files."""
    if source.kind == "gguf":
        return gguf.load_gguf_tokenizer(source.path)
    tokenizer_config = source.path / "tokenizer_config.json"
    if tokenizer_config.is_file():  # a custom tokenizer class would be ignored below: refuse it instead
        weights.check_no_remote_code(tokenizer_config, weights.read_json(tokenizer_config))
    if (source.path / "tokenizer.json").is_file():
        # Not AutoTokenizer: importing it imports torch (transformers 5), which the runtime avoids.
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(source.path)
    if any((source.path / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(source.path, trust_remote_code=False)
    return None


def weight_files(source: ModelSource) -> list[pathlib.Path]:
    """The files `load_weights` reads: the .gguf file, or a checkpoint directory's config.json, its
    safetensors index if it has one, and the *.safetensors files the index names (else all of them)."""
    if source.kind == "gguf":
        return [source.path]
    metadata = [source.path / name for name in ("config.json", weights.SAFETENSORS_INDEX)]
    return [path for path in metadata if path.is_file()] + weights.safetensors_files(source.path)


def weights_sha256(source: ModelSource) -> str:
    """Hex SHA-256 of the source's `weight_files`: each file's name, size and bytes, in that order."""
    digest = hashlib.sha256()
    for path in weight_files(source):
        digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
        with open(path, "rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def load_weights(source: ModelSource, dtype=jnp.float32, mesh: Mesh | None = None) -> tuple[ModelConfig, dict]:
    """(config, params) of a resolved source, params in `dtype`, each on its shards of `mesh` if given."""
    if source.kind == "gguf":
        checkpoint = gguf.load_gguf(source.path)
        config = families.config_from_hf(checkpoint.hf_config)
        try:
            return config, weights.convert_tensors(
                checkpoint.state_dict, config, dtype, place=weights.mesh_placer(config, mesh)
            )
        except weights.WeightsError as error:
            raise weights.WeightsError(f"{source.path}: {error}") from None
    return weights.load_hf_directory(source.path, dtype, mesh)


def load_model(
    spec: str = DEFAULT_MODEL, dtype=jnp.float32, mesh: Mesh | None = None
) -> tuple[ModelConfig, dict, Any | None]:
    """(config, params, tokenizer) of a model spec: "smollm2" (default), "gemma3", a .gguf file, a Hugging Face
    checkpoint directory, or a hub id already in the local cache. The tokenizer is None when a
    checkpoint directory has no tokenizer files. With a `mesh` (`sharding.make_mesh`), each param is
    loaded straight onto its shards, so the model never sits whole on one device."""
    source = resolve_model(spec)
    config, params = load_weights(source, parse_dtype(dtype), mesh)
    return config, params, load_tokenizer(source)


def parse_dtype(dtype) -> jnp.dtype:
    """A JAX dtype from a name ("float32", "bfloat16", "float16") or a dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)
