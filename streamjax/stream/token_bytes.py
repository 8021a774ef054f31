"""The bytes each token id stands for, so stop strings can be matched on device (`stream.stopping`).

Letters: V vocabulary, L the longest token in bytes.

`token_bytes` (host): every token's bytes, [V, L] uint8 and lengths [V], exact for byte-level BPE
tokenizers (GPT-2's byte-to-unicode spelling) and SentencePiece-style ones ("▁" for a space, `<0xNN>`
byte-fallback tokens); special and added tokens are their content's UTF-8 bytes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    shifted = (byte for byte in range(256) if byte not in table)
    table.update({byte: chr(256 + offset) for offset, byte in enumerate(shifted)})
    return dict(sorted(table.items()))


@flax.struct.dataclass
class TokenBytes:
    """Every token's bytes: `table` [V, L] uint8 (zero-padded), `lengths` [V] int32."""

    table: jax.Array
    lengths: jax.Array


def token_bytes(tokenizer: Any, vocab_size: int | None = None) -> TokenBytes:
    """`TokenBytes` of a transformers fast tokenizer (see `token_byte_strings`), `vocab_size` rows if given."""
    return pack_token_bytes(token_byte_strings(tokenizer), vocab_size)


def pack_token_bytes(strings: Sequence[bytes], vocab_size: int | None = None) -> TokenBytes:
    """`TokenBytes` of token byte strings, `vocab_size` rows (default one per string; the model's
    vocabulary may be larger than the tokenizer's: ids past the strings have no bytes)."""
    vocab_size = len(strings) if vocab_size is None else vocab_size
    if vocab_size < len(strings):
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(strings)} tokens")
    lengths = np.zeros(vocab_size, np.int32)
    lengths[: len(strings)] = [len(token) for token in strings]
    table = np.zeros((vocab_size, max(1, lengths.max(initial=0))), np.uint8)
    for index, token in enumerate(strings):
        table[index, : len(token)] = np.frombuffer(token, np.uint8)
    return TokenBytes(jnp.asarray(table), jnp.asarray(lengths))


def token_byte_strings(tokenizer: Any) -> list[bytes]:
    """The bytes of token 0 .. len(tokenizer) - 1, as its decoder writes them mid-text.

    Byte-level BPE (decoder ByteLevel): each character of a token stands for one byte (GPT-2's
    table). SentencePiece style (decoders among Replace "▁" -> " ", ByteFallback, Fuse, Strip,
    Metaspace): "▁" is a space and `<0xNN>` the byte NN; the space a decoder strips at the very
    start of a text is kept, since generated tokens never start the text. Special and added
    tokens: their content. Other decoders raise ValueError.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        kind = type(tokenizer).__name__
        raise ValueError(
            f"stop strings need a fast (tokenizers-backed) tokenizer to know each token's bytes; got {kind}"
        )
    spec = json.loads(backend.to_str())
    to_bytes = _byte_level_token if _decoder_kind(spec["decoder"]) == "byte_level" else _sentencepiece_token
    added = {index: token.content.encode("utf-8") for index, token in tokenizer.added_tokens_decoder.items()}
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [added[i] if i in added else to_bytes(token) for i, token in enumerate(tokens)]


_SENTENCEPIECE_DECODERS = {"ByteFallback", "Fuse", "Strip", "Metaspace"}


def _decoder_kind(decoder: dict | None) -> str:
    """ "byte_level" or "sentencepiece" from a tokenizer.json decoder; ValueError for anything else."""
    steps = decoder.get("decoders", [decoder]) if decoder else []
    if [step["type"] for step in steps] == ["ByteLevel"]:
        return "byte_level"

    def sentencepiece_step(step: dict) -> bool:
        is_space = step["type"] == "Replace" and step["pattern"].get("String") == "▁" and step["content"] == " "
        return is_space or step["type"] in _SENTENCEPIECE_DECODERS

    if steps and all(sentencepiece_step(step) for step in steps):
        return "sentencepiece"
    raise ValueError(
        f"stop strings need each token's exact bytes, which streamjax knows for byte-level BPE and "
        f"SentencePiece-style (▁, <0xNN>) tokenizers; this tokenizer's decoder is {json.dumps(decoder)}"
    )


_BYTE_OF_CHARACTER = {character: byte for byte, character in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_token(token: str) -> bytes:
    try:
        return bytes(_BYTE_OF_CHARACTER[character] for character in token)
    except KeyError as error:
        raise ValueError(f"byte-level token {token!r} has a character outside GPT-2's byte alphabet: {error}") from None


def _sentencepiece_token(token: str) -> bytes:
    fallback = _BYTE_FALLBACK.fullmatch(token)
    return bytes([int(fallback[1], 16)]) if fallback else token.replace("▁", " ").encode("utf-8")
