"""Tiny chat models: a random Llama with a word-level tokenizer and a hand-written chat template, saved to disk."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from streamjax.files import chat_models
from streamjax.stream import chat, templates
from support.models import CHATML_TEMPLATE, random_hf_llama, save_byte_tokenizer, save_word_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]


# Word-level template: w90 opens a message, w91-w93 name the role, w2 ends a message (the model's eos id).
TEMPLATE = (
    "{% for m in messages %}w90 {{ {'system': 'w91', 'user': 'w92', 'assistant': 'w93'}[m['role']] }} "
    "{{ (m['content'] ~ ' w2') | trim }} {% endfor %}{% if add_generation_prompt %}w90 w93 {% endif %}"
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model directory, template file) of a tiny random Llama that ends replies with id 2 ("w2")."""
    root = tmp_path_factory.mktemp("chat")
    model = random_hf_llama(seed=12, max_position_embeddings=1024, eos_token_id=2)
    model.save_pretrained(root / "model")
    save_word_tokenizer(root / "model", model.config.vocab_size)
    (root / "template.jinja").write_text(TEMPLATE)
    return root / "model", root / "template.jinja"


@pytest.fixture(scope="module")
def two_end_ids(tmp_path_factory):
    """A tiny random Llama with SmolLM2's end ids, <|endoftext|> 0 and <|im_end|> 2, of which its ChatML
    template closes a turn with 2; its final norm is zero, so every logit is 0 and greedy decoding
    (argmax: the first maximum) always picks 0, the end id that is not the template's."""
    import torch

    root = tmp_path_factory.mktemp("two_end_ids")
    model = random_hf_llama(seed=3, vocab_size=259, max_position_embeddings=4096, eos_token_id=[0, 2])
    with torch.no_grad():
        model.model.norm.weight.zero_()
    model.save_pretrained(root / "model")
    save_byte_tokenizer(root / "model", specials_first=True)
    (root / "template.jinja").write_text(CHATML_TEMPLATE)
    return chat_models.load_chat_model(str(root / "model"), template_file=str(root / "template.jinja"))


def rendered_ids(model: chat.ChatModel, messages: list[dict]) -> list[int]:
    """The token ids of the template's rendering of `messages` (no generation prompt)."""
    text = templates.render(model.template, messages, add_generation_prompt=False)
    return model.tokenizer(text, add_special_tokens=False).input_ids


def cache_stream(cache) -> list[int]:
    """The token ids of a cache that holds its whole stream (nothing evicted), in stream order."""
    length = int(cache.length[0])
    positions = np.asarray(cache.slot_positions[0])[:length]
    assert sorted(positions.tolist()) == list(range(int(cache.next_position[0])))  # nothing evicted
    return np.asarray(cache.slot_tokens[0])[:length][np.argsort(positions)].tolist()
