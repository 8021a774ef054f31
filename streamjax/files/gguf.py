"""Reading GGUF files (llama.cpp's format) into numpy, without torch: architectures "llama" and "gemma3".

`load_gguf` returns what the rest of streamjax expects from a Hugging Face checkpoint: a config dict
(LlamaConfig-style, or Gemma3TextConfig-style), float32 tensors under the Hugging Face `*ForCausalLM`
names and shapes, and a tokenizer. All three are built to equal what transformers builds from the same
file (`from_pretrained(dir, gguf_file=name)`); `tests/files/test_gguf.py` and `test_gguf_gemma3.py` check it.
Each architecture is one entry of `ARCHITECTURES`: its metadata keys, its tensor names, its tokenizer, and
what llama.cpp changed on the way in, which is undone here:
- quantized tensors (Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, ...) are dequantized with `gguf.quants.dequantize`;
- llama: the rows of each Q and K head are interleaved (pairs `(2i, 2i + 1)` rotate together) where
  Hugging Face puts the two rotated halves one after the other; `_unpermute_rope_rows` undoes it
  (Gemma's converter leaves the rows in Hugging Face order);
- gemma3: every norm weight was stored as `1 + w` (Gemma's RMSNorm scales by `1 + w`); 1 is subtracted.

A bad file raises `GGUFError` naming the file and what is wrong: not GGUF (magic), an unknown
version, a header or metadata that cannot be parsed, data past the end of the file (truncated), or a
tensor that dequantizes to inf/NaN (e.g. a flipped byte in a Q4_1 scale). GGUF has no checksum, so a
flipped byte that still parses (inside the quantized nibbles, or in a metadata string or number)
cannot be seen here; the default assets are checked against their SHA-256 (`streamjax.files.assets`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from streamjax.stream.token_bytes import bytes_to_unicode

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

# llama.cpp tensor name -> Hugging Face name ({i} is the layer index): what llama and gemma3 share.
_DECODER_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
# Metadata keys under `<architecture>.` that every architecture here copies into the same config field.
_DECODER_CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# `<architecture>.` keys read by the config builders themselves (head size, RoPE).
_HEAD_AND_ROPE_KEYS = frozenset(
    {
        "attention.key_length",
        "attention.value_length",
        "rope.dimension_count",
        "rope.scaling.type",
        "rope.scaling.factor",
    }
)
# Gemma 3 makes every sixth layer global (transformers' Gemma3TextConfig default, llama.cpp's `set_swa_pattern(6)`).
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # the sliding layers' RoPE base when the file has no `rope.freq_base_swa`
_GEMMA3_27B_LAYERS = 62  # llama.cpp's query scale is hidden/heads for this size only (see `_gemma3_query_scalar`)

# `tokenizer.ggml.pre` values for which transformers splits text with the plain GPT-2 byte-level
# regex. (llama.cpp itself splits digits one by one for "smollm"; transformers does not, and we
# follow transformers.) Other values need their own split regex and are refused.
_GPT2_SPLIT_PRE_TOKENIZERS = {"default", "gpt2", "gpt-2", "smollm", "starcoder"}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4
_SENTENCEPIECE_SPACE = "\u2581"  # "▁", how SentencePiece spells a space inside a token
_HEADER_BYTES = 24  # magic, version, tensor count, metadata count
_READABLE_VERSIONS = (2, gguf.GGUF_VERSION)  # what gguf.GGUFReader reads


class GGUFError(ValueError):
    """A GGUF file that is not GGUF, truncated or corrupted, or that streamjax cannot convert; names the file."""


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFCheckpoint:
    """A GGUF file converted to Hugging Face conventions.

    hf_config: Hugging Face config dict (model_type "llama" or "gemma3_text", sizes, rms_norm_eps, RoPE, ...).
    state_dict: float32 arrays under the `*ForCausalLM` names, linear weights as [out, in].
    tokenizer: `transformers.PreTrainedTokenizerFast` equal to transformers' GGUF tokenizer.
    metadata: every metadata key of the file, arrays as lists.
    """

    hf_config: dict[str, Any]
    state_dict: dict[str, np.ndarray]
    tokenizer: PreTrainedTokenizerFast
    metadata: dict[str, Any]


def load_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a GGUF file of a supported architecture (`ARCHITECTURES`): config, float32 weights and tokenizer."""
    reader, metadata = _read(path)
    with _naming(path):
        hf_config = gguf_to_hf_config(metadata, [tensor.name for tensor in reader.tensors])
        state_dict = _read_state_dict(reader, hf_config, architecture(metadata))
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
    file (which the base class would walk item by item for minutes).

    It also slices a plain ndarray view of the memory-mapped file: the base class slices the `np.memmap`
    itself, whose per-slice bookkeeping made reading Gemma 3's three 262,144-item vocabulary arrays take
    about 14 s.
    """

    def _get(self, offset, dtype, count=1, override_order=None):
        start, count = int(offset), int(count)
        end = start + np.dtype(dtype).itemsize * count
        if end > len(self.data):
            region = "tensor data" if start >= getattr(self, "data_offset", len(self.data)) else "header"
            raise _PastEnd(f"its {region} needs bytes {start}..{end}, but the file has {len(self.data)} bytes")
        if getattr(self, "_plain_data", None) is None:
            self._plain_data = self.data.view(np.ndarray)
        values = self._plain_data[start:end].view(dtype)[:count]
        return values.view(values.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _get_field_parts(self, orig_offs, raw_type):
        """The base class's parts of one field, an array of numbers or strings read without its per-item
        recursion (the same parts: one per number, a length and a bytes part per string)."""
        if raw_type != gguf.GGUFValueType.ARRAY:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_item_type, raw_length = self._get(orig_offs, np.uint32), self._get(orig_offs + 4, np.uint64)
        item_type, length = gguf.GGUFValueType(int(raw_item_type[0])), int(raw_length[0])
        item_dtype = self.gguf_scalar_to_np.get(item_type)
        if length * np.dtype(item_dtype or np.uint64).itemsize > len(self.data) - orig_offs:
            raise _PastEnd(f"a metadata array at byte {orig_offs} claims {length} items, more than the file holds")
        parts, types = [raw_item_type, raw_length], [gguf.GGUFValueType.ARRAY, item_type]
        if item_dtype is not None:
            values = self._get(orig_offs + 12, item_dtype, length)
            return 12 + int(values.nbytes), parts + list(values.reshape(length, 1)), list(range(2, 2 + length)), types
        if item_type != gguf.GGUFValueType.STRING:  # an array of arrays: the base class's walk
            return super()._get_field_parts(orig_offs, raw_type)
        offset = orig_offs + 12
        for _ in range(length):
            size = self._get(offset, np.uint64)
            parts += (size, self._get(offset + 8, np.uint8, size[0]))
            offset += 8 + int(size[0])
        return offset - orig_offs, parts, list(range(3, len(parts), 2)), types


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
    """Hugging Face config dict from GGUF metadata (`architecture(metadata).build_config`); refuses what it does
    not convert."""
    spec = architecture(metadata)
    prefix = f"{spec.name}."
    keys = {key[len(prefix) :]: value for key, value in metadata.items() if key.startswith(prefix)}
    unknown = sorted(set(keys) - set(_DECODER_CONFIG_KEYS) - spec.extra_keys)
    if unknown:
        raise ValueError(f"GGUF metadata has {spec.name} keys streamjax does not convert: {', '.join(unknown)}")
    config = {hf_key: keys[key] for key, hf_key in _DECODER_CONFIG_KEYS.items() if key in keys}
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    config["rms_norm_eps"] = _float32_value(config["rms_norm_eps"])
    config["head_dim"] = _head_dim(keys, config)
    config.update(
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )
    config.update(spec.build_config(keys, config, tensor_names))
    return dict(sorted(config.items()))


def _llama_config(keys: dict[str, Any], config: dict[str, Any], tensor_names: list[str]) -> dict[str, Any]:
    """LlamaConfig fields beyond the shared ones."""
    fields = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "rope_theta": _float32_value(keys.get("rope.freq_base", 10000.0)),
        "attention_bias": any(name.endswith("attn_q.bias") for name in tensor_names),
        "mlp_bias": any(name.endswith("ffn_up.bias") for name in tensor_names),
    }
    if (rope_scaling := _rope_scaling(keys, tensor_names)) is not None:
        fields["rope_scaling"] = rope_scaling
    return fields


def _gemma3_config(keys: dict[str, Any], config: dict[str, Any], tensor_names: list[str]) -> dict[str, Any]:
    """Gemma3TextConfig fields beyond the shared ones; on the Gemma 3 270M file every field equals transformers'.

    A GGUF states no layer pattern, query scale or (before `rope.freq_base_swa`) local RoPE base: transformers
    and llama.cpp both take every sixth layer global and RoPE base 10,000 on the sliding layers; the query
    scale follows llama.cpp (`_gemma3_query_scalar`) where transformers keeps its default 256. Linear RoPE
    scaling (Gemma 3 4B and larger), `rope.freq_base_swa` and a final-logit soft-cap, which transformers'
    GGUF load ignores, become what Gemma3TextConfig makes of the same fields in a config.json (the scaling
    on the global layers only).
    """
    if "attention.sliding_window" not in keys:
        raise ValueError("gemma3 GGUF has no attention.sliding_window, which its sliding layers need")
    biases = sorted(name for name in tensor_names if name.endswith(".bias"))
    if biases:
        raise ValueError(f"gemma3 GGUF has bias tensors ({', '.join(biases[:3])}), which Gemma 3 does not have")
    full_rope = {"rope_type": "default", "rope_theta": _float32_value(keys.get("rope.freq_base", 1_000_000.0))}
    full_rope.update(_rope_scaling(keys, tensor_names) or {})
    local_theta = _float32_value(keys.get("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA))
    softcap = keys.get("final_logit_softcapping")
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": int(keys["attention.sliding_window"]),
        "layer_types": gemma3_layer_types(config["num_hidden_layers"]),
        "rope_parameters": {
            "full_attention": full_rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
        },
        "query_pre_attn_scalar": _gemma3_query_scalar(config),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None if softcap is None else _float32_value(softcap),
        "use_bidirectional_attention": False,
    }


def gemma3_layer_types(num_layers: int) -> list[str]:
    """Gemma 3's 5:1 pattern: layer i is global when (i + 1) is a multiple of 6, sliding otherwise."""
    return [
        "full_attention" if (index + 1) % GEMMA3_SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
        for index in range(num_layers)
    ]


def _gemma3_query_scalar(config: dict[str, Any]) -> int:
    """The `query_pre_attn_scalar` llama.cpp uses: head_dim, but hidden/heads for Gemma 3 27B (62 layers, whose own
    config says 168). transformers' GGUF load keeps its default 256, which equals head_dim for the 270M file."""
    if config["num_hidden_layers"] == _GEMMA3_27B_LAYERS:
        return config["hidden_size"] // config["num_attention_heads"]
    return config["head_dim"]


def _head_dim(keys: dict[str, Any], config: dict[str, Any]) -> int:
    head_dim = keys.get("attention.key_length", config["hidden_size"] // config["num_attention_heads"])
    if keys.get("attention.value_length", head_dim) != head_dim:
        raise ValueError("GGUF has attention.key_length != attention.value_length; streamjax needs them equal")
    if keys.get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError(
            f"GGUF rotates {keys['rope.dimension_count']} of {head_dim} head dims (partial rotary), "
            "which streamjax does not support for GGUF files"
        )
    return int(head_dim)


def _rope_scaling(keys: dict[str, Any], tensor_names: list[str]) -> dict[str, Any] | None:
    if "rope_freqs.weight" in tensor_names:
        raise ValueError("GGUF has a rope_freqs tensor (Llama 3.1-style rope scaling), which is not supported")
    scaling_type = keys.get("rope.scaling.type", "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _float32_value(keys["rope.scaling.factor"])}
    raise ValueError(f"GGUF rope scaling type {scaling_type!r} is not supported (only 'none' and 'linear')")


def _name_table(spec: Architecture, num_layers: int) -> dict[str, str]:
    """Every llama.cpp tensor name stem -> Hugging Face stem, for `num_layers` layers."""
    table = {}
    for gguf_name, hf_name in spec.tensor_names.items():
        layers = range(num_layers) if "{i}" in gguf_name else [None]
        table.update({gguf_name.format(i=i): hf_name.format(i=i) for i in layers})
    return table


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF weight shape by the last two parts of its name: [out, in] for linear layers."""
    hidden, inner, head_dim = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    norms = ("norm", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm")
    return {
        "embed_tokens.weight": (config["vocab_size"], hidden),
        "lm_head.weight": (config["vocab_size"], hidden),
        **{f"{norm}.weight": (hidden,) for norm in (*norms, "post_feedforward_layernorm")},
        "q_norm.weight": (head_dim,),
        "k_norm.weight": (head_dim,),
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


def _read_state_dict(reader: gguf.GGUFReader, config: dict[str, Any], spec: Architecture) -> dict[str, np.ndarray]:
    """Dequantized float32 tensors under HF names, llama.cpp's changes undone, shapes checked."""
    names = _name_table(spec, config["num_hidden_layers"])
    shapes = _expected_shapes(config)
    state_dict = {}
    for tensor in reader.tensors:
        stem, _, suffix = tensor.name.rpartition(".")
        if stem not in names:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no Hugging Face {spec.name} counterpart")
        hf_name = f"{names[stem]}.{suffix}"
        weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        _check_finite(weight, tensor)
        weight = _undo_llama_cpp(weight, stem, hf_name, spec, config)
        expected = shapes.get(".".join(hf_name.split(".")[-2:]))
        if weight.shape != expected:
            raise ValueError(f"GGUF tensor {tensor.name!r} has shape {weight.shape}; {hf_name} needs {expected}")
        # An F32 tensor is still a view of the memory-mapped file: copy it out (a dequantized one is fresh).
        state_dict[hf_name] = np.array(weight, copy=True) if np.may_share_memory(weight, tensor.data) else weight
    _check_complete(state_dict, names, config)
    return state_dict


def _undo_llama_cpp(
    weight: np.ndarray, stem: str, hf_name: str, spec: Architecture, config: dict[str, Any]
) -> np.ndarray:
    """A dequantized tensor back in Hugging Face form: Q/K rows de-interleaved, norm weights unshifted."""
    if spec.interleaved_rope and stem.endswith("attn_q"):
        return _unpermute_rope_rows(weight, config["num_attention_heads"])
    if spec.interleaved_rope and stem.endswith("attn_k"):
        return _unpermute_rope_rows(weight, config["num_key_value_heads"])
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        return weight - np.float32(spec.norm_shift)  # in float32, as transformers does
    return weight


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
    """`transformers.PreTrainedTokenizerFast` from `tokenizer.ggml.*` metadata, equal to transformers' own.

    Adds a BOS as the file's `tokenizer.ggml.add_bos_token` says (SmolLM2's says False, Gemma 3's True;
    a SentencePiece file that does not say adds one, as llama.cpp and transformers do). Importing
    `PreTrainedTokenizerFast` does not import torch.
    """
    from transformers import PreTrainedTokenizerFast  # lazy: importing transformers takes ~1.5 s

    kind = _tokenizer_kind(metadata)
    tokens = metadata["tokenizer.ggml.tokens"]
    special = {
        "bos_token": "tokenizer.ggml.bos_token_id",
        "eos_token": "tokenizer.ggml.eos_token_id",
        "unk_token": "tokenizer.ggml.unknown_token_id",
        "pad_token": "tokenizer.ggml.padding_token_id",
    }
    special_tokens = {name: tokens[metadata[key]] for name, key in special.items() if key in metadata}
    return PreTrainedTokenizerFast(
        tokenizer_object=kind.build_backend(metadata),
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", kind.adds_bos_by_default)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
        **special_tokens,
        **kind.class_defaults,
    )


def build_backend_tokenizer(metadata: dict[str, Any]) -> Tokenizer:
    """The `tokenizers.Tokenizer` the file's `tokenizer.ggml.*` metadata describes."""
    return _tokenizer_kind(metadata).build_backend(metadata)


def _tokenizer_kind(metadata: dict[str, Any]) -> TokenizerKind:
    spec = architecture(metadata)
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type not in spec.tokenizers:
        raise ValueError(
            f"GGUF tokenizer model {model_type!r} is not supported for architecture {spec.name!r} "
            f"(only {', '.join(map(repr, spec.tokenizers))})"
        )
    return spec.tokenizers[model_type]


def _byte_level_bpe_backend(metadata: dict[str, Any]) -> Tokenizer:
    """Byte-level BPE with the GPT-2 split regex (a "gpt2" tokenizer model)."""
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _GPT2_SPLIT_PRE_TOKENIZERS:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported; known: {sorted(_GPT2_SPLIT_PRE_TOKENIZERS)}")
    tokens = metadata["tokenizer.ggml.tokens"]
    alphabet = set(bytes_to_unicode().values())
    vocab = _byte_level_vocab(tokens)
    merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    # A control token outside the byte alphabet is a llama.cpp mislabel; transformers skips it too.
    _add_typed_tokens(tokenizer, metadata, vocab, keep_control=lambda token: set(token) <= alphabet)
    return tokenizer


def _byte_level_vocab(tokens: list[str]) -> dict[str, int]:
    """Token -> id, respelling in GPT-2's byte alphabet any token the file wrote as raw UTF-8."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    return {spelled(token): index for index, token in enumerate(tokens)}


def _gemma_sentencepiece_backend(metadata: dict[str, Any]) -> Tokenizer:
    """Gemma's SentencePiece BPE (a "llama" tokenizer model in a gemma3 file), as transformers rebuilds it.

    Spaces become "▁" before splitting after each space; unknown characters fall back to `<0xNN>` byte
    tokens. The file has no merges: they are every split of a vocabulary token into two vocabulary tokens
    (`sentencepiece_merges`). Tokens the file wrote with real spaces ("  ") are looked up as "▁▁".
    """
    tokens = metadata["tokenizer.ggml.tokens"]
    respelled = [_SENTENCEPIECE_SPACE * len(token) if " " in token and not token.strip() else token for token in tokens]
    vocab = {token: index for index, token in enumerate(respelled)}
    unknown = tokens[metadata["tokenizer.ggml.unknown_token_id"]]
    tokenizer = Tokenizer(
        models.BPE(vocab, sentencepiece_merges(vocab), unk_token=unknown, fuse_unk=True, byte_fallback=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", _SENTENCEPIECE_SPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SENTENCEPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    _add_typed_tokens(tokenizer, metadata, vocab, keep_control=lambda token: True)
    return tokenizer


def sentencepiece_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary (token -> id): every split of a token into two tokens,
    the tokens in id order (Gemma's scores do not follow its merge order; its token order does), each token's
    splits longest left piece first. The same list transformers derives (`generate_merges` with -id scores)."""
    merges = []
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        for cut in range(len(token) - 1, 0, -1):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


def _add_typed_tokens(tokenizer: Tokenizer, metadata: dict[str, Any], vocab: dict[str, int], keep_control) -> None:
    """Add the file's control tokens (type 3, those `keep_control` accepts) as special tokens and its
    user-defined ones (type 4, e.g. "\\n\\n" or `<think>`) that are in `vocab` as plain added tokens, so
    that both are matched whole in the text, as llama.cpp and transformers do."""
    typed = list(zip(metadata["tokenizer.ggml.tokens"], metadata.get("tokenizer.ggml.token_type") or []))
    control = [token for token, kind in typed if kind == _TOKEN_TYPE_CONTROL and keep_control(token)]
    user_defined = [token for token, kind in typed if kind == _TOKEN_TYPE_USER_DEFINED and token in vocab]
    tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True) for token in control])
    tokenizer.add_tokens([AddedToken(token, normalized=False, special=False) for token in user_defined])


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """How one `tokenizer.ggml.model` becomes a tokenizer: its backend, and what transformers' tokenizer class
    for it assumes that the file does not say."""

    build_backend: Callable[[dict[str, Any]], Tokenizer]
    adds_bos_by_default: bool = False
    class_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


BYTE_LEVEL_BPE = TokenizerKind(_byte_level_bpe_backend)
# transformers' GemmaTokenizer: a `<mask>` token and left padding.
GEMMA_SENTENCEPIECE = TokenizerKind(
    _gemma_sentencepiece_backend,
    adds_bos_by_default=True,
    class_defaults={"mask_token": "<mask>", "padding_side": "left"},
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one GGUF `general.architecture` becomes a Hugging Face model.

    extra_keys: `<name>.` metadata keys `build_config` reads, beyond `_DECODER_CONFIG_KEYS`; any other is refused.
    build_config(keys, config, tensor_names): the config fields of this architecture, given its `<name>.` keys
        (prefix dropped) and the shared fields already in `config`.
    tensor_names: llama.cpp tensor name stem -> Hugging Face name ({i} the layer index).
    interleaved_rope: llama.cpp interleaved each Q/K head's two rotary halves (undone on reading).
    norm_shift: llama.cpp stored every norm weight as `w + norm_shift` (undone on reading).
    tokenizers: the `tokenizer.ggml.model`s it comes with, and how each becomes a tokenizer.
    """

    name: str
    extra_keys: frozenset[str]
    build_config: Callable[[dict[str, Any], dict[str, Any], list[str]], dict[str, Any]]
    tensor_names: Mapping[str, str]
    interleaved_rope: bool
    norm_shift: float
    tokenizers: Mapping[str, TokenizerKind]


ARCHITECTURES = {
    "llama": Architecture(
        name="llama",
        extra_keys=_HEAD_AND_ROPE_KEYS | {"rope.freq_base"},
        build_config=_llama_config,
        tensor_names=_DECODER_TENSOR_NAMES | {"blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm"},
        interleaved_rope=True,
        norm_shift=0.0,
        tokenizers={"gpt2": BYTE_LEVEL_BPE},
    ),
    "gemma3": Architecture(
        name="gemma3",
        extra_keys=_HEAD_AND_ROPE_KEYS
        | {"rope.freq_base", "rope.freq_base_swa", "attention.sliding_window", "final_logit_softcapping"},
        build_config=_gemma3_config,
        tensor_names=_DECODER_TENSOR_NAMES
        | {
            "blk.{i}.attn_q_norm": "model.layers.{i}.self_attn.q_norm",
            "blk.{i}.attn_k_norm": "model.layers.{i}.self_attn.k_norm",
            "blk.{i}.post_attention_norm": "model.layers.{i}.post_attention_layernorm",
            "blk.{i}.ffn_norm": "model.layers.{i}.pre_feedforward_layernorm",
            "blk.{i}.post_ffw_norm": "model.layers.{i}.post_feedforward_layernorm",
        },
        interleaved_rope=False,
        norm_shift=1.0,
        tokenizers={"llama": GEMMA_SENTENCEPIECE},
    ),
}


def architecture(metadata: dict[str, Any]) -> Architecture:
    """The `ARCHITECTURES` entry of a file's `general.architecture`; ValueError naming the supported ones."""
    name = metadata.get("general.architecture")
    if name not in ARCHITECTURES:
        supported = ", ".join(map(repr, ARCHITECTURES))
        raise ValueError(
            f"GGUF architecture {name!r} is not supported: streamjax.files.gguf reads {supported} "
            "(Llama, SmolLM, Mistral-style dense decoders; Gemma 3)."
        )
    return ARCHITECTURES[name]
