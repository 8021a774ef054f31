"""A model's own chat template, rendered with jinja2 as transformers' `apply_chat_template` renders it.

Templates are read from model files by `streamjax.files.chat_templates`.

Rendering matches transformers: a sandboxed jinja2 environment with trim_blocks and lstrip_blocks,
the loopcontrols extension and a `{% generation %}` block that renders its body; `raise_exception`,
`strftime_now`, `namespace` (no underscore names) and a `tojson` filter that keeps non-ASCII
characters; the template sees `messages`, `tools`/`documents` (None), `add_generation_prompt` and the
named special tokens (`bos_token`, `eos_token`, ...), as transformers passes `special_tokens_map`.

A chat program feeds the model only what each turn adds: `turn_text` is the rendering with the new
messages minus the rendering so far, and refuses templates for which the latter is not a prefix.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from collections.abc import Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

ROLES = ("system", "user", "assistant")
TEMPLATE_OPTION = "--config.chat_template=FILE"  # how the chat programs take a template file


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """A jinja chat template and the named special tokens it may use.

    text: the template source.
    special_tokens: e.g. {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, passed as variables.
    origin: where the template came from, for error messages.
    """

    text: str
    special_tokens: Mapping[str, str]
    origin: str


def validate_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Plain {"role", "content"} dicts; ValueError naming the first bad message (index and value)."""
    if isinstance(messages, str | Mapping) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {messages!r}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise ValueError(f"message {index} must be a dict with exactly 'role' and 'content', got {message!r}")
        if message["role"] not in ROLES:
            raise ValueError(f"message {index} has role {message['role']!r}; the role must be one of {ROLES}")
        if not isinstance(message["content"], str):
            raise ValueError(f"message {index} has content {message['content']!r}; the content must be a string")
        checked.append({"role": str(message["role"]), "content": str.__str__(message["content"])})
    return checked


def render(template: ChatTemplate, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True) -> str:
    """The text of a conversation as the template writes it, with the assistant's header if `add_generation_prompt`."""
    messages = validate_messages(messages)
    variables = dict(template.special_tokens, messages=messages, tools=None, documents=None)
    try:
        return _compile(template.text).render(**variables, add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as error:
        raise ValueError(f"the chat template ({template.origin}) refused the conversation: {error}") from error


# An assistant message no template has text for: what the template writes after it closes the turn.
_PROBE_REPLY = "\x00reply\x00"


def text_after_reply(template: ChatTemplate) -> str:
    """The text the template writes right after an assistant message's content: the rendering of a user
    message and a reply, without a generation prompt, from the end of the reply on (ChatML:
    "<|im_end|>\\n"). Raises ValueError if the template refuses that conversation."""
    probe = [{"role": "user", "content": "question"}, {"role": "assistant", "content": _PROBE_REPLY}]
    return render(template, probe, add_generation_prompt=False).rpartition(_PROBE_REPLY)[2]


def turn_text(
    template: ChatTemplate,
    history: Sequence[Mapping[str, str]],
    new_messages: Sequence[Mapping[str, str]],
    add_generation_prompt: bool = True,
    history_prompted: bool = False,
) -> str:
    """The text `new_messages` add after `history`: render(history + new, add_generation_prompt) minus
    render(history, history_prompted), the latter "" when history is empty.

    `history_prompted`: the text so far ended with the generation prompt (history ends with the user
    message the model then answered); `new_messages` then starts with that answer, and the result
    starts with the answer's text as the template writes it: the chat program drops the part it
    generated (for SmolLM2, "reply<|im_end|>") and feeds the rest ("\\n<|im_start|>user...").
    Raises ValueError if the template is not prefix-stable for this conversation.
    """
    history, new_messages = validate_messages(history), validate_messages(new_messages)
    before = render(template, history, history_prompted) if history else ""
    after = render(template, history + new_messages, add_generation_prompt)
    if not after.startswith(before):
        at = next((i for i, (a, b) in enumerate(zip(before, after)) if a != b), min(len(before), len(after)))
        raise ValueError(
            f"the chat template ({template.origin}) is not prefix-stable: the conversation so far renders as "
            f"...{before[max(0, at - 40) : at + 40]!r} but with the new messages as "
            f"...{after[max(0, at - 40) : at + 40]!r} (they differ at character {at}), so a turn cannot be fed as "
            "an increment; feed the whole rendering instead"
        )
    return after[len(before) :]


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for transformers' masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja's `namespace`, refusing underscore names as transformers does (no reach into Python internals)."""

    def __init__(*args, **kwargs):  # jinja's own signature trick, so `namespace(self=...)` works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates may not set underscore names on a namespace: {name!r}"
            )


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(pattern: str) -> str:
    return datetime.datetime.now().strftime(pattern)


@functools.lru_cache(maxsize=16)
def _compile(text: str) -> jinja2.Template:
    """The template compiled in transformers' environment (cached: a chat renders the same one every turn)."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace, dict=_TemplateDict()
    )
    return environment.from_string(text)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without handing them the dict type itself."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)
