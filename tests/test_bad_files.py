"""Bad files give a clear error that names the file, never a crash deep in a library or a silent wrong load.

Every bad file is made here from a real one: the SmolLM2 GGUF and the Austen text (`real_assets`), and a
tiny random Llama saved with `save_pretrained`, then truncated, bytes flipped, or its header rewritten.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil

import numpy as np
import pytest
from conftest import random_hf_llama, save_word_tokenizer

from streamjax import loading, weights
from streamjax.config import UnsupportedConfigError


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
