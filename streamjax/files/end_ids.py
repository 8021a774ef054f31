"""End-of-sequence ids from a model's files, so a reply ends where the model ends its turn.

`eos_token_ids`: the ids a model's metadata names, plus the token its chat template closes an
assistant turn with. The decode loop (`stream.stopping`) takes these ids as an array and reads no file.
"""

from __future__ import annotations

import json

from streamjax.files import chat_templates
from streamjax.files.loading import ModelSource, resolve_model
from streamjax.stream.templates import ChatTemplate, text_after_reply

_GGUF_END_IDS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
_GGUF_CONTROL = 3  # tokenizer.ggml.token_type of control tokens


def eos_token_ids(source: ModelSource | str, template: ChatTemplate | None = None) -> frozenset[int]:
    """End-of-sequence ids of a model source or spec.

    GGUF: `tokenizer.ggml.eos_token_id` (and `eot_token_id`, `eom_token_id` where present).
    Checkpoint directory: `generation_config.json`'s `eos_token_id` (an int or a list), else config.json's.
    Both: plus the special token the chat template writes right after an assistant message (its
    end-of-turn token), if the model has a template (`template`, else the model's own). Empty if
    the model names none.
    """
    source = resolve_model(source) if isinstance(source, str) else source
    ids, special_tokens = _gguf_end_ids(source) if source.kind == "gguf" else _directory_end_ids(source)
    if template is None:
        try:
            template = chat_templates.load_chat_template(source)
        except chat_templates.MissingChatTemplateError:
            return frozenset(ids)
    end_of_turn = end_of_turn_token(template, special_tokens)
    return frozenset(ids | ({special_tokens[end_of_turn]} if end_of_turn else set()))


def _gguf_end_ids(source: ModelSource) -> tuple[set[int], dict[str, int]]:
    """(end ids, special token -> id) from a GGUF file's metadata."""
    import gguf

    fields = gguf.GGUFReader(source.path).fields
    ids = {int(fields[key].contents()) for key in _GGUF_END_IDS if key in fields}
    if "tokenizer.ggml.token_type" not in fields:
        return ids, {}
    types = fields["tokenizer.ggml.token_type"].contents()
    tokens = fields["tokenizer.ggml.tokens"]
    return ids, {tokens.contents(i): i for i, kind in enumerate(types) if kind == _GGUF_CONTROL}


def _directory_end_ids(source: ModelSource) -> tuple[set[int], dict[str, int]]:
    """(end ids, special token -> id) from generation_config.json, else config.json, and tokenizer.json."""
    ids = None
    for name in ("generation_config.json", "config.json"):
        if ids is None and (source.path / name).is_file():
            ids = json.loads((source.path / name).read_text(encoding="utf-8")).get("eos_token_id")
    ids = set() if ids is None else {ids} if isinstance(ids, int) else set(ids)
    tokenizer_file = source.path / "tokenizer.json"
    added = json.loads(tokenizer_file.read_text(encoding="utf-8"))["added_tokens"] if tokenizer_file.is_file() else []
    return ids, {token["content"]: token["id"] for token in added if token.get("special")}


def end_of_turn_token(template: ChatTemplate, special_tokens: dict[str, int]) -> str | None:
    """The special token the template writes right after an assistant message's content, if any."""
    try:
        after = text_after_reply(template)
    except ValueError:  # a template with demands of its own (say, a system message first): no probe
        return None
    return max((token for token in special_tokens if after.startswith(token)), key=len, default=None)
