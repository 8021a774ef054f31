"""streamjax.files.gguf on the gemma3 architecture: config, weights, tokenizer and logits against transformers' own
GGUF loading.

Tiny gemma3 GGUF files written here with `gguf.GGUFWriter` need no assets; tests marked `real_assets` use the
Gemma 3 270M Q4_K_M file from `streamjax.files.assets` (and the Austen text). The real model's logits live here,
beside its weights and tokenizer, as SmolLM2's do in test_gguf.py: they check the whole load of the file.
"""

from __future__ import annotations

import dataclasses
import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from test_gguf import TRICKY_TEXT, assert_loads_without_torch

import streamjax
from streamjax.files import corpora, loading
from streamjax.files import gguf as sj_gguf
from support.gguf_reference import transformers_gguf_logits

TINY = {"hidden": 32, "heads": 2, "kv_heads": 1, "head_dim": 16, "inner": 64, "layers": 6, "window": 8}
SPACE = "\u2581"
# Specials, user-defined newlines and runs of real spaces (as llama.cpp writes Gemma's), then the 256 byte
# tokens, then pieces whose merges must be derived from the vocabulary.
TINY_PIECES = [SPACE, "t", "h", "e", "a", "n", "d", "th", "he", "the", f"{SPACE}t", f"{SPACE}the", "an", "and"]
TINY_PIECES += [f"{SPACE}and", f"{SPACE}a", "é", "日"]


def _tiny_tokens() -> tuple[list[str], list[int]]:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user_defined = ["\n", "\n\n", "  ", "   "]
    byte_tokens = [f"<0x{byte:02X}>" for byte in range(256)]
    tokens = [*specials, *user_defined, *byte_tokens, *TINY_PIECES]
    token_types = [3] * len(specials) + [4] * len(user_defined) + [6] * 256 + [1] * len(TINY_PIECES)
    return tokens, token_types


def _tiny_hf_weights() -> dict[str, np.ndarray]:
    """Random HF Gemma3ForCausalLM weights (norm weights as HF stores them, around 0)."""
    rng = np.random.default_rng(0)
    hidden, inner, head_dim = TINY["hidden"], TINY["inner"], TINY["head_dim"]
    shapes = {"model.embed_tokens.weight": (len(_tiny_tokens()[0]), hidden), "model.norm.weight": (hidden,)}
    for i in range(TINY["layers"]):
        prefix = f"model.layers.{i}."
        norms = (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        )
        shapes |= {f"{prefix}{norm}.weight": (hidden,) for norm in norms}
        shapes |= {
            prefix + "self_attn.q_norm.weight": (head_dim,),
            prefix + "self_attn.k_norm.weight": (head_dim,),
            prefix + "self_attn.q_proj.weight": (TINY["heads"] * head_dim, hidden),
            prefix + "self_attn.k_proj.weight": (TINY["kv_heads"] * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (TINY["kv_heads"] * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, TINY["heads"] * head_dim),
            prefix + "mlp.gate_proj.weight": (inner, hidden),
            prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner),
        }
    return {name: rng.normal(0, 0.3, shape).astype(np.float32) for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    stems = {hf: gg for gg, hf in sj_gguf._name_table(sj_gguf.ARCHITECTURES["gemma3"], TINY["layers"]).items()}
    stem, _, suffix = hf_name.rpartition(".")
    return f"{stems[stem]}.{suffix}"


def write_tiny_gemma3_gguf(path, arch="gemma3", extra_kv=None, tokenizer_model="llama") -> dict[str, np.ndarray]:
    """A tiny gemma3 GGUF as llama.cpp writes one (norms as 1 + w, Q/K rows in HF order; Q5_0 for the attention
    and MLP projections, Q8_0 for the embedding, F32 norms); returns the HF weights it was made from."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["inner"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_key_length(TINY["head_dim"])
    writer.add_value_length(TINY["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_sliding_window(TINY["window"])
    for key, value in (extra_kv or {}).items():
        (writer.add_string if isinstance(value, str) else writer.add_float32)(key, value)
    tokens, token_types = _tiny_tokens()
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0 if kind != 1 else -float(i) for i, kind in enumerate(token_types)])
    writer.add_token_types(token_types)
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    hf = _tiny_hf_weights()
    for name, weight in hf.items():
        if name.endswith("norm.weight"):
            writer.add_tensor(_gguf_name(name), weight + np.float32(1))
            continue
        kind = gguf.GGMLQuantizationType.Q8_0 if "embed" in name else gguf.GGMLQuantizationType.Q5_0
        writer.add_tensor(_gguf_name(name), gguf.quants.quantize(weight, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf


def _transformers_state_dict(directory, name) -> dict[str, np.ndarray]:
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    state = {key: tensor.numpy() for key, tensor in model.state_dict().items()}
    # transformers ties lm_head to the embedding (the file has no output tensor); streamjax leaves it out.
    np.testing.assert_array_equal(state.pop("lm_head.weight"), state["model.embed_tokens.weight"])
    return state


def _assert_config_matches(config: dict, reference: transformers.PretrainedConfig, differs=()) -> None:
    """Every field streamjax writes, but those in `differs`, equals transformers' (floats as the float32 the file
    stores)."""
    expected = reference.to_dict()
    for key, value in config.items():
        if key == "architectures" or key in differs:  # transformers' GGUF load leaves architectures None
            continue
        if isinstance(value, float):
            assert np.float32(value) == np.float32(expected[key]), key
        else:
            assert value == expected[key], (key, value, expected[key])


def test_gemma3_layer_types_and_merges_by_hand():
    types = sj_gguf.gemma3_layer_types(18)
    assert [i for i, kind in enumerate(types) if kind == "full_attention"] == [5, 11, 17]
    assert types.count("sliding_attention") == 15
    # Merges in token order, each token's splits longest left piece first; "ab" is not a token, so "abc" has one.
    vocab = {"a": 0, "b": 1, "c": 2, "bc": 3, "abc": 4, "ca": 5, "cab": 6, "ab_": 7}
    assert sj_gguf.sentencepiece_merges(vocab) == [("b", "c"), ("a", "bc"), ("c", "a"), ("ca", "b")]


def test_tiny_gemma3_matches_transformers(tmp_path):
    hf = write_tiny_gemma3_gguf(tmp_path / "tiny.gguf")
    checkpoint = sj_gguf.load_gguf(tmp_path / "tiny.gguf")
    expected = _transformers_state_dict(tmp_path, "tiny.gguf")
    assert sorted(checkpoint.state_dict) == sorted(expected) == sorted(hf)
    for name, weight in checkpoint.state_dict.items():
        assert weight.dtype == np.float32, name
        np.testing.assert_array_equal(weight, expected[name], err_msg=name)
        if name.endswith("norm.weight"):  # (1 + w) - 1 in float32: w up to rounding 1 + w (< 4), half of 2**-22
            np.testing.assert_allclose(weight, hf[name], rtol=0, atol=2**-23, err_msg=name)

    config = checkpoint.hf_config
    reference = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    _assert_config_matches(config, reference, differs={"query_pre_attn_scalar"})
    # The query scale: llama.cpp's, head_dim (16), where transformers keeps its default 256 whatever the head size
    # (the two agree on every Gemma 3 but 27B, and on the real 270M file: 256).
    assert (config["query_pre_attn_scalar"], reference.query_pre_attn_scalar) == (16, 256)
    assert config["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert (config["sliding_window"], config["head_dim"]) == (8, 16)
    assert config["rope_parameters"] == {
        "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }

    tokenizer = checkpoint.tokenizer
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert json.loads(tokenizer.backend_tokenizer.to_str()) == json.loads(reference.backend_tokenizer.to_str())
    for text in (TRICKY_TEXT, "the and  the\n\nthe", " a", ""):
        ids = tokenizer(text).input_ids
        assert ids == reference(text).input_ids, text[:40]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    the, space_the = _tiny_tokens()[0].index("the"), _tiny_tokens()[0].index(f"{SPACE}the")
    assert tokenizer("the the").input_ids == [2, the, space_the]  # <bos>, then "the", "▁the"
    assert tokenizer("\n\n").input_ids == [2, 8]  # the user-defined "\n\n" whole
    assert tokenizer("Q").input_ids == [2, 11 + ord("Q")]  # no "Q" token: its byte <0x51>


def test_gemma3_rope_scaling_local_base_and_softcap(tmp_path):
    """Metadata transformers' GGUF load does not read (it has no mapping for them) is converted as transformers'
    Gemma3TextConfig converts the same fields of a Gemma 3 config.json."""
    extra = {
        "gemma3.rope.scaling.type": "linear",
        "gemma3.rope.scaling.factor": 8.0,
        "gemma3.rope.freq_base_swa": 20_000.0,
        "gemma3.final_logit_softcapping": 30.0,
    }
    write_tiny_gemma3_gguf(tmp_path / "scaled.gguf", extra_kv=extra)
    config = sj_gguf.load_gguf(tmp_path / "scaled.gguf").hf_config
    reference = transformers.Gemma3TextConfig(
        rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1_000_000.0, rope_local_base_freq=20_000.0
    )
    assert config["rope_parameters"] == reference.rope_parameters
    assert config["rope_parameters"]["full_attention"]["factor"] == 8.0
    assert config["final_logit_softcapping"] == 30.0


def test_gemma3_loads_without_torch(tmp_path):
    write_tiny_gemma3_gguf(tmp_path / "tiny.gguf")
    assert_loads_without_torch(tmp_path / "tiny.gguf")


def test_gemma3_bad_files(tmp_path):
    write_tiny_gemma3_gguf(tmp_path / "gemma2.gguf", arch="gemma2")
    with pytest.raises(ValueError, match=r"'gemma2' is not supported: streamjax.files.gguf reads 'llama', 'gemma3'"):
        sj_gguf.load_gguf(tmp_path / "gemma2.gguf")
    write_tiny_gemma3_gguf(tmp_path / "capped.gguf", extra_kv={"gemma3.attn_logit_softcapping": 50.0})
    with pytest.raises(sj_gguf.GGUFError, match="gemma3 keys streamjax does not convert: attn_logit_softcapping"):
        sj_gguf.load_gguf(tmp_path / "capped.gguf")
    write_tiny_gemma3_gguf(tmp_path / "gpt2.gguf", tokenizer_model="gpt2")
    with pytest.raises(sj_gguf.GGUFError, match=r"tokenizer model 'gpt2' is not supported for architecture 'gemma3'"):
        sj_gguf.load_gguf_tokenizer(tmp_path / "gpt2.gguf")


# ---------------------------------------------------------------- real assets (Gemma 3 270M Q4_K_M)


@pytest.mark.real_assets
def test_gemma3_270m_weights_and_config_match_transformers(gemma3_gguf):
    checkpoint = sj_gguf.load_gguf(gemma3_gguf)
    expected = _transformers_state_dict(gemma3_gguf.parent, gemma3_gguf.name)
    assert sorted(checkpoint.state_dict) == sorted(expected) and len(expected) == 236
    for name, weight in checkpoint.state_dict.items():
        assert weight.dtype == np.float32 and weight.shape == expected[name].shape, name
        # Bit-identical (measured max |difference| 0): the same dequantization, norms unshifted in float32.
        np.testing.assert_array_equal(weight, expected[name], err_msg=name)
    kinds = {tensor.tensor_type.name for tensor in gguf.GGUFReader(gemma3_gguf).tensors}
    assert kinds == {"Q4_K", "Q5_0", "Q6_K", "Q8_0", "F32"}

    config = checkpoint.hf_config
    _assert_config_matches(
        config, transformers.AutoConfig.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    )
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (18, 640, 2048)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 1, 256)
    assert (config["sliding_window"], config["max_position_embeddings"], config["vocab_size"]) == (512, 32768, 262144)
    assert [i for i, kind in enumerate(config["layer_types"]) if kind == "full_attention"] == [5, 11, 17]
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 1_000_000.0
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 10_000.0


@pytest.mark.real_assets
def test_gemma3_270m_tokenizer_matches_transformers_on_austen(gemma3_gguf, austen_text):
    source = loading.resolve_model("gemma3")  # the named model (`--config.model=gemma3`)
    assert (source.kind, source.path) == ("gguf", gemma3_gguf)
    tokenizer = loading.load_tokenizer(source)
    expected = transformers.AutoTokenizer.from_pretrained(gemma3_gguf.parent, gguf_file=gemma3_gguf.name)
    assert json.loads(tokenizer.backend_tokenizer.to_str()) == json.loads(expected.backend_tokenizer.to_str())
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "mask_token_id", "add_bos_token"):
        assert getattr(tokenizer, name) == getattr(expected, name), name
    text = corpora.load_text("austen")
    ids = tokenizer(text).input_ids
    assert len(ids) == 958_392 and ids[0] == tokenizer.bos_token_id == 2  # the whole text in one call
    assert ids == expected(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for text in (TRICKY_TEXT, "", " leading space", "\n\nparagraph"):
        ids = tokenizer(text).input_ids
        assert ids == expected(text).input_ids, text[:40]
        assert tokenizer.decode(ids, skip_special_tokens=True) == expected.decode(ids, skip_special_tokens=True) == text


# 700 tokens: past the sliding layers' 512-key window, so the hybrid cache's sliding rings wrap on a real model.
STREAM_TOKENS = 700
DENSE_TOKENS = 300
# Measured here (transformers 5.25 float32 eager, CPU): at most 1.6e-4 (300 tokens, both routes) and 1.8e-4
# (700 tokens) apart, logits up to 41.6; about 3x.
LOGITS_ATOL = 5.5e-4


@pytest.fixture(scope="module")
def gemma3_270m(gemma3_gguf, austen_text):
    """(config, params, tokens [1, 700], transformers' logits [1, 700, V]) of the real Gemma 3 270M, loaded once."""
    tokens, expected = transformers_gguf_logits(gemma3_gguf, STREAM_TOKENS)
    config, params, _ = loading.load_model(str(gemma3_gguf))
    return config, params, tokens, expected


def _assert_logits_match(logits, expected) -> None:
    logits = np.asarray(logits)
    np.testing.assert_allclose(logits, expected, atol=LOGITS_ATOL, rtol=0)
    np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))  # top-1 on every token


@pytest.mark.real_assets
def test_gemma3_270m_logits_match_transformers_dense(gemma3_270m):
    """The model's own attention over 300 Austen tokens, a plain causal pass and the chunk route with a cache
    holding every token (4 + 1020, two chunks, the second partial), equals transformers' load of the file."""
    config, params, tokens, expected = gemma3_270m
    tokens, expected = tokens[:, :DENSE_TOKENS], expected[:, :DENSE_TOKENS]
    assert np.abs(expected).max() > 30  # real logits (measured 41.6), not a degenerate model
    _assert_logits_match(streamjax.forward(params, None, tokens, config).logits, expected)
    cache = streamjax.init_cache(config, 1, num_sinks=4, window=1020)
    logits, _ = streamjax.prefill(params, cache, tokens, config, chunk_size=256)
    _assert_logits_match(logits, expected)


@pytest.mark.real_assets
def test_gemma3_270m_streams_past_its_sliding_window_as_transformers(gemma3_270m):
    """700 tokens through the hybrid cache (the 15 sliding layers' 511-slot rings wrap; the 3 global layers hold
    every token in 4 + 1020) equal transformers, which applies the 512-key window itself."""
    config, params, tokens, expected = gemma3_270m
    assert config.sliding_window == 512 < STREAM_TOKENS
    cache = streamjax.init_cache(config, 1, num_sinks=4, window=1020)
    logits, cache = streamjax.prefill(params, cache, tokens, config, chunk_size=256)
    assert cache.sliding.keys[0].shape[-1] == 511
    _assert_logits_match(logits, expected)
    # The window matters here: with sliding layers that see every token, the logits of the first 512 tokens stay
    # (measured 1.8e-4 apart) and those past them move by up to 21.8 (measured; 81 of 700 top-1 predictions change).
    unlimited = dataclasses.replace(config, sliding_window=100_000)
    unwindowed = np.asarray(streamjax.forward(params, None, tokens, unlimited).logits)
    np.testing.assert_allclose(unwindowed[:, :512], expected[:, :512], atol=LOGITS_ATOL, rtol=0)
    assert np.abs(unwindowed[:, 512:] - expected[:, 512:]).max() > 5.0
