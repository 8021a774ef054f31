"""The attention-map experiment (`experiments.attention`) on a tiny random Gemma 3 (4 layers: layer 2 global, the
others sliding over 8 keys) with a word-level tokenizer whose words are their own token ids (a <bos> first), so the
texts are known by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from configs import attention as attention_config
from experiments import attention
from streamjax.files import loading
from streamjax.runs import provenance
from streamjax.stream import attention_maps
from support.family_models import VOCAB, converted, hf_model

VARIANT = "gemma3_mqa_tied_bias_window_8"  # layers 0, 1 and 3 slide over 8 keys, layer 2 is global
BOS = 1


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A folder with model/ (the tiny Gemma 3 and its tokenizer, which puts <bos>, id 1, before every text) and
    text.txt (200 words, word i is w{2 + i % 90}: token id 2 + i % 90)."""
    root = tmp_path_factory.mktemp("attention")
    hf_model(VARIANT).save_pretrained(root / "model")
    vocab = {"[UNK]": 0, "<bos>": BOS, **{f"w{i}": i for i in range(2, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<bos>")
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", BOS)]
    )
    tokenizer.save_pretrained(root / "model")
    (root / "text.txt").write_text(" ".join(f"w{2 + i % 90}" for i in range(200)))
    return root


def _config(tiny, **overrides):
    config = attention_config.get_config()
    config.update({"model": str(tiny / "model"), "data": str(tiny / "text.txt"), "layers": "0,2", "num_texts": 3,
                   "length": 12, **overrides})  # fmt: skip
    return config


def test_the_texts_are_consecutive_pieces_after_bos(tiny):
    tokenizer = loading.load_tokenizer(loading.resolve_model(str(tiny / "model")))
    assert tokenizer("w2 w3").input_ids == [BOS, 2, 3]
    with_bos = attention.texts(tokenizer, str(tiny / "text.txt"), num_texts=3, length=5, bos=True)
    np.testing.assert_array_equal(with_bos, [[1, 2, 3, 4, 5], [1, 6, 7, 8, 9], [1, 10, 11, 12, 13]])
    without = attention.texts(tokenizer, str(tiny / "text.txt"), num_texts=2, length=5, bos=False)
    np.testing.assert_array_equal(without, [[2, 3, 4, 5, 6], [7, 8, 9, 10, 11]])
    assert attention.uniform_share(3) == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_the_experiment_writes_every_layer_s_map_and_first_token_share(tiny, tmp_path):
    report = attention.run(_config(tiny), tmp_path)
    texts = np.array([[BOS, *range(2 + 11 * i, 13 + 11 * i)] for i in range(3)])
    config, params = converted(VARIANT)
    expected = attention_maps.attention_maps(params, config, texts)  # every layer
    maps = np.load(tmp_path / "maps.npy")
    np.testing.assert_allclose(maps, expected, rtol=0, atol=1e-6)
    # A sliding layer sees 8 keys, itself included: queries 8..11 give the first token nothing; the global one does.
    assert np.all(maps[0, 8:, 0] == 0) and np.all(maps[2, 8:, 0] > 0)
    assert report == json.loads((tmp_path / "attention.json").read_text())
    assert [row["type"] for row in report["layers"]] == ["sliding_attention"] * 2 + [
        "full_attention",
        "sliding_attention",
    ]
    shares = np.array([row["first_token_share"] for row in report["layers"]])
    np.testing.assert_allclose(shares, attention_maps.sink_attention_share(expected), rtol=1e-6)
    means = report["mean_first_token_share"]
    assert means == pytest.approx({"full_attention": shares[2], "sliding_attention": shares[[0, 1, 3]].mean()})
    assert report["uniform_share"] == pytest.approx(np.mean(1 / np.arange(2, 13)))
    assert report["made_by"].startswith("python -m ") and report["config"]["layers"] == "0,2"
    assert report["tokens_sha256"] == provenance.tokens_sha256(texts)
    assert (tmp_path / "attention_maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"layers": "0,4"}, r"layers \[4\] are not in the model's \[0, 4\)"), ({"layers": "0,x"}, "comma-separated"),
     ({"layers": "2,2"}, "names a layer twice"), ({"length": 1}, "length >= 2"),
     ({"num_texts": 50}, "fewer than 50 texts of 11 need")],
)  # fmt: skip
def test_bad_input_is_refused(tiny, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        attention.run(_config(tiny, **overrides), tmp_path)
