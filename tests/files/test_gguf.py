"""streamjax.files.gguf: config, weights and tokenizer against transformers' own GGUF loading.

Tiny GGUF files written here with `gguf.GGUFWriter` need no assets; tests marked `real_assets` use
the SmolLM2-135M-Instruct Q4_1 file from `streamjax.files.assets`.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
import transformers

from streamjax.files import corpora
from streamjax.files import gguf as sj_gguf
from streamjax.stream import token_bytes

TINY = {"vocab_extra": ("Ġt", "he", "Ġthe"), "hidden": 32, "heads": 4, "kv_heads": 2, "inner": 64, "layers": 2}
TRICKY_TEXT = (
    "Café naïve — “quotes” 日本語 🙂 emoji\n\n\n  indented  and   spaced\ttab\r\n"
    "numbers 1234567 3.14159 2,000,000 and 0x1F; <|im_start|>special<|im_end|> end.  \n"
)


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: interleave each head's two rotated halves."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tiny_tokens() -> tuple[list[str], list[int], list[str]]:
    alphabet = list(token_bytes.bytes_to_unicode().values())
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *alphabet, *TINY["vocab_extra"]]
    token_types = [3, 3, 3] + [1] * (len(tokens) - 3)
    return tokens, token_types, ["Ġ t", "h e", "Ġt he"]


def _tiny_hf_weights(tie: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vocab, hidden, inner = len(_tiny_tokens()[0]), TINY["hidden"], TINY["inner"]
    head_dim = hidden // TINY["heads"]
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(TINY["layers"]):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (TINY["kv_heads"] * head_dim, hidden),
            prefix + "self_attn.v_proj.weight": (TINY["kv_heads"] * head_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inner, hidden),
            prefix + "mlp.up_proj.weight": (inner, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inner),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _gguf_name(hf_name: str) -> str:
    renames = {
        "model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
        "model.layers.": "blk.", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for hf, ggml in renames.items():
        hf_name = hf_name.replace(hf, ggml)
    return hf_name


def write_tiny_gguf(path: pathlib.Path, arch: str = "llama", tie: bool = True, extra_kv: dict | None = None):
    """A 2-layer llama GGUF (Q8_0 for q_proj and the MLP, F32 elsewhere); returns the expected HF weights."""
    hf = _tiny_hf_weights(tie)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(128)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["inner"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    writer.add_rope_dimension_count(TINY["hidden"] // TINY["heads"])
    for key, value in (extra_kv or {}).items():
        writer.add_uint32(key, value)
    tokens, token_types, merges = _tiny_tokens()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    expected = {}
    for name, weight in hf.items():
        stored = weight
        if "q_proj" in name:
            stored = _llama_cpp_permute(weight, TINY["heads"])
        elif "k_proj" in name:
            stored = _llama_cpp_permute(weight, TINY["kv_heads"])
        if "q_proj" in name or "mlp" in name:
            quantized = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(_gguf_name(name), quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            weight = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
            weight = gguf.quants.dequantize(weight, gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(_gguf_name(name), stored)
        expected[name] = weight
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def test_unpermute_rope_rows_hand_example():
    # One head, head_dim 4: HF rows [a0, a1 | b0, b1] are stored by llama.cpp as [a0, b0, a1, b1].
    stored = np.array([[0.0], [2.0], [1.0], [3.0]])
    np.testing.assert_array_equal(sj_gguf._unpermute_rope_rows(stored, num_heads=1), [[0.0], [1.0], [2.0], [3.0]])
    two_heads = np.arange(8.0)
    np.testing.assert_array_equal(sj_gguf._unpermute_rope_rows(two_heads, 2), [0, 2, 1, 3, 4, 6, 5, 7])


@pytest.mark.parametrize("tie", [True, False])
def test_load_tiny_gguf(tmp_path, tie):
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", tie=tie)
    checkpoint = sj_gguf.load_gguf(tmp_path / "tiny.gguf")
    assert sorted(checkpoint.state_dict) == sorted(expected)
    for name, weight in expected.items():
        assert checkpoint.state_dict[name].dtype == np.float32
        np.testing.assert_array_equal(checkpoint.state_dict[name], weight, err_msg=name)
    config = checkpoint.hf_config
    assert config["tie_word_embeddings"] is tie
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 8)
    assert (config["rms_norm_eps"], config["rope_theta"]) == (1e-5, 100000.0)
    assert (config["vocab_size"], config["bos_token_id"], config["eos_token_id"]) == (262, 1, 2)


def test_tiny_tokenizer(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    tokenizer = sj_gguf.load_gguf_tokenizer(tmp_path / "tiny.gguf")
    ids = tokenizer(" the<|im_start|>é").input_ids
    byte_id = 3  # tokens are 3 specials, then the 256 byte symbols in byte order, then the merges
    assert ids == [261, 1, byte_id + 0xC3, byte_id + 0xA9]  # "Ġthe", <|im_start|>, the UTF-8 bytes of é
    assert tokenizer.decode(ids) == " the<|im_start|>é"
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and tokenizer.pad_token_id == 2


def test_refuses_unsupported_files(tmp_path):
    write_tiny_gguf(tmp_path / "falcon.gguf", arch="falcon")
    with pytest.raises(ValueError, match="'falcon' is not supported"):
        sj_gguf.load_gguf(tmp_path / "falcon.gguf")
    write_tiny_gguf(tmp_path / "moe.gguf", extra_kv={"llama.expert_count": 8})
    with pytest.raises(ValueError, match="expert_count"):
        sj_gguf.load_gguf(tmp_path / "moe.gguf")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        sj_gguf.load_gguf(tmp_path / "missing.gguf")


def assert_loads_without_torch(path: pathlib.Path) -> None:
    """Load the GGUF file at `path` (weights and tokenizer) in a child process that fails if torch was imported."""
    code = (
        "import sys; from streamjax.files import gguf; c = gguf.load_gguf(sys.argv[1]); c.tokenizer('hi').input_ids; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]


def test_library_does_not_import_torch(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    assert_loads_without_torch(tmp_path / "tiny.gguf")


def test_tiny_gguf_matches_transformers(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", tie=False)
    checkpoint = sj_gguf.load_gguf(tmp_path / "tiny.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    reference = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    assert sorted(reference) == sorted(checkpoint.state_dict)
    for name, weight in checkpoint.state_dict.items():
        np.testing.assert_array_equal(weight, reference[name], err_msg=name)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert checkpoint.tokenizer(TRICKY_TEXT).input_ids == reference_tokenizer(TRICKY_TEXT).input_ids


# ---------------------------------------------------------------- real assets (SmolLM2-135M-Instruct Q4_1)


@pytest.mark.real_assets
def test_smollm2_weights_and_config_match_transformers(smollm2_gguf):
    checkpoint = sj_gguf.load_gguf(smollm2_gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    expected = {name: tensor.numpy() for name, tensor in model.state_dict().items()}
    # The file has no output tensor: transformers ties lm_head to the embedding, we leave it out.
    assert checkpoint.hf_config["tie_word_embeddings"] is True and model.config.tie_word_embeddings
    np.testing.assert_array_equal(expected.pop("lm_head.weight"), expected["model.embed_tokens.weight"])
    assert sorted(checkpoint.state_dict) == sorted(expected)
    for name, weight in checkpoint.state_dict.items():
        assert weight.dtype == np.float32 and weight.shape == expected[name].shape, name
        np.testing.assert_array_equal(weight, expected[name], err_msg=name)

    config, hf = checkpoint.hf_config, model.config.to_dict()
    hf["rope_theta"] = hf["rope_parameters"]["rope_theta"]
    for key, value in config.items():
        if key == "architectures":
            continue
        if isinstance(value, float):
            assert np.float32(value) == np.float32(hf[key]), key  # GGUF stores float32
        else:
            assert value == hf[key], key
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert (config["rope_theta"], config["rms_norm_eps"], config["vocab_size"]) == (100000.0, 1e-5, 49152)


@pytest.mark.real_assets
def test_smollm2_tokenizer_matches_transformers(smollm2_gguf, austen_text):
    tokenizer = sj_gguf.load_gguf_tokenizer(smollm2_gguf)
    expected = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    assert json.loads(tokenizer.backend_tokenizer.to_str()) == json.loads(expected.backend_tokenizer.to_str())
    pride = corpora.load_text("austen")[:20_000]
    assert pride.startswith("PRIDE AND PREJUDICE")
    for text in (pride, TRICKY_TEXT, "", " leading space", "\n\nparagraph"):
        ids = tokenizer(text).input_ids
        assert ids == expected(text).input_ids, text[:40]
        assert tokenizer.decode(ids) == expected.decode(ids) == text
    # SmolLM2's GGUF says add_bos_token = False: no BOS (<|im_start|>, id 1) is prepended.
    assert tokenizer("Hello").input_ids == expected("Hello").input_ids == [19556]
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "add_bos_token", "add_eos_token"):
        assert getattr(tokenizer, name) == getattr(expected, name), name
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")


@pytest.mark.real_assets
def test_smollm2_logits_match_transformers_gguf_load(smollm2_gguf, austen_text):
    """streamjax's torch-free load gives transformers' logits on the first 128 tokens of a real text."""
    import streamjax
    from streamjax.files import loading

    config, params, tokenizer = loading.load_model(str(smollm2_gguf))
    tokens = corpora.load_corpus_tokens("austen", tokenizer, num_tokens=128)[None]
    assert tokens.shape == (1, 128)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    cache = streamjax.init_cache(config, 1, num_sinks=4, window=1020)
    logits, _ = streamjax.prefill(params, cache, tokens, config, chunk_size=64)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=5.5e-4, rtol=0)  # measured 1.8e-4
