"""Saving a Llama as a Hugging Face checkpoint: the exact inverse of loading, read by transformers.

Tiny models (2 layers, hidden 48, 6 query heads over 2 kv heads unless a case says otherwise) with
every weight, norm and bias random, so that a swapped or misplaced tensor changes the logits.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import streamjax
from streamjax.files import loading
from streamjax.files.export import ExportError, hf_config, hf_tensors, save_model
from streamjax.model import families
from streamjax.model.config import ModelConfig, freeze_mapping
from streamjax.model.params import ParamSpec, init_params, is_spec
from support.models import hf_state_dict, random_hf_llama, save_word_tokenizer, to_streamjax

VOCAB = 97
TOKENS = np.random.RandomState(0).randint(0, VOCAB, size=(2, 24))
# About 3x the largest difference measured against transformers, 1.0e-5 (the logits reach 6).
PARITY = 3e-5
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}

HF_CASES = {  # transformers LlamaConfig overrides of conftest.random_hf_llama
    "gqa_untied": {},
    "mha_tied_attention_bias": {"num_key_value_heads": 6, "tie_word_embeddings": True, "attention_bias": True},
    "mqa_both_biases": {"num_key_value_heads": 1, "attention_bias": True, "mlp_bias": True},
}


def llama_config(**overrides) -> ModelConfig:
    settings = dict(
        family="llama", vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, head_dim=8,
        intermediate_size=80, norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=512, rope_theta=10000.0,
    )  # fmt: skip
    return ModelConfig(**(settings | overrides))


MODEL_CASES = {
    "gqa_untied": llama_config(),
    "tied_biases_llama3_rope": llama_config(
        tie_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=500000.0,
        rope_scaling=freeze_mapping(LLAMA3_ROPE),
    ),  # fmt: skip
    "mqa_linear_rope": llama_config(
        num_kv_heads=1, head_dim=12, rope_scaling=freeze_mapping({"rope_type": "linear", "factor": 2.0})
    ),
}


def random_params(config: ModelConfig, seed: int = 0, scale: float = 0.2) -> dict:
    """Params ~ N(0, scale), and norms (1 + N(0, scale)) and biases (N(0, scale)) random too."""
    specs = families.param_specs(config)
    params = init_params(specs, jax.random.key(seed), scale=scale)
    normal_specs = jax.tree.map(lambda spec: ParamSpec(spec.shape, spec.axes), specs, is_leaf=is_spec)
    noise = init_params(normal_specs, jax.random.key(seed + 1), scale=scale)
    return jax.tree.map(
        lambda spec, param, extra: param if spec.init == "normal" else param + extra,
        specs, params, noise, is_leaf=is_spec,
    )  # fmt: skip


def assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_tensors_invert_the_loader_bitwise(case):
    model = random_hf_llama(seed=3, **HF_CASES[case])
    config, params = to_streamjax(model)
    expected = hf_state_dict(model)
    if config.tie_embeddings:  # the tied head is the embedding; transformers does not save it either
        np.testing.assert_array_equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    tensors = hf_tensors(params, config)
    assert sorted(tensors) == sorted(expected)
    for name, array in expected.items():
        assert tensors[name].dtype == np.float32 and tensors[name].flags.c_contiguous, name
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_saved_directory_loads_back_bitwise(case, tmp_path):
    config = MODEL_CASES[case]
    params = random_params(config)
    directory = save_model(tmp_path / "model", params, config)
    assert directory == tmp_path / "model"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]  # no staging directory left
    assert sorted(path.name for path in directory.iterdir()) == ["config.json", "model.safetensors"]
    loaded_config, loaded = streamjax.load_hf_directory(directory)
    assert loaded_config == config
    assert_trees_equal(loaded, params)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_transformers_loads_the_saved_model_to_streamjax_logits(case, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    config = MODEL_CASES[case]
    params = random_params(config, seed=7)
    save_model(tmp_path, params, config)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(torch.as_tensor(TOKENS)).logits.numpy()
    logits = np.asarray(streamjax.forward(params, None, TOKENS, config).logits)
    assert np.abs(logits).max() > 1.0  # random enough that a misplaced tensor would show
    np.testing.assert_allclose(logits, expected, atol=PARITY, rtol=0)


def test_bfloat16_save(tmp_path):
    config = MODEL_CASES["tied_biases_llama3_rope"]
    params = random_params(config)
    save_model(tmp_path, params, config, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    assert {str(array.dtype) for array in load_file(tmp_path / "model.safetensors").values()} == {"bfloat16"}
    _, loaded = streamjax.load_hf_directory(tmp_path, dtype=jax.numpy.bfloat16)
    assert_trees_equal(loaded, jax.tree.map(lambda array: array.astype(jax.numpy.bfloat16), params))


def test_hf_config_fields():
    config = MODEL_CASES["tied_biases_llama3_rope"]
    hf = hf_config(config, bos_token_id=1, eos_token_id=[2, 3])
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]
    assert (hf["num_key_value_heads"], hf["head_dim"], hf["rms_norm_eps"]) == (2, 8, 1e-5)
    assert (hf["tie_word_embeddings"], hf["attention_bias"], hf["mlp_bias"]) == (True, True, True)
    assert hf["rope_theta"] == 500000.0 and hf["rope_scaling"] == LLAMA3_ROPE
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (1, [2, 3])
    assert "rope_scaling" not in hf_config(llama_config()) and "softmax" not in hf


def test_saved_tokenizer_round_trips(tmp_path):
    from transformers import PreTrainedTokenizerFast

    save_word_tokenizer(tmp_path / "tokenizer", VOCAB)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tokenizer")
    config = llama_config()
    params = random_params(config)
    save_model(tmp_path / "model", params, config, tokenizer=tokenizer)
    loaded_config, loaded, loaded_tokenizer = loading.load_model(str(tmp_path / "model"))
    text = "w1 w5 w96 w40 w2"
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids == [1, 5, 96, 40, 2]
    assert loaded_config == config
    assert_trees_equal(loaded, params)


def test_saving_replaces_an_earlier_checkpoint(tmp_path):
    config = llama_config()
    save_model(tmp_path / "model", random_params(config, seed=1), config)
    params = random_params(config, seed=2)
    save_model(tmp_path / "model", params, config)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
    assert_trees_equal(streamjax.load_hf_directory(tmp_path / "model")[1], params)


class LargerTokenizer:
    """A tokenizer with one token more than the model's vocabulary."""

    bos_token_id = eos_token_id = None

    def __len__(self):
        return VOCAB + 1

    def save_pretrained(self, directory):
        raise AssertionError("a refused save must not write the tokenizer")


def _bad_inputs(tmp_path):
    """(description, call, error pattern): each must raise before anything is written."""
    config = llama_config()
    params = random_params(config)
    wrong_shape = jax.tree.map(lambda array: array, params)
    wrong_shape["layers"][1]["gate_up"] = wrong_shape["layers"][1]["gate_up"][:, :, :-1]
    missing = jax.tree.map(lambda array: array, params)
    del missing["lm_head"]
    mpt = ModelConfig(
        family="mpt", vocab_size=VOCAB, hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=6, head_dim=8,
        intermediate_size=192, norm_eps=1e-5, tie_embeddings=True, max_position_embeddings=256, position="alibi",
    )  # fmt: skip
    clipped = llama_config(clip_qkv=6.0)
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    target = tmp_path / "model"
    return [
        (lambda: save_model(target, random_params(mpt), mpt), r"only llama models can be exported.*'mpt'"),
        (lambda: save_model(target, wrong_shape, config), r"mis-shaped: \['layers'\]\[1\]\['gate_up'\] \(48, 2, 79\)"),
        (lambda: save_model(target, missing, config), r"missing: \['lm_head'\]"),
        (lambda: save_model(target, params, clipped), r"cannot express clip_qkv=6\.0"),
        (lambda: save_model(target, params, config, dtype="float16"), r"cannot save in dtype 'float16'"),
        (lambda: save_model(tmp_path / "file", params, config), r"it is a file, not a directory"),
        (lambda: save_model(tmp_path / "notes", params, config), r"is not a checkpoint directory"),
        (lambda: save_model(target, params, config, tokenizer=object()), r"has no save_pretrained"),
        (
            lambda: save_model(target, params, config, tokenizer=LargerTokenizer()),
            r"has 98 tokens but .* vocab_size is 97",
        ),
    ]


def test_bad_input_raises_before_writing(tmp_path):
    cases = _bad_inputs(tmp_path)
    before = {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")}
    for call, pattern in cases:
        with pytest.raises(ExportError, match=pattern):
            call()
        assert {path: path.stat().st_mtime_ns for path in tmp_path.rglob("*")} == before, pattern
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_hf_tensors_refuse_a_non_llama_config():
    config = ModelConfig(
        family="gpt_neox", vocab_size=VOCAB, hidden_size=48, num_layers=1, num_heads=6, num_kv_heads=6, head_dim=8,
        intermediate_size=96, norm_eps=1e-5, tie_embeddings=False, max_position_embeddings=256,
    )  # fmt: skip
    with pytest.raises(ValueError, match="only llama models can be exported"):
        hf_tensors(random_params(config), config)
    with pytest.raises(ValueError, match="only llama models can be exported"):
        hf_config(config)


KILLED_SAVE = """
import os, signal, sys
from streamjax.files import export
from test_export import llama_config, random_params

class KilledWhileSaving:  # a tokenizer whose files are never written: the process dies first
    bos_token_id = eos_token_id = None
    def __len__(self):
        return 10
    def save_pretrained(self, directory):
        os.kill(os.getpid(), signal.SIGKILL)

config = llama_config()
export.save_model(sys.argv[1], random_params(config, seed=2), config, tokenizer=KilledWhileSaving())
"""


def test_a_killed_save_leaves_no_complete_looking_directory(tmp_path):
    """SIGKILL in the middle of replacing a checkpoint (weights written, tokenizer and config.json not):
    the earlier checkpoint is untouched, and the partial one is only a `.tmp-<pid>` directory that does
    not load."""
    config = llama_config()
    params = random_params(config, seed=1)
    save_model(tmp_path / "model", params, config)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", textwrap.dedent(KILLED_SAVE), str(tmp_path / "model")]
    process = subprocess.Popen(command, env=env)
    assert process.wait(timeout=300) == -signal.SIGKILL
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", f"model.tmp-{process.pid}"]
    partial = tmp_path / f"model.tmp-{process.pid}"
    assert sorted(path.name for path in partial.iterdir()) == ["model.safetensors"]
    with pytest.raises(FileNotFoundError, match="no config.json"):
        streamjax.load_hf_directory(partial)
    assert_trees_equal(streamjax.load_hf_directory(tmp_path / "model")[1], params)
