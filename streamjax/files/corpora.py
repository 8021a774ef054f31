"""Evaluation text: named corpora, text files, PG19, and their token ids.

A corpus spec is one of:
- "austen" (default): Jane Austen's six novels, Pride and Prejudice first (`streamjax.files.assets`);
- "mobydick": Moby Dick (`streamjax.files.assets`);
- a path to a text file;
- a PG19 directory, recognised by its `test/*.txt` books, of which those are used;
- any other directory: its `*.txt` files (not recursive);
- several of these joined by "+", read in that order, e.g. "austen+mobydick" (the long stream).
Several files are read in sorted file-name order (a directory's) and joined with "\\n\\n".

Decoding policy: every file is strict UTF-8, nothing guessed or replaced. A file that is not raises
CorpusError naming it and the byte offset of the first invalid byte (convert it first, e.g.
`iconv -f LATIN1 -t UTF-8`); a file with a NUL byte (a binary file, or UTF-16 text) raises CorpusError
naming it. Line ends "\\r\\n" and "\\r" become "\\n" (Python's universal newlines); a leading byte-order
mark is kept as U+FEFF.
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from streamjax.files import assets

NAMED_CORPORA = {"austen": assets.austen_text_path, "mobydick": assets.moby_dick_text_path}
DOCUMENT_SEPARATOR = "\n\n"
PIECE_CHARS = 100_000

# A paragraph break right after a non-space character. Text cut just before such a break splits into
# the same GPT-2-style pre-tokens as the whole text: the left side ends inside a run of non-space
# characters whose pre-token stops at the newline anyway, and the right side starts with the break.
_SAFE_CUT = re.compile(r"(?<=\S)\n\n")


class CorpusError(ValueError):
    """A corpus file or directory that cannot be read as text; the message names it."""


def corpus_files(spec: str = "austen") -> list[pathlib.Path]:
    """The text files a corpus spec names, in reading order."""
    if "+" in spec and not pathlib.Path(spec).expanduser().exists():
        return [file for part in spec.split("+") for file in corpus_files(part)]
    if spec in NAMED_CORPORA:
        return [NAMED_CORPORA[spec]()]
    path = pathlib.Path(spec).expanduser()
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(
            f"corpus {spec!r} is neither a named corpus ({', '.join(NAMED_CORPORA)}) nor an existing file or directory"
        )
    pg19_books = sorted((path / "test").glob("*.txt"))
    files = pg19_books or sorted(path.glob("*.txt"))
    if not files:
        raise CorpusError(f"directory {path} has no .txt files (nor a PG19 test/ folder with .txt files)")
    return files


def load_text(spec: str = "austen") -> str:
    """The whole text of a corpus: its files read as UTF-8 and joined with "\\n\\n"."""
    text = DOCUMENT_SEPARATOR.join(_read_documents(spec))
    if not text.strip():
        raise ValueError(f"corpus {spec!r} is empty (only whitespace)")
    return text


def _read_documents(spec: str) -> Iterator[str]:
    for file in corpus_files(spec):
        yield read_text_file(file)


def read_text_file(path: pathlib.Path) -> str:
    """The text of one corpus file by the module's decoding policy (strict UTF-8, no NUL bytes)."""
    raw = path.read_bytes()
    if (nul := raw.find(b"\0")) >= 0:
        raise CorpusError(
            f"{path} is not a text file: it has a NUL byte at offset {nul} (a binary file, or UTF-16 text: "
            f"convert that with `iconv -f UTF-16 -t UTF-8`)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise CorpusError(
            f"{path} is not UTF-8: {error.reason} at byte offset {error.start} (0x{raw[error.start]:02x}). "
            f"Convert it first, e.g. `iconv -f LATIN1 -t UTF-8 {path} > converted.txt`"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_pieces(documents: Iterator[str], piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """Pieces of about `piece_chars` characters whose concatenation is the documents joined by "\\n\\n".

    Every cut falls just before a paragraph break ("\\n\\n") that follows a non-space character, so
    a piece after the first starts with "\\n\\n". A stretch with no such break stays in one piece.
    """
    buffer = ""
    for index, document in enumerate(documents):
        buffer += (DOCUMENT_SEPARATOR if index else "") + document
        while len(buffer) > piece_chars and (cut := _SAFE_CUT.search(buffer, piece_chars)) is not None:
            yield buffer[: cut.start()]
            buffer = buffer[cut.start() :]
    if buffer:
        yield buffer


def load_corpus_tokens(spec: str = "austen", tokenizer: Any = None, num_tokens: int | None = None) -> np.ndarray:
    """Token ids [num_tokens] int32 of a corpus (fewer if the corpus is shorter; all if None).

    The text is tokenized in pieces (`text_pieces`) with `tokenizer(piece).input_ids`. For a
    GPT-2-style byte-level BPE (SmolLM2) this equals tokenizing the whole text at once, because the
    cuts fall where pre-tokenization splits anyway (tests/test_data.py checks it on Austen); a
    tokenizer that treats the start of each call specially (a SentencePiece dummy prefix space) can
    differ by a token at each of the ~len(text) / 100k cuts. Special tokens the tokenizer adds to
    every call (`special_tokens`) appear once, as in one call on the whole text: the leading ones
    (a BOS) at the start, the trailing ones (an EOS) at the end. Reading stops once `num_tokens` ids
    are collected.
    """
    if tokenizer is None:
        raise ValueError("load_corpus_tokens needs a tokenizer (e.g. streamjax.files.gguf.load_gguf_tokenizer(path))")
    if num_tokens is not None and num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1 or None, got {num_tokens}")
    chunks, count = [], 0
    for ids in _tokenize_pieces(text_pieces(_read_documents(spec), PIECE_CHARS), tokenizer):
        chunks.append(ids)
        count += len(ids)
        if num_tokens is not None and count >= num_tokens:
            break
    if not chunks:
        raise ValueError(f"corpus {spec!r} is empty")
    return np.concatenate(chunks)[:num_tokens]


def special_tokens(tokenizer: Any, text: str) -> tuple[list[int], list[int]]:
    """(leading, trailing): the special token ids `tokenizer` adds before and after every call's tokens.

    `tokenizer("")` is both together, e.g. [BOS], [EOS] or [BOS, EOS]. The leading ones are what it
    shares at the start with the tokens of a one-character probe (the first non-space character of
    `text`, which must tokenize to a token of its own), since such a token is not a special one.
    """
    specials = list(tokenizer("").input_ids)
    probe = text.strip()[:1] or text[:1]
    ids = list(tokenizer(probe).input_ids)
    if len(ids) <= len(specials):
        raise ValueError(f"cannot tell the tokenizer's special tokens: {probe!r} gives no token of its own")
    shared = 0
    while shared < len(specials) and ids[shared] == specials[shared]:
        shared += 1
    leading, trailing = specials[:shared], specials[shared:]
    if ids[len(ids) - len(trailing) :] != trailing:
        raise ValueError(f"the tokenizer does not add {specials} around the tokens of {probe!r} ({ids})")
    return leading, trailing


def strip_special_tokens(ids: list[int], leading: list[int], trailing: list[int]) -> list[int]:
    """`ids` of one tokenizer call without the `leading` and `trailing` special tokens it added."""
    end = len(ids) - len(trailing)
    if ids[: len(leading)] != leading or ids[end:] != trailing or end < len(leading):
        raise ValueError(f"tokens {ids[:8]}...{ids[-8:]} do not start with {leading} and end with {trailing}")
    return ids[len(leading) : end]


def _tokenize_pieces(pieces: Iterator[str], tokenizer: Any) -> Iterator[np.ndarray]:
    """Ids [n] int32 of each piece without the tokenizer's per-call special tokens, the leading ones
    (BOS) put before the first piece and the trailing ones (EOS) after the last, as one call would.

    Only the first piece can be blank: any later cut follows a non-space character in the first.
    """
    trailing: list[int] = []
    for index, piece in enumerate(pieces):
        if index == 0:
            if not piece.strip():
                raise ValueError("corpus is empty (no text besides whitespace)")
            leading, trailing = special_tokens(tokenizer, piece)
        ids = strip_special_tokens(list(tokenizer(piece).input_ids), leading, trailing)
        yield np.asarray((leading if index == 0 else []) + ids, dtype=np.int32)
    if trailing:
        yield np.asarray(trailing, dtype=np.int32)
