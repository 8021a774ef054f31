"""A model ready to chat, from its files: weights, tokenizer, chat template and the ids that end a reply."""

from __future__ import annotations

from streamjax.files import chat_templates, end_ids, loading
from streamjax.stream import chat


def load_chat_model(spec: str, dtype="float32", mesh=None, template_file: str | None = None) -> chat.ChatModel:
    """A model to chat with (see `loading.load_model`); the template is checked before the weights
    are read: a model without one raises `chat_templates.MissingChatTemplateError` saying how to give one."""
    source = loading.resolve_model(spec)
    template = chat_templates.load_chat_template(source, template_file)
    tokenizer = loading.load_tokenizer(source)
    if tokenizer is None:
        raise ValueError(f"model {spec!r} has no tokenizer files, so it cannot read or write text")
    config, params = loading.load_weights(source, loading.parse_dtype(dtype), mesh)
    return chat.ChatModel(spec, config, params, tokenizer, template, end_ids.eos_token_ids(source, template), mesh)
