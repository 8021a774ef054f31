"""streamjax.files.corpora: corpus specs, paragraph-aligned chunked tokenization, errors."""

from __future__ import annotations

import types

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from streamjax.files import assets, corpora

SAMPLE = (
    "It is a truth universally acknowledged, that a single man in possession\n"
    "of a good fortune, must be in want of a wife.  \n\n"
    "However little known the feelings or views of such a man may be on his\n"
    "first entering a neighbourhood, this truth is so well fixed.\n\n\n"
    "“My dear Mr. Bennet,” said his lady to him one day, 1811 or 1812.\n\n"
    "   Indented paragraph\twith a tab.\n\n\n\n"
    "Mr. Bennet replied that he had not.\n"
)


BOS, EOS = 0, 1
# Post-processor templates: what special tokens the tokenizer adds to every call.
TEMPLATES = {"none": None, "bos": "<s> $A", "eos": "$A </s>", "bos+eos": "<s> $A </s>"}


class TinyTokenizer:
    """The `tokenizer(text).input_ids` protocol over a byte-level BPE trained on SAMPLE; `template` (a
    TEMPLATES value) adds a BOS <s> (id 0) and/or an EOS </s> (id 1) to every call."""

    def __init__(self, template: str | None = None):
        self.backend = Tokenizer(models.BPE())
        self.backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        )
        self.backend.train_from_iterator([SAMPLE] * 4, trainer)
        if template:
            specials = [("<s>", BOS), ("</s>", EOS)]
            self.backend.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
        self.calls = 0

    def __call__(self, text: str):
        self.calls += 1
        return types.SimpleNamespace(input_ids=self.backend.encode(text).ids)


@pytest.fixture(scope="module")
def tokenizer():
    return TinyTokenizer()


def test_text_pieces_hand_example():
    text = "aaa\n\nbb  \n\ncc\n\ndd"
    # Cuts fall before a "\n\n" that follows a non-space character, never after "bb  ".
    assert list(corpora.text_pieces(iter([text]), piece_chars=2)) == ["aaa", "\n\nbb  \n\ncc", "\n\ndd"]
    assert list(corpora.text_pieces(iter(["ab", "cd\n\nef"]), piece_chars=3)) == ["ab\n\ncd", "\n\nef"]
    assert list(corpora.text_pieces(iter(["no breaks at all"]), piece_chars=2)) == ["no breaks at all"]


@pytest.fixture(scope="module", params=list(TEMPLATES))
def any_tokenizer(request):
    """The tiny tokenizer with each kind of special tokens added to every call."""
    return TinyTokenizer(TEMPLATES[request.param])


@pytest.mark.parametrize("piece_chars", [1, 40, 100, 10_000])
def test_chunked_tokenization_equals_one_shot(tmp_path, any_tokenizer, monkeypatch, piece_chars):
    (tmp_path / "sample.txt").write_text(SAMPLE * 3, encoding="utf-8")
    monkeypatch.setattr(corpora, "PIECE_CHARS", piece_chars)
    pieces = list(corpora.text_pieces(iter([SAMPLE * 3]), piece_chars))
    assert "".join(pieces) == SAMPLE * 3
    tokens = corpora.load_corpus_tokens(str(tmp_path / "sample.txt"), any_tokenizer)
    assert tokens.dtype == np.int32
    np.testing.assert_array_equal(tokens, any_tokenizer(SAMPLE * 3).input_ids)


@pytest.mark.parametrize(
    "template, leading, trailing", [("none", [], []), ("bos", [BOS], []), ("eos", [], [EOS]), ("bos+eos", [BOS], [EOS])]
)
def test_special_tokens_appear_once_where_one_call_puts_them(tmp_path, monkeypatch, template, leading, trailing):
    special = TinyTokenizer(TEMPLATES[template])
    assert corpora.special_tokens(special, SAMPLE) == (leading, trailing)
    (tmp_path / "sample.txt").write_text(SAMPLE, encoding="utf-8")
    monkeypatch.setattr(corpora, "PIECE_CHARS", 50)
    assert len(list(corpora.text_pieces(iter([SAMPLE]), 50))) == 3  # tokenized in three calls
    tokens = corpora.load_corpus_tokens(str(tmp_path / "sample.txt"), special)
    np.testing.assert_array_equal(tokens, special(SAMPLE).input_ids)
    body = special(SAMPLE).input_ids[len(leading) : len(tokens) - len(trailing)]
    np.testing.assert_array_equal(tokens, leading + body + trailing)
    assert not np.isin(body, [BOS, EOS]).any()
    # Cut short, the tokens are the first ones of the whole: no EOS in the middle or at the cut.
    np.testing.assert_array_equal(corpora.load_corpus_tokens(str(tmp_path / "sample.txt"), special, 30), tokens[:30])


def test_hugging_face_tokenizer_with_bos_and_eos(tmp_path, monkeypatch):
    """A word-level `PreTrainedTokenizerFast` whose post-processor adds <s> ... </s> to every call."""
    words = SAMPLE.split()
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{word: 3 + i for i, word in enumerate(dict.fromkeys(words))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    assert corpora.special_tokens(tokenizer, SAMPLE) == ([1], [2])
    (tmp_path / "sample.txt").write_text(SAMPLE * 2, encoding="utf-8")
    monkeypatch.setattr(corpora, "PIECE_CHARS", 30)
    tokens = corpora.load_corpus_tokens(str(tmp_path / "sample.txt"), tokenizer)
    assert tokens.tolist() == [1, *(vocab[word] for word in (SAMPLE * 2).split()), 2]


def test_num_tokens_stops_early(tmp_path, monkeypatch):
    counting = TinyTokenizer()
    (tmp_path / "sample.txt").write_text(SAMPLE * 20, encoding="utf-8")
    monkeypatch.setattr(corpora, "PIECE_CHARS", 100)
    full = counting(SAMPLE * 20).input_ids
    counting.calls = 0
    tokens = corpora.load_corpus_tokens(str(tmp_path / "sample.txt"), counting, num_tokens=30)
    np.testing.assert_array_equal(tokens, full[:30])
    assert counting.calls <= 4  # two probes of its special tokens plus the one or two pieces needed, not all ~40


def test_directory_sorted_and_joined(tmp_path, tokenizer):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert corpora.load_text(str(tmp_path)) == "first\n\nsecond"
    np.testing.assert_array_equal(
        corpora.load_corpus_tokens(str(tmp_path), tokenizer), tokenizer("first\n\nsecond").input_ids
    )


def test_pg19_directory_uses_test_books(tmp_path):
    (tmp_path / "test").mkdir()
    (tmp_path / "train").mkdir()
    (tmp_path / "test" / "200.txt").write_text("book 200", encoding="utf-8")
    (tmp_path / "test" / "10.txt").write_text("book 10", encoding="utf-8")
    (tmp_path / "train" / "1.txt").write_text("train book", encoding="utf-8")
    (tmp_path / "readme.txt").write_text("not a book", encoding="utf-8")
    assert corpora.load_text(str(tmp_path)) == "book 10\n\nbook 200"  # file names sorted as strings


def test_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        corpora.load_text(str(tmp_path / "nowhere.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt files"):
        corpora.load_text(str(tmp_path / "empty"))
    (tmp_path / "blank.txt").write_text(" \n\n \n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        corpora.load_text(str(tmp_path / "blank.txt"))
    with pytest.raises(ValueError, match="empty"):
        corpora.load_corpus_tokens(str(tmp_path / "blank.txt"), tokenizer)
    (tmp_path / "zero.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        corpora.load_corpus_tokens(str(tmp_path / "zero.txt"), tokenizer)
    (tmp_path / "ok.txt").write_text("text", encoding="utf-8")
    with pytest.raises(ValueError, match="num_tokens"):
        corpora.load_corpus_tokens(str(tmp_path / "ok.txt"), tokenizer, num_tokens=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        corpora.load_corpus_tokens(str(tmp_path / "ok.txt"))


@pytest.mark.real_assets
def test_austen_with_smollm2_tokenizer(austen_text, smollm2_gguf):
    from streamjax.files import gguf

    text = corpora.load_text("austen")
    assert text.startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    assert "It is a truth universally acknowledged, that a single man in possession" in text[:1000]
    openings = ["PRIDE AND PREJUDICE", "SENSE AND SENSIBILITY", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY"]
    positions = [text.find(f"\n\n{title}\n") for title in openings[1:]]
    assert all(p > 0 for p in positions) and positions == sorted(positions), positions
    assert "\n\nPersuasion\n" in text[positions[-1] :]
    for name in assets.AUSTEN_NOVELS:
        novel = (austen_text.parent / "austen" / f"{name}.txt").read_text(encoding="utf-8")
        assert novel in text, name

    tokenizer = gguf.load_gguf_tokenizer(smollm2_gguf)
    tokens = corpora.load_corpus_tokens("austen", tokenizer)
    assert 700_000 < len(tokens) < 1_300_000, len(tokens)
    assert tokenizer.decode(tokens[:20]).startswith("PRIDE AND PREJUDICE\n\nBy Jane Austen")
    head = text[:300_000]
    chunks = list(corpora.text_pieces(iter([head])))
    assert len(chunks) == 3
    np.testing.assert_array_equal(np.concatenate([tokenizer(c).input_ids for c in chunks]), tokenizer(head).input_ids)
    np.testing.assert_array_equal(tokens[:1000], corpora.load_corpus_tokens("austen", tokenizer, num_tokens=1000))
