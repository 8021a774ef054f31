"""Reading llama-architecture GGUF files (llama.cpp's format) into numpy, without torch.

`load_gguf` returns what the rest of streamjax expects from a Hugging Face checkpoint: a
LlamaConfig-style dict, float32 tensors under `LlamaForCausalLM` names and shapes, and a tokenizer.
Both are built to equal what transformers builds from the same file
(`from_pretrained(dir, gguf_file=name)`); `tests/test_gguf.py` checks it.

Two things llama.cpp changes on the way in are undone here:
- quantized tensors (Q4_1, Q8_0, ...) are dequantized with `gguf.quants.dequantize`;
- the rows of each Q and K head are interleaved (pairs `(2i, 2i + 1)` rotate together) where
  Hugging Face puts the two rotated halves one after the other; `_unpermute_rope_rows` undoes it.

A bad file raises `GGUFError` naming the file and what is wrong: not GGUF (magic), an unknown
version, a header or metadata that cannot be parsed, data past the end of the file (truncated), or a
tensor that dequantizes to inf/NaN (e.g. a flipped byte in a Q4_1 scale). GGUF has no checksum, so a
flipped byte that still parses (inside the quantized nibbles, or in a metadata string or number)
cannot be seen here; the default asset is checked against its SHA-256 (`streamjax.files.assets`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from streamjax.stream.token_bytes import bytes_to_unicode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# Metadata keys under `llama.` and the LlamaConfig field each one becomes.
_LLAMA_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}
# `llama.` keys that are read elsewhere (checked against head_dim, or rope scaling).
_LLAMA_CHECKED_KEYS = {
    "rope.dimension_count",
    "attention.key_length",
    "attention.value_length",
    "rope.scaling.type",
    "rope.scaling.factor",
}

# llama.cpp tensor name -> Hugging Face LlamaForCausalLM name ({i} is the layer index).
_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}

# `tokenizer.ggml.pre` values for which transformers splits text with the plain GPT-2 byte-level
# regex. (llama.cpp itself splits digits one by one for "smollm"; transformers does not, and we
# follow transformers.) Other values need their own split regex and are refused.
_GPT2_SPLIT_PRE_TOKENIZERS = {"default", "gpt2", "gpt-2", "smollm", "starcoder"}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_READABLE_VERSIONS = (2, gguf.GGUF_VERSION)  # what gguf.GGUFReader reads


class GGUFError(ValueError):
    """A GGUF file that is not GGUF, truncated or corrupted, or that streamjax cannot convert; names the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFCheckpoint:
    """A GGUF file converted to Hugging Face conventions.

    hf_config: LlamaConfig-style dict (model_type "llama", sizes, rms_norm_eps, rope_theta, ...).
    state_dict: float32 arrays under LlamaForCausalLM names, linear weights as [out, in].
    tokenizer: `transformers.PreTrainedTokenizerFast` equal to transformers' GGUF tokenizer.
    metadata: every metadata key of the file, arrays as lists.
    """

    hf_config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    tokenizer: PreTrainedTokenizerFast
    metadata: dict[str, Any]


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a llama-architecture GGUF file: config, dequantized float32 weights and tokenizer."""
    reader, metadata = _read(path)
    with _naming(path):
        hf_config = gguf_to_hf_config(metadata, [tensor.name for tensor in reader.tensors])
        state_dict = _read_state_dict(reader, hf_config)
        return GGUFCheckpoint(hf_config, state_dict, build_tokenizer(metadata), metadata)


def load_gguf_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Only the tokenizer of a GGUF file (skips dequantizing the weights)."""
    _, metadata = _read(path)
    with _naming(path):
        return build_tokenizer(metadata)


def _read(path: str | os.PathLike) -> tuple[gguf.GGUFReader, dict[str, Any]]:
    """The open reader and decoded metadata of a GGUF file; GGUFError naming the file if it is bad."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    _check_preamble(path)
    try:
        reader = _BoundsCheckedReader(path)
        return reader, read_metadata(reader)
    except _PastEnd as error:
        raise GGUFError(f"{path} is truncated or corrupted: {error}; re-download it") from None
    except (ValueError, KeyError, IndexError, OverflowError) as error:  # UnicodeDecodeError is a ValueError
        raise GGUFError(
            f"{path} is corrupted: its header cannot be parsed ({type(error).__name__}: {error}); re-download it"
        ) from None


def _check_preamble(path: str | os.PathLike) -> None:
    """GGUFError unless the file starts with a GGUF header of a version the reader knows."""
    with open(path, "rb") as file:
        head = file.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES:
        raise GGUFError(f"{path} has {len(head)} bytes, fewer than a GGUF header ({_HEADER_BYTES}): it is truncated")
    if head[:4] != b"GGUF":
        raise GGUFError(f"{path} is not a GGUF file: it starts with {head[:4]!r}, not b'GGUF'")
    versions = {int.from_bytes(head[4:8], "little"), int.from_bytes(head[4:8], "big")}  # either byte order
    if not versions & set(_READABLE_VERSIONS):
        raise GGUFError(
            f"{path} says GGUF version {int.from_bytes(head[4:8], 'little')}, but only versions "
            f"{_READABLE_VERSIONS} can be read: the file is corrupted, or newer than the installed gguf package"
        )


class _PastEnd(ValueError):
    """A read the file is too short for."""


class _BoundsCheckedReader(gguf.GGUFReader):
    """`gguf.GGUFReader` that stops at the first read past the end of the file, saying where (the base
    class slices short and fails later in numpy), and at a metadata array longer than the rest of the
    file (which the base class would walk item by item for minutes)."""

    def _get(self, offset, dtype, count=1, override_order=None):
        end = int(offset) + np.dtype(dtype).itemsize * int(count)
        if end > len(self.data):
            region = "tensor data" if int(offset) >= getattr(self, "data_offset", len(self.data)) else "header"
            raise _PastEnd(f"its {region} needs bytes {int(offset)}..{end}, but the file has {len(self.data)} bytes")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type == gguf.GGUFValueType.ARRAY:
            item_type, length = int(self._get(orig_offs, np.uint32)[0]), int(self._get(orig_offs + 4, np.uint64)[0])
            item_bytes = np.dtype(self.gguf_scalar_to_np.get(gguf.GGUFValueType(item_type), np.uint64)).itemsize
            if length * item_bytes > len(self.data) - orig_offs:
                raise _PastEnd(f"a metadata array at byte {orig_offs} claims {length} items, more than the file holds")
        return super()._get_field_parts(orig_offs, raw_type)


@contextlib.contextmanager
def _naming(path: str | os.PathLike) -> Iterator[None]:
    """Re-raise what converting a parsed file raises as GGUFError naming the file."""
    try:
        yield
    except (ValueError, KeyError, IndexError, TypeError) as error:
        detail = str(error) if isinstance(error, ValueError) else f"{type(error).__name__}: {error}"
        raise GGUFError(f"{path}: {detail}") from None


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """All metadata of an open `gguf.GGUFReader` as plain Python values (strings decoded)."""
    return {key: field.contents() for key, field in reader.fields.items()}


def _float32_value(value: float) -> float:
    """The shortest decimal that is the same float32 (GGUF stores 1e-5 as 9.99999974738e-06)."""
    return float(str(np.float32(value)))


def gguf_to_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> dict[str, Any]:
    """LlamaConfig-style dict from GGUF metadata; refuses what it does not convert."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise ValueError(
            f"GGUF architecture {architecture!r} is not supported: streamjax.files.gguf reads only 'llama' "
            "(Llama, SmolLM, Mistral-style dense decoders)."
        )
    llama = {key[len("llama.") :]: value for key, value in metadata.items() if key.startswith("llama.")}
    unknown = sorted(set(llama) - set(_LLAMA_CONFIG_KEYS) - _LLAMA_CHECKED_KEYS)
    if unknown:
        raise ValueError(f"GGUF metadata has llama keys streamjax does not convert: {', '.join(unknown)}")
    config = {hf_key: llama[key] for key, hf_key in _LLAMA_CONFIG_KEYS.items() if key in llama}
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    config["rope_theta"] = _float32_value(config.get("rope_theta", 10000.0))
    config["rms_norm_eps"] = _float32_value(config["rms_norm_eps"])
    config["head_dim"] = _head_dim(llama, config)
    if (rope_scaling := _rope_scaling(llama, tensor_names)) is not None:
        config["rope_scaling"] = rope_scaling
    config.update(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_act="silu",
        attention_bias=any(name.endswith("attn_q.bias") for name in tensor_names),
        mlp_bias=any(name.endswith("ffn_up.bias") for name in tensor_names),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    return dict(sorted(config.items()))


def _head_dim(llama: dict[str, Any], config: dict[str, Any]) -> int:
    head_dim = llama.get("attention.key_length", config["hidden_size"] // config["num_attention_heads"])
    if llama.get("attention.value_length", head_dim) != head_dim:
        raise ValueError("GGUF has attention.key_length != attention.value_length; streamjax needs them equal")
    if llama.get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"GGUF rotates {llama['rope.dimension_count']} of {head_dim} head dims (partial rotary), "
            "which the llama family does not support"
        )
    return int(head_dim)


def _rope_scaling(llama: dict[str, Any], tensor_names: list[str]) -> dict[str, Any] | None:
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF has a rope_freqs tensor (Llama 3.1-style rope scaling), which is not supported")
    scaling_type = llama.get("rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _float32_value(llama["rope.scaling.factor"])}
    raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported (only 'none' and 'linear')")


def _name_table(num_layers: int) -> dict[str, str]:
    """Every llama.cpp tensor name stem -> Hugging Face stem, for `num_layers` layers."""
    table = {}
    for gguf_name, hf_name in _TENSOR_NAMES.items():
        layers = range(num_layers) if "{i}" in gguf_name else [None]
        table.update({gguf_name.format(i=i): hf_name.format(i=i) for i in layers})
    return table


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF weight shape by name suffix: [out, in] for linear layers."""
    hidden, inner = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    return {
        "embed_tokens.weight": (config["vocab_size"], hidden),
        "lm_head.weight": (config["vocab_size"], hidden),
        "norm.weight": (hidden,),
        "layernorm.weight": (hidden,),
        "q_proj.weight": (q_rows, hidden),
        "k_proj.weight": (kv_rows, hidden),
        "v_proj.weight": (kv_rows, hidden),
        "o_proj.weight": (hidden, q_rows),
        "q_proj.bias": (q_rows,),
        "k_proj.bias": (kv_rows,),
        "v_proj.bias": (kv_rows,),
        "gate_proj.weight": (inner, hidden),
        "up_proj.weight": (inner, hidden),
        "down_proj.weight": (hidden, inner),
    }


def _read_state_dict(reader: gguf.GGUFReader, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under HF names, Q/K rows in HF order, shapes checked."""
    names = _name_table(config["num_hidden_layers"])
    shapes = _expected_shapes(config)
    state_dict = {}
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        if stem not in names:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no Hugging Face llama counterpart")
        hf_name = f"{names[stem]}.{suffix}"
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        _check_finite(weight, tensor)
        if stem.endswith("attn_q"):
            weight = _unpermute_rope_rows(weight, config["num_attention_heads"])
        elif stem.endswith("attn_k"):
            weight = _unpermute_rope_rows(weight, config["num_key_value_heads"])
        expected = next((shape for key, shape in shapes.items() if hf_name.endswith(key)), None)
        if weight.shape != expected:
            raise ValueError(f"GGUF tensor {tensor.name!r} has shape {weight.shape}; {hf_name} needs {expected}")
        state_dict[hf_name] = np.array(weight, dtype=np.float32, copy=True)
    _check_complete(state_dict, names, config)
    return state_dict


def _check_finite(weight: np.ndarray, tensor: Any) -> None:
    """ValueError if a dequantized tensor holds inf or NaN (a corrupted scale, say): no trained weight does."""
    finite = np.isfinite(weight)
    if not finite.all():
        bad = finite.size - np.count_nonzero(finite)
        raise ValueError(
            f"tensor {tensor.name!r} ({tensor.tensor_type.name}) dequantizes to {bad} inf/NaN values, the first at "
            f"flat index {int(np.argmin(finite.ravel()))}: the file is corrupted; re-download it"
        )


def _unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """[N*H, ...] rows from llama.cpp's interleaved rotary pairs to HF's rotated halves.

    llama.cpp writes head row `2j + p` from HF row `p * H/2 + j` (p in {0, 1}); this inverts it.
    """
    rows = weight.shape[0]
    per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return np.swapaxes(per_head, 1, 2).reshape(weight.shape)


def _check_complete(state_dict: dict[str, np.ndarray], names: dict[str, str], config: dict[str, Any]) -> None:
    required = {f"{hf}.weight" for gguf_name, hf in names.items() if gguf_name != "output"}
    if not config["tie_word_embeddings"]:
        required.add("lm_head.weight")
    missing = sorted(required - set(state_dict))
    if missing:
        raise ValueError(f"GGUF file lacks tensors for: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")


def build_tokenizer(metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """Byte-level BPE `transformers.PreTrainedTokenizerFast` from `tokenizer.ggml.*` metadata.

    Adds a BOS only if the file says `tokenizer.ggml.add_bos_token` (SmolLM2's says False), like
    transformers. Importing `PreTrainedTokenizerFast` does not import torch.
    """
    from transformers import PreTrainedTokenizerFast  # lazy: importing transformers takes ~1.5 s

    tokens = metadata["tokenizer.ggml.tokens"]
    backend = build_backend_tokenizer(metadata)
    special = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    special_tokens = {name: tokens[metadata[key]] for name, key in special.items() if key in metadata}
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        **special_tokens,
    )


def build_backend_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """The `tokenizers.Tokenizer` (byte-level BPE, GPT-2 split regex) a gpt2-type GGUF describes."""
    model_type, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre", "default")
    if model_type != "gpt2":
        raise ValueError(f"GGUF tokenizer model {model_type!r} is not supported (only byte-level BPE 'gpt2')")
    if pre not in _GPT2_SPLIT_PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_GPT2_SPLIT_PRE_TOKENIZERS)}")
    tokens, token_types = metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type") or []
    alphabet = set(bytes_to_unicode().values())
    vocab = _byte_level_vocab(tokens)
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    typed = list(zip(tokens, token_types))
    control = [token for token, kind in typed if kind == _TOKEN_TYPE_CONTROL and set(token) <= alphabet]
    user_defined = [token for token, kind in typed if kind == _TOKEN_TYPE_USER_DEFINED and token in vocab]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in control])
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in user_defined])
    return tokenizer


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id, respelling in GPT-2's byte alphabet any token the file wrote as raw UTF-8."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    return {spelled(token): index for index, token in enumerate(tokens)}
