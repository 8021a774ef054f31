"""Saved conversations (`streamjax.files.sessions`): a session file gives back the conversation bit for bit,
continuing it gives exactly the replies of the conversation that never stopped, and a damaged file, a file
of another model or cache layout, a bad name and a kill during a save are all refused or survived.

Models: the tiny random Llama chat model of `support.tiny_chat`, and a tiny random Qwen2 with sliding
layers (a hybrid cache with a `sliding` sub-cache).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors

import streamjax
from streamjax.files import chat_models, sessions
from streamjax.model import families, sharding
from streamjax.model.cache import init_cache
from streamjax.runs.writes import CorruptFile
from streamjax.stream import chat, stopping
from support import tiny_chat
from support.killed_session import version_conversation
from support.models import cpu_devices_env, hf_state_dict, randomize_weights

tiny = tiny_chat.tiny  # the shared fixture, under its name
REPO = tiny_chat.REPO


def load_tiny(tiny, dtype="float32") -> chat.ChatModel:
    return chat_models.load_chat_model(str(tiny[0]), dtype, template_file=str(tiny[1]))


def settings(temperature: float, turn: int):
    config = types.SimpleNamespace(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                                   seed=11)  # fmt: skip
    return chat.turn_settings(config, turn)


def talk(model, conversation, messages, first_turn, temperature):
    """`conversation` after one chat turn per message, and each reply's token ids."""
    stops = stopping.stop_conditions(1, end_ids=model.end_ids, max_new_tokens=6)
    replies = []
    for turn, message in enumerate(messages, first_turn):
        conversation, record = chat.chat_turn(
            model, conversation, message, settings(temperature, turn), stops, chunk_size=8, block_size=4
        )
        replies.append(record.reply_token_ids)
    return conversation, replies


def bits(array) -> np.ndarray:
    """An array's raw bits (so that bfloat16 and NaN compare bit for bit)."""
    array = np.asarray(jax.device_get(array))
    return array.view(f"u{array.dtype.itemsize}")


def assert_same_cache(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)  # static fields included
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        assert got.dtype == want.dtype and got.shape == want.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(bits(got), bits(want), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_saved_conversation_loads_back_bit_for_bit(tiny, tmp_path, dtype):
    model = load_tiny(tiny, dtype)
    conversation = chat.new_conversation(model, 2, 14, system_prompt="w40 w41")
    conversation, _ = talk(model, conversation, ["w5 w6 w7", "w8 w9"], 0, 0.0)
    path = sessions.session_path(tmp_path, "first")
    extra = {"turns": 2, "note": "ü", "nested": [1, {"a": None}]}
    sessions.save_conversation(path, model, conversation, extra)
    loaded, loaded_extra = sessions.load_conversation(path, load_tiny(tiny, dtype))
    assert_same_cache(loaded.cache, conversation.cache)
    assert str(loaded.cache.dtype) == dtype and int(loaded.cache.next_position[0]) > 14  # evictions happened
    assert loaded.messages == conversation.messages and loaded.turns == 2
    assert loaded.reply_text == conversation.reply_text and loaded_extra == extra
    sessions.save_conversation(path, model, conversation)
    assert sessions.load_conversation(path, model)[1] == {}


@pytest.fixture(scope="module")
def hybrid():
    """A chat model (no tokenizer: only the cache is saved) of a tiny random Qwen2 whose layers 0 and 2 slide."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from streamjax.files.weights import convert_tensors

    layer_types = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
    settings = {
        "vocab_size": 97, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 4,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 512,
        "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0},
    }  # fmt: skip
    torch.manual_seed(7)
    hf = randomize_weights(Qwen2ForCausalLM(Qwen2Config(**settings)), 0.2)
    full = {**hf.config.to_dict(), "use_sliding_window": False, "layer_types": None, "sliding_window": None}
    config = families.config_from_hf({key: value for key, value in full.items() if value is not None})
    config = dataclasses.replace(config, layer_types=layer_types, sliding_window=6)
    params = convert_tensors(hf_state_dict(hf), config)
    return chat.ChatModel("tiny-hybrid-qwen2", config, params, None, None, frozenset())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_hybrid_cache_round_trips_with_its_sliding_sub_cache(hybrid, tmp_path, dtype):
    model = dataclasses.replace(hybrid, params=jax.tree.map(lambda x: x.astype(dtype), hybrid.params))
    conversation = chat.new_conversation(model, 3, 9)
    tokens = np.random.RandomState(2).randint(0, 97, size=(1, 30))
    cache = streamjax.forward(model.params, conversation.cache, tokens, model.config).cache
    assert cache.sliding is not None and cache.sliding.window == 5 and int(cache.sliding.cursor[0]) == 0  # wrapped
    conversation = chat.Conversation(cache, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    path = sessions.session_path(tmp_path, "hybrid")
    sessions.save_conversation(path, model, conversation, {"stream": "hybrid"})
    loaded, extra = sessions.load_conversation(path, model)
    assert_same_cache(loaded.cache, conversation.cache)
    assert loaded.cache.layer_types == model.config.layer_type_of and extra == {"stream": "hybrid"}
    with safetensors.safe_open(path, "np") as file:
        names = set(file.keys())
    assert {".sliding.keys[1]", ".sliding.next_position", ".keys[1]", ".values[0]"} <= names


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_continuing_a_loaded_conversation_gives_the_uninterrupted_replies(tiny, tmp_path, temperature):
    """3 turns in one go vs. 1 turn, save, load with a freshly loaded model, 2 more turns: the same tokens."""
    messages = ["w5 w6 w7", "w8 w9 w10", "w11"]
    model = load_tiny(tiny)
    whole, replies = talk(model, chat.new_conversation(model, 2, 14), messages, 0, temperature)
    first, first_replies = talk(model, chat.new_conversation(model, 2, 14), messages[:1], 0, temperature)
    path = sessions.session_path(tmp_path, "resumed")
    sessions.save_conversation(path, model, first)
    del first
    fresh = load_tiny(tiny)
    loaded, _ = sessions.load_conversation(path, fresh)
    rest, rest_replies = talk(fresh, loaded, messages[1:], loaded.turns, temperature)
    assert first_replies + rest_replies == replies
    assert sum(map(len, replies)) > 6 and int(whole.cache.next_position[0]) > 14  # replies, and evictions
    assert_same_cache(rest.cache, whole.cache)
    assert rest.messages == whole.messages and rest.reply_text == whole.reply_text


@pytest.fixture
def saved(tiny, tmp_path):
    """(model, path, content) of a saved two-turn conversation."""
    model = load_tiny(tiny)
    conversation, _ = talk(model, chat.new_conversation(model, 2, 14), ["w5 w6", "w7"], 0, 0.0)
    path = sessions.session_path(tmp_path, "saved")
    sessions.save_conversation(path, model, conversation, {"a": 1})
    return model, path, path.read_bytes()


def flip(content: bytes, index: int) -> bytes:
    return content[:index] + bytes([content[index] ^ 0x01]) + content[index + 1 :]


@pytest.mark.parametrize(
    "damage",
    [
        lambda content: flip(content, len(content) - 5),  # a byte of the last tensor's data
        lambda content: flip(content, content.index(b"w7")),  # a byte of the messages, in the header
        lambda content: content[: len(content) // 2],  # truncated
        lambda content: content[:5],  # truncated inside the header's length
        lambda content: np.random.RandomState(0).bytes(len(content)),  # garbage
        lambda content: b"",  # empty
    ],
    ids=["tensor-byte", "header-byte", "half", "five-bytes", "garbage", "empty"],
)
def test_a_damaged_file_is_a_corrupt_file_that_names_itself(saved, damage):
    model, path, content = saved
    path.write_bytes(damage(content))
    with pytest.raises(CorruptFile, match=f"{path}.*delete it"):
        sessions.load_conversation(path, model)


def test_a_session_of_another_model_or_cache_layout_is_refused(saved, tiny, monkeypatch):
    model, path, _ = saved
    with pytest.raises(ValueError, match="saved from model .*" + str(tiny[0]) + ".*'other'"):
        sessions.load_conversation(path, dataclasses.replace(model, spec="other"))
    other_config = dataclasses.replace(model, config=dataclasses.replace(model.config, rope_theta=1.0))
    with pytest.raises(ValueError, match="config digest [0-9a-f]{12}\\).*config digest [0-9a-f]{12}\\)"):
        sessions.load_conversation(path, other_config)
    with pytest.raises(ValueError, match="another layout: dtype 'float32' \\(session\\) vs 'bfloat16' \\(model\\)"):
        sessions.load_conversation(path, load_tiny(tiny, "bfloat16"))

    def fewer_layers(*args, **kwargs):  # a cache of one layer, as a streamjax whose cache changed would build
        cache = init_cache(*args, **kwargs)
        return cache.replace(keys=cache.keys[:1], values=cache.values[:1])

    monkeypatch.setattr(sessions, "init_cache", fewer_layers)
    with pytest.raises(ValueError, match="arrays this model does not build: .keys\\[1\\] \\(\\(1, 2, 8, 16\\), dtype"):
        sessions.load_conversation(path, model)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="no saved session"):
        sessions.load_conversation(path.with_name("absent" + sessions.SESSION_SUFFIX), model)


@pytest.mark.parametrize("name", ["", "a" * 129, "../x", "a/b", "a\\b", ".hidden", "a b", "é", "x\n", None])
def test_bad_session_names_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="bad session name .*1 to 128 characters"):
        sessions.session_path(tmp_path, name)


def test_good_session_names_are_files_in_the_directory(tmp_path):
    for name in ["a", "x" * 128, "chat-1.v2_B", "a..b"]:
        assert sessions.session_path(tmp_path, name) == tmp_path / f"{name}.session.safetensors"


def test_a_kill_during_a_save_leaves_the_old_session_or_the_new_one(tiny, tmp_path):
    """A child saves versions 1, 2, ... of a session (a few MB each) in a loop, continuing from the version
    on disk; it is SIGKILLed at a random moment 5 times, and each time the file is one whole version."""
    model = load_tiny(tiny)
    path, ready = sessions.session_path(tmp_path, "killed"), tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    command = [sys.executable, str(REPO / "tests/support/killed_session.py"), *map(str, tiny), str(path), str(ready)]
    moments, versions = random.Random(4), []
    for _ in range(5):
        ready.unlink(missing_ok=True)
        child = subprocess.Popen(command, env=env, cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), child.communicate(timeout=5)[1].decode()[-2000:]
        time.sleep(moments.uniform(0.0, 0.5))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        conversation, extra = sessions.load_conversation(path, model)
        version = extra["version"]
        expected = version_conversation(model, version)
        assert_same_cache(conversation.cache, expected.cache)
        assert conversation.messages == expected.messages and conversation.reply_text == expected.reply_text
        versions.append(version)
    assert versions == sorted(versions) and versions[0] >= 1 and len(set(versions)) == 5  # each run saved more
    assert list(tmp_path.glob("*.partial")) in ([], [path.with_name(path.name + ".partial")])


def sharded_round_trip(model_dir: str, template: str, directory: str) -> dict:
    """(Needs 2 devices.) A conversation on a data=1,model=2 mesh saved, then loaded onto the mesh and onto
    one device: whether each loaded cache array has the saved one's sharding, and equals it bit for bit."""
    mesh = sharding.make_mesh("data=1,model=2", devices=jax.devices()[:2])
    model = chat_models.load_chat_model(model_dir, mesh=mesh, template_file=template)
    conversation, _ = talk(model, chat.new_conversation(model, 2, 14), ["w5 w6", "w7"], 0, 0.0)
    path = sessions.session_path(directory, "sharded")
    sessions.save_conversation(path, model, conversation)
    on_mesh = sessions.load_conversation(path, model)[0].cache
    single = sessions.load_conversation(path, dataclasses.replace(model, mesh=None))[0].cache
    saved, loaded, plain = (jax.tree.leaves(cache) for cache in (conversation.cache, on_mesh, single))
    return {
        "same_sharding": [a.sharding.is_equivalent_to(b.sharding, a.ndim) for a, b in zip(saved, loaded)],
        "split": [len(a.sharding.device_set) for a in saved],
        "equal": [
            bool(np.array_equal(bits(a), bits(b)) and np.array_equal(bits(a), bits(c)))
            for a, b, c in zip(saved, loaded, plain)
        ],  # fmt: skip
        "single_device": [len(a.sharding.device_set) == 1 for a in plain],
    }


def test_a_session_loads_onto_the_model_s_mesh(tiny, tmp_path):
    """Run in a child with 2 CPU devices (XLA fixes the count at start): the keys split over the model axis."""
    command = [sys.executable, __file__, *map(str, tiny), str(tmp_path)]
    child = subprocess.run(command, env=cpu_devices_env(2), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    result = json.loads(child.stdout.splitlines()[-1])
    assert all(result["same_sharding"]) and all(result["equal"]) and all(result["single_device"])
    assert max(result["split"]) == 2  # the kv heads of keys and values really are split


if __name__ == "__main__":
    print(json.dumps(sharded_round_trip(*sys.argv[1:])))
