"""streamjax.stream.stopping: stop strings on device against a host-side search and, step for step, against
transformers' StopStringCriteria on the same tokenizer; token bytes against the tokenizers' own
decoding; end-of-sequence ids against transformers.

Tests marked `real_assets` use SmolLM2-135M-Instruct's GGUF (its tokenizer, built by streamjax
without torch, equals transformers' GGUF tokenizer: tests/test_gguf.py) and the Austen text, through
conftest's asset fixtures: a missing asset fails them unless STREAMJAX_ALLOW_MISSING_ASSETS=1.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamjax.files import chat_templates, corpora, end_ids, gguf
from streamjax.stream import stopping, templates, token_bytes

transformers = pytest.importorskip("transformers", reason="transformers builds the tokenizers")

# A hand-made vocabulary of byte strings: 日 (e6 97 a5) split over two tokens, 本 (e6 9c ac) whole.
VOCAB = [b"Hel", b"lo", b" wor", b"ld", b"!", b"\xe6\x97", b"\xa5", b"\xe6\x9c\xac", b"ab", b"c", b"abcab", b"<|end|>", b" ", b"a", b"b", b"bc", b"ca"]  # fmt: skip
TEXT_IDS = [0, 1, 2, 3, 4, 12, 5, 6, 7, 12, 8, 9, 10, 11, 4]  # b"Hello world! 日本 abcabcab<|end|>!"


def _stops_by_search(token_strings: list[bytes], ids: list[int], patterns: list[str]) -> list[bool]:
    """Host reference: does some pattern occur ending within token n's bytes, for each n."""
    text, stopped = b"", []
    for token in ids:
        start, text = len(text), text + token_strings[token]
        ends = [at + len(p) for p in map(str.encode, patterns) for at in _occurrences(text, p)]
        stopped.append(any(start < end <= len(text) for end in ends))
    return stopped


def _occurrences(text: bytes, pattern: bytes) -> list[int]:
    found, at = [], text.find(pattern)
    while at >= 0:
        found.append(at)
        at = text.find(pattern, at + 1)
    return found


def _run(per_stream: list[list[str]], table: token_bytes.TokenBytes, ids: np.ndarray, stops=None) -> np.ndarray:
    """[T, B] stopped flags of B streams fed the tokens ids [T, B] one step at a time (jitted), by `stops`
    (default: the shared automaton of `per_stream`)."""
    stops = stopping.stop_strings(per_stream) if stops is None else stops
    state = stopping.initial_state(len(per_stream))
    step, flags = jax.jit(stopping.read_token), []
    for tokens in np.asarray(ids, np.int32):
        state, stopped = step(stops, table, state, tokens)
        flags.append(np.asarray(stopped))
    return np.stack(flags)


def test_hand_made_stop_strings_stop_at_the_completing_token():
    per_stream = [
        ["lo wor"],  # spans tokens 1 and 2
        ["or"],  # inside token 2
        ["ello"],  # starts mid-token 0
        ["日"],  # multi-byte, split over tokens 6 and 7
        ["本 "],  # a whole multi-byte token then a space
        ["cabc", "bcab", "abcabcab"],  # overlapping, all completing within token 12 ("abcab")
        ["d!", "<|end|>!"],  # the second completes at the last token
        ["xyz"],  # never
        [],  # no stop strings
    ]
    flags = _run(per_stream, token_bytes.pack_token_bytes(VOCAB), np.tile(np.array(TEXT_IDS)[:, None], len(per_stream)))
    first = [int(np.argmax(column)) if column.any() else -1 for column in flags.T]
    assert first == [2, 2, 1, 7, 9, 12, 4, -1, -1]
    for b, patterns in enumerate(per_stream):
        assert flags[:, b].tolist() == _stops_by_search(VOCAB, TEXT_IDS, patterns), patterns
    assert np.flatnonzero(flags[:, 6]).tolist() == [4, 14] and np.flatnonzero(flags[:, 5]).tolist() == [12]


def test_random_overlapping_stop_strings_match_the_search():
    """Many short patterns over a three-letter alphabet: overlaps and failure links everywhere."""
    rng = np.random.default_rng(0)
    alphabet_tokens = [8, 9, 10, 13, 14, 15, 16]  # ab, c, abcab, a, b, bc, ca
    streams = 16
    ids = rng.choice(alphabet_tokens, (60, streams))
    per_stream = [["".join(rng.choice(list("abc"), rng.integers(1, 7))) for _ in range(rng.integers(1, 4))] for _ in range(streams)]  # fmt: skip
    flags = _run(per_stream, token_bytes.pack_token_bytes(VOCAB), ids)
    for b in range(streams):
        assert flags[:, b].tolist() == _stops_by_search(VOCAB, ids[:, b].tolist(), per_stream[b]), per_stream[b]
    assert 0.05 < flags.mean() < 0.95  # patterns both hit and miss


def test_automaton_of_known_patterns():
    """A hand-checked table: patterns "ab" and "b" over the bytes a, b."""
    stops = stopping.stop_strings([["ab", "b"], ["ab"]])
    a, b = ord("a"), ord("b")
    # states: 0 root, 1 "a", 2 "ab", 3 "b"; patterns sorted: "ab" (0), "b" (1)
    np.testing.assert_array_equal(np.asarray(stops.transitions)[:, [a, b]], [[1, 3], [1, 2], [1, 3], [1, 3]])
    np.testing.assert_array_equal(np.asarray(stops.completes), [[0, 0], [0, 0], [1, 1], [0, 1]])
    np.testing.assert_array_equal(np.asarray(stops.active), [[1, 1], [1, 0]])
    assert (np.asarray(stops.transitions)[:, ord("c")] == 0).all()


def test_in_a_scan_padded_automata_share_one_program():
    """read_token inside lax.scan equals the step-by-step run; padded to one size, other stop strings reuse the program."""
    table = token_bytes.pack_token_bytes(VOCAB)
    ids = np.tile(np.array(TEXT_IDS, np.int32)[:, None], 2)

    @jax.jit
    def scan(stops, ids):
        step = lambda state, tokens: stopping.read_token(stops, table, state, tokens)
        return jax.lax.scan(step, stopping.initial_state(2), ids)[1]

    for per_stream in ([["lo wor"], ["日", "ab"]], [["本 "], ["d!", "<|end|>!", "bcab"]]):
        padded = stopping.stop_strings(per_stream, num_states=40, num_strings=4)
        np.testing.assert_array_equal(scan(padded, ids), _run(per_stream, table, ids))
        assert padded.transitions.shape == (40, 256) and padded.active.shape == (2, 4)
    assert scan._cache_size() == 1
    with pytest.raises(ValueError, match=r"num_states=4 is too small: these stop strings need 7"):
        stopping.stop_strings([["lo wor"]], num_states=4)


def test_one_automaton_per_stream_stops_where_the_shared_one_does():
    """`per_stream_stop_strings` (a server's streams, each with its own strings) stops each stream on the
    same tokens as the shared automaton, and one stream's rows replaced leave the others' stops as they were."""
    table = token_bytes.pack_token_bytes(VOCAB)
    ids = np.tile(np.array(TEXT_IDS, np.int32)[:, None], 3)
    per_stream = [["lo wor"], ["日", "ab"], []]
    automata = stopping.per_stream_stop_strings(per_stream, num_states=40, num_strings=4)
    assert automata.transitions.shape == (3, 40, 256) and automata.completes.shape == (3, 40, 4)
    np.testing.assert_array_equal(_run(per_stream, table, ids, automata), _run(per_stream, table, ids))
    replaced = stopping.per_stream_stop_strings([["d!"]], num_states=40, num_strings=4)
    mixed = jax.tree.map(lambda whole, row: whole.at[2].set(row[0]), automata, replaced)
    expected = _run([*per_stream[:2], ["d!"]], table, ids)
    np.testing.assert_array_equal(_run(per_stream, table, ids, mixed), expected)


def test_bad_stop_strings_raise():
    with pytest.raises(ValueError, match=r"per stream, as a list of lists"):
        stopping.stop_strings(["stop"])
    with pytest.raises(ValueError, match=r"stop string '' of stream 1 is not a non-empty string"):
        stopping.stop_strings([["a"], [""]])
    with pytest.raises(ValueError, match=r"vocab_size 2 is smaller than the tokenizer's 3 tokens"):
        token_bytes.pack_token_bytes([b"a", b"b", b"c"], vocab_size=2)


def _sentencepiece_tokenizer():
    """A Llama-style tokenizer: "▁" for spaces, byte fallback <0xNN>, a decoder that strips the first space."""
    from tokenizers import Tokenizer, decoders, models, normalizers

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), "▁", "h", "e", "l", "o", "w", "r", "d"]
    pieces += ["▁h", "ll", "▁he", "llo", "▁hello", "▁w", "or", "▁wor", "▁worl", "▁world", "本"]
    merges = [("▁", "h"), ("l", "l"), ("▁h", "e"), ("ll", "o"), ("▁he", "llo"), ("▁", "w"), ("o", "r")]
    merges += [("▁w", "or"), ("▁wor", "l"), ("▁worl", "d")]
    vocab = {piece: index for index, piece in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")  # fmt: skip


def test_sentencepiece_token_bytes_and_stop_strings():
    tokenizer = _sentencepiece_tokenizer()
    strings = token_bytes.token_byte_strings(tokenizer)
    anchor = tokenizer.convert_tokens_to_ids("h")  # a first token, so the decoder's Strip never touches the next
    for index, token in enumerate(strings):
        expected = tokenizer.decode([anchor, index], clean_up_tokenization_spaces=False)
        assert expected == "h" + token.decode("utf-8", errors="replace"), index
    assert strings[tokenizer.convert_tokens_to_ids("<0xE6>")] == b"\xe6" and strings[1] == b"<s>"
    text = "hello world 日本 wor!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids)[3:6] == ["<0xE6>", "<0x97>", "<0xA5>"]  # 日 by byte fallback
    assert b"".join(strings[i] for i in ids) == b" " + text.encode()  # the normalizer's leading "▁"
    per_stream = [["日"], ["o w"], ["wor!"], ["d 日本"]]
    flags = _run(per_stream, token_bytes.token_bytes(tokenizer), np.tile(np.array(ids)[:, None], len(per_stream)))
    assert [int(np.argmax(column)) for column in flags.T] == [5, 1, 8, 6]
    for b, patterns in enumerate(per_stream):
        assert flags[:, b].tolist() == _stops_by_search(strings, ids, patterns)


def test_other_tokenizers_are_refused():
    from tokenizers import Tokenizer, decoders, models

    backend = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1, "##b": 2}, unk_token="[UNK]"))
    backend.decoder = decoders.WordPiece()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match=r"exact bytes.*byte-level BPE and SentencePiece-style.*WordPiece"):
        token_bytes.token_bytes(tokenizer)
    with pytest.raises(ValueError, match=r"need a fast \(tokenizers-backed\) tokenizer"):
        token_bytes.token_bytes(object())


def test_eos_ids_of_checkpoint_directories(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 5}))
    assert end_ids.eos_token_ids(str(tmp_path)) == {5}  # no template: the metadata's ids only
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 7]}))
    assert end_ids.eos_token_ids(str(tmp_path)) == {5, 7}
    assert transformers.GenerationConfig.from_pretrained(tmp_path).eos_token_id == [5, 7]
    # A template that closes turns with its own special token <|end|> (id 9) adds it.
    tokens = [{"id": 9, "content": "<|end|>", "special": True}, {"id": 10, "content": "<|endoftext|>", "special": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": tokens}))
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>\n{% endfor %}"
    )
    assert end_ids.eos_token_ids(str(tmp_path)) == {5, 7, 9}
    plain = templates.ChatTemplate("{% for m in messages %}{{ m.content }}\n{% endfor %}", {}, "plain")
    assert end_ids.eos_token_ids(str(tmp_path), template=plain) == {5, 7}


def test_eos_ids_of_a_gguf_with_an_end_of_turn_id(tmp_path):
    import gguf as gguf_package

    writer = gguf_package.GGUFWriter(str(tmp_path / "m.gguf"), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["<unk>", "<s>", "</s>", "<|eot|>", "a"])
    writer.add_token_types([3, 3, 3, 3, 1])
    writer.add_eos_token_id(2)
    writer.add_uint32("tokenizer.ggml.eot_token_id", 3)
    for write in (
        writer.write_header_to_file,
        writer.write_kv_data_to_file,
        writer.write_tensors_to_file,
        writer.close,
    ):
        write()
    assert end_ids.eos_token_ids(str(tmp_path / "m.gguf")) == {2, 3}


def test_library_does_not_import_torch():
    code = (
        "import sys; from streamjax.stream import stopping, token_bytes; "
        "t = token_bytes.pack_token_bytes([b'ab', b'c']); s = stopping.stop_strings([['bc']]); "
        "state, stop = stopping.read_token(s, t, stopping.initial_state(1), stopping.jnp.array([0])); "
        "state, stop = stopping.read_token(s, t, state, stopping.jnp.array([1])); assert bool(stop[0]); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


# ---------------------------------------------------------------- against transformers' StopStringCriteria


def _first_stops_by_transformers(tokenizer, per_stream: list[list[str]], sequences: list[list[int]]) -> list[int]:
    """Per stream, the first step n at which transformers' StopStringCriteria, called as generate calls it
    after each new token (on the tokens so far, sequences[b][: n + 1]), returns True; -1 if it never does."""
    import torch

    firsts = []
    for stops, ids in zip(per_stream, sequences):
        criteria = transformers.StopStringCriteria(tokenizer, stops)
        stopped = (bool(criteria(torch.tensor([ids[: n + 1]]), None)[0]) for n in range(len(ids)))
        firsts.append(next((n for n, stop in enumerate(stopped) if stop), -1))
    return firsts


def _first_stops_by_streamjax(tokenizer, per_stream: list[list[str]], sequences: list[list[int]]) -> list[int]:
    """Per stream, the first step at which `StopConditions.check`, fed the tokens one step at a time from the
    automaton's initial state as the decode loop feeds them, says "stop_string"; -1 if it never does."""
    conditions = stopping.stop_conditions(
        len(per_stream), stop=per_stream, tokenizer=tokenizer, vocab_size=len(tokenizer)
    )
    steps = max(map(len, sequences))
    tokens = np.array([ids + [0] * (steps - len(ids)) for ids in sequences], np.int32).T  # [T, B]

    @jax.jit
    def reasons(conditions, tokens):
        def step(state, inputs):
            generated, new = inputs
            reason, state = conditions.check(new, jnp.full(new.shape, generated), state)
            return state, reason

        return jax.lax.scan(step, stopping.initial_state(len(per_stream)), (jnp.arange(1, steps + 1), tokens))[1]

    hit = np.asarray(reasons(conditions, tokens)) == stopping.REASONS.index("stop_string")
    return [int(np.argmax(hit[: len(ids), b])) if hit[: len(ids), b].any() else -1 for b, ids in enumerate(sequences)]


def _byte_level_tokenizer():
    """The hand-made VOCAB as a byte-level BPE tokenizer that transformers reads: ids 0..16 are VOCAB's
    tokens (in GPT-2's byte-to-unicode spelling, "<|end|>" a special token), then every other single byte."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = token_bytes.bytes_to_unicode()
    pieces = ["".join(alphabet[byte] for byte in token) for token in VOCAB]
    pieces += [alphabet[byte] for byte in range(256) if bytes([byte]) not in VOCAB]
    backend = Tokenizer(models.BPE({piece: index for index, piece in enumerate(pieces)}, [], fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken("<|end|>", special=True, normalized=False)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend)


def test_stop_steps_equal_transformers_stop_string_criteria_on_a_byte_level_tokenizer():
    """The hand-made stop strings over TEXT_IDS, and random overlapping ones over random "abc" tokens."""
    tokenizer = _byte_level_tokenizer()
    strings = token_bytes.token_byte_strings(tokenizer)
    assert strings[: len(VOCAB)] == VOCAB and set(strings) >= {bytes([byte]) for byte in range(256)}
    assert {index: token.content for index, token in tokenizer.added_tokens_decoder.items()} == {11: "<|end|>"}
    per_stream = [["lo wor"], ["or"], ["ello"], ["日"], ["本 "], ["cabc", "bcab", "abcabcab"], ["d!", "<|end|>!"]]
    per_stream += [["Hell"], [" wo"], ["abca"]]  # complete before their token ends ("lo", " wor", "abcab")
    per_stream += [["xyz"], ["!x"]]  # never; "!" is the last token, so a match that would go on is still open
    sequences = [TEXT_IDS] * len(per_stream)
    rng = np.random.default_rng(1)
    for _ in range(24):
        per_stream.append(["".join(rng.choice(list("abc"), rng.integers(2, 8))) for _ in range(rng.integers(1, 4))])
        sequences.append(rng.choice([8, 9, 10, 13, 14, 15, 16], 30).tolist())  # ab, c, abcab, a, b, bc, ca
    expected = _first_stops_by_transformers(tokenizer, per_stream, sequences)
    assert _first_stops_by_streamjax(tokenizer, per_stream, sequences) == expected
    assert expected[:12] == [2, 2, 1, 7, 9, 12, 4, 1, 2, 12, -1, -1]
    assert 5 < sum(first < 0 for first in expected[12:]) < 20  # random patterns both stop a stream and miss


# ---------------------------------------------------------------- real assets (SmolLM2-135M-Instruct Q4_1)


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> tuple[pathlib.Path, object]:
    """(GGUF path, streamjax's tokenizer) of SmolLM2."""
    return smollm2_gguf, gguf.load_gguf_tokenizer(smollm2_gguf)


TRICKY = "Café naïve — “quotes” 日本語 🙂 emoji\n\n  spaced\ttab <|im_start|>special<|im_end|> end.  \n"


# Stop-string sets over SmolLM2's tokens that both SmolLM2 comparisons check.
SMOLLM2_STOP_SETS = [
    ["PRIDE AND"],  # spans tokens
    ["iversal"],  # inside one token (" universally")
    ["aïve —"],  # starts mid-token, non-ASCII
    ["語 🙂"],  # multi-byte characters split over tokens
    ["<|im_end|>"],  # a special token's text
    ["ec", "ce", "ecec"],  # overlapping, frequent
]


@pytest.mark.real_assets
def test_smollm2_token_bytes_are_exact(smollm2, austen_text):
    _, tokenizer = smollm2
    strings = token_bytes.token_byte_strings(tokenizer)
    assert len(strings) == 49152 and max(map(len, strings)) == token_bytes.token_bytes(tokenizer).table.shape[1]
    for index, token in enumerate(strings):  # the decoder's own (lossy where a token ends mid-character) text
        assert tokenizer.decode([index], clean_up_tokenization_spaces=False) == token.decode("utf-8", "replace")
    assert sum(not _is_utf8(token) for token in strings) > 100  # tokens holding part of a character exist
    for text in (corpora.load_text("austen")[:20_000], TRICKY):
        ids = tokenizer(text).input_ids
        assert b"".join(strings[i] for i in ids) == text.encode("utf-8")


def _is_utf8(token: bytes) -> bool:
    try:
        token.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.real_assets
def test_smollm2_stop_strings_match_the_decoded_text(smollm2, austen_text):
    """Stop steps on device against a search in `tokenizer.decode` of each prefix (no token bytes involved)."""
    _, tokenizer = smollm2
    text = TRICKY + corpora.load_text("austen")[:1500]
    ids = tokenizer(text).input_ids
    per_stream = [
        *SMOLLM2_STOP_SETS,
        [" Bennet", "Mr."],
        ["never in this text"],
    ]
    flags = _run(per_stream, token_bytes.token_bytes(tokenizer), np.tile(np.array(ids)[:, None], len(per_stream)))
    prefixes = [tokenizer.decode(ids[: n + 1], clean_up_tokenization_spaces=False) for n in range(len(ids))]
    for b, patterns in enumerate(per_stream):
        # A stop string is whole characters, so in the decoded prefixes (a partial last character
        # decodes to U+FFFD) it appears exactly when its bytes have completed.
        first_seen = [min((n for n, prefix in enumerate(prefixes) if p in prefix), default=None) for p in patterns]
        expected_first = min((n for n in first_seen if n is not None), default=-1)
        assert (int(np.argmax(flags[:, b])) if flags[:, b].any() else -1) == expected_first, patterns
        counts = [sum(len(_occurrences(prefix.encode(), p.encode())) for p in patterns) for prefix in prefixes]
        np.testing.assert_array_equal(flags[:, b], np.diff([0, *counts]) > 0, err_msg=str(patterns))
    assert (flags[:, :7].any(0)).all() and not flags[:, 7].any()


@pytest.mark.real_assets
def test_smollm2_eos_ids_equal_transformers(smollm2):
    path, tokenizer = smollm2
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    # from_pretrained makes the generation config this way when there is no generation_config.json (a GGUF)
    generation = transformers.GenerationConfig.from_model_config(config)
    template = chat_templates.load_chat_template(str(path))
    assert end_ids.eos_token_ids(str(path), template) == {config.eos_token_id} == {generation.eos_token_id} == {2}
    assert tokenizer.eos_token_id == 2 and tokenizer.eos_token == "<|im_end|>"  # = transformers' (test_gguf.py)
    # <|im_end|> is also the token SmolLM2's template writes after an assistant message.
    special = {token.content: index for index, token in tokenizer.added_tokens_decoder.items()}
    assert end_ids.end_of_turn_token(template, special) == "<|im_end|>"


@pytest.mark.real_assets
def test_smollm2_stop_steps_equal_transformers_stop_string_criteria(smollm2, austen_text):
    """Stop strings over a real text, tokenized as the tokenizer does and one character at a time (so that
    a string spans many tokens, some of them a part of a character); transformers reads the same
    tokenizer as it loads it from the GGUF."""
    path, tokenizer = smollm2
    reference = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = TRICKY + corpora.load_text("austen")[:1500]
    whole = tokenizer(text).input_ids
    by_character = [token for character in text for token in tokenizer(character).input_ids]
    assert len(whole) < len(by_character) and tokenizer.decode(by_character) == text
    per_set = [
        *SMOLLM2_STOP_SETS,
        ["Mr. Morris", "Mrs. Long says"],  # their beginnings ("Mr. ", "Mrs. Long ") come many times first
        ["\n\n\n\n"],
        [text[-7:] + "!?"],  # the text ends in the middle of it
        ["never in this text"],
    ]
    per_stream, sequences = per_set * 2, [whole] * len(per_set) + [by_character] * len(per_set)
    expected = _first_stops_by_transformers(reference, per_stream, sequences)
    assert _first_stops_by_streamjax(tokenizer, per_stream, sequences) == expected
    assert min(expected[:8] + expected[10:18]) > 0 and expected[8:10] == expected[18:20] == [-1, -1]
