"""Reading a model's chat template from its files (what `stream.templates` renders).

Where a template comes from (`load_chat_template`), first found wins:
    a file given by hand (the chat program's `--config.chat_template=FILE`)
    a GGUF file: its `tokenizer.chat_template` metadata
    a checkpoint directory: `chat_template.jinja`, else `tokenizer_config.json`'s `chat_template`
        (a string, or a list of named templates of which "default" is used), as transformers prefers.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping

from streamjax.files.loading import ModelSource, resolve_model
from streamjax.stream.templates import TEMPLATE_OPTION, ChatTemplate

# The named special tokens transformers passes to a template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_GGUF_SPECIAL_TOKEN_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
}


class MissingChatTemplateError(ValueError):
    """The model carries no chat template; the message says how to give one."""


def load_chat_template(source: ModelSource | str, template_file: str | os.PathLike | None = None) -> ChatTemplate:
    """The chat template of a model source or spec (see `loading.resolve_model`), or of `template_file`.

    Raises MissingChatTemplateError when neither the model nor `template_file` gives one.
    """
    source = resolve_model(source) if isinstance(source, str) else source
    if source.kind == "gguf":
        text, origin, special_tokens = _from_gguf(source.path)
    else:
        text, origin, special_tokens = _from_directory(source.path)
    if template_file is not None:
        path = pathlib.Path(template_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"chat template file {path} does not exist")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    if text is None:
        raise MissingChatTemplateError(
            f"model {source.spec!r} has no chat template (looked for {origin}). Give one as a Jinja file, e.g. the "
            f"chat_template.jinja of a chat model of the same family: {TEMPLATE_OPTION}"
        )
    return ChatTemplate(text, special_tokens, origin)


def _from_gguf(path: pathlib.Path) -> tuple[str | None, str, dict[str, str]]:
    """(template or None, where it is or was looked for, special tokens) from a GGUF file's metadata."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    special_tokens = {}
    if "tokenizer.ggml.tokens" in fields:
        tokens = fields["tokenizer.ggml.tokens"]
        for name, key in _GGUF_SPECIAL_TOKEN_IDS.items():
            if key in fields:
                special_tokens[name] = tokens.contents(fields[key].contents())
    template = fields["tokenizer.chat_template"].contents() if "tokenizer.chat_template" in fields else None
    return template, f"the metadata key tokenizer.chat_template of {path}", special_tokens


def _from_directory(path: pathlib.Path) -> tuple[str | None, str, dict[str, str]]:
    """(template or None, where it is or was looked for, special tokens) from a checkpoint directory."""
    config = _read_json(path / "tokenizer_config.json")
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file), _directory_special_tokens(path, config)
    return (*_config_template(config.get("chat_template"), path), _directory_special_tokens(path, config))


def _config_template(template: str | list | None, path: pathlib.Path) -> tuple[str | None, str]:
    """(template or None, where) from tokenizer_config.json's `chat_template`: a string, or a list of
    named templates of which transformers takes "default"."""
    in_config = f"chat_template in {path / 'tokenizer_config.json'}"
    if isinstance(template, str):
        return template, in_config
    if template is None:
        return None, f"{path / 'chat_template.jinja'} or {in_config}"
    named = {entry["name"]: entry["template"] for entry in template}
    if "default" not in named:
        return None, f"a 'default' among the named templates {sorted(named)} of {in_config}"
    return named["default"], f"the 'default' {in_config}"


def _directory_special_tokens(path: pathlib.Path, config: dict) -> dict[str, str]:
    """Named special tokens from tokenizer_config.json, else the legacy special_tokens_map.json."""
    legacy = _read_json(path / "special_tokens_map.json")
    special_tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = config.get(name, legacy.get(name))
        if token is not None:  # a string, or an AddedToken written as {"content": ..., ...}
            special_tokens[name] = token["content"] if isinstance(token, Mapping) else str(token)
    return special_tokens


def _read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
