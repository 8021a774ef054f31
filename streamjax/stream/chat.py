"""Endless multi-turn chat in constant memory: a conversation is one stream's cache and what was said.

Each turn feeds the cache only what the turn adds to the conversation as the model's own chat
template renders it (the end of the previous reply as the template writes it, the user's message and
the generation prompt), then generates the reply into the same cache (`streamjax.generation`), so the
cache holds, turn after turn, each turn's input tokens followed by its reply tokens. The first tokens
of the conversation (the template's system prompt) are the sinks; the rest is a rolling window, so the
conversation can go on for ever at the memory and cost of S + W cached tokens.

`ChatModel` is what stays fixed (weights, tokenizer, template, end ids); `Conversation` is the state
that goes into a turn and comes out of it (`chat_turn`), with a `Turn` record of what happened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from typing import Any

import jax
import numpy as np

from streamjax.model import sharding
from streamjax.model.cache import SinkCache, init_cache
from streamjax.model.config import ModelConfig
from streamjax.stream import generation, sampling, stopping, templates


@dataclasses.dataclass(frozen=True)
class ChatModel:
    """A model ready to chat: weights, tokenizer, chat template and the ids that end a reply."""

    spec: str
    config: ModelConfig
    params: dict
    tokenizer: Any
    template: templates.ChatTemplate
    end_ids: frozenset[int]
    mesh: Any = None


@dataclasses.dataclass
class Conversation:
    """One conversation: its cache (a single stream) and its messages as the template renders them.

    `reply_text` is the text the last reply's tokens decode to (its end id included): the part of the
    template's rendering that is already in the cache when the next turn comes.
    """

    cache: SinkCache
    messages: list[dict[str, str]]
    reply_text: str = ""

    @property
    def turns(self) -> int:
        return sum(message["role"] == "assistant" for message in self.messages)


def new_conversation(model: ChatModel, num_sinks: int, window: int, system_prompt: str = "") -> Conversation:
    """An empty conversation with a cache of S + W slots in the params' dtype (on the model's mesh)."""
    dtype = jax.tree.leaves(model.params)[0].dtype
    cache = init_cache(model.config, 1, num_sinks, window, dtype)
    if model.mesh is not None:
        cache = sharding.shard_cache(cache, model.mesh)
    return Conversation(cache, [{"role": "system", "content": system_prompt}] if system_prompt else [])


@dataclasses.dataclass
class Turn:
    """What one turn did; `input_token_ids` then `reply_token_ids` is exactly what it added to the cache."""

    turn: int
    user: str
    reply: str
    input_token_ids: list[int]
    reply_token_ids: list[int]
    finish_reason: str | None
    stream_position: int
    cache_fill: int
    cache_capacity: int
    prefill_tokens_per_second: float
    decode_tokens_per_second: float
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def turn_input(model: ChatModel, conversation: Conversation, user_message: str) -> list[int]:
    """Token ids a turn feeds before generating: what the template adds for `user_message` after the
    conversation so far, less the part of it the last reply already put in the cache."""
    return messages_input(model, conversation, [{"role": "user", "content": user_message}])


def messages_input(model: ChatModel, conversation: Conversation, new_messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids that feed `new_messages` (then the generation prompt) after the conversation so far:
    what the template adds for them, less the part of it the last reply already put in the cache."""
    new_messages = list(new_messages)
    if not conversation.messages or conversation.messages[-1]["role"] != "assistant":
        text = templates.render(model.template, [*conversation.messages, *new_messages], add_generation_prompt=True)
    else:
        *history, reply = conversation.messages
        text = templates.turn_text(model.template, history, [reply, *new_messages], True, history_prompted=True)
        if not text.startswith(conversation.reply_text):
            raise ValueError(
                f"the chat template ({model.template.origin}) writes the last reply as {text[:80]!r}..., not as "
                f"the model generated it ({conversation.reply_text[:80]!r}...), so the cache and the conversation "
                "would differ"
            )
        text = text[len(conversation.reply_text) :]
    return list(model.tokenizer(text, add_special_tokens=False).input_ids)


def end_of_turn_id(model: ChatModel) -> int:
    """The id that closes an assistant turn as the model's chat template writes it: the end id whose
    token the template writes first after a reply's content (ChatML: <|im_end|>), whitespace before it
    skipped. Every turn is closed with it (`chat_turn`, `dialogue`, `streameval`); a reply that stops on
    another end id (a model's <|endoftext|>) keeps that id, and the template's one follows it.
    Raises ValueError when none of the model's end ids closes a turn in its template."""
    after = templates.text_after_reply(model.template).lstrip()
    texts = {end_id: decode_text(model.tokenizer, [end_id]) for end_id in model.end_ids}
    closing = [end_id for end_id, text in texts.items() if text and after.startswith(text)]
    if not closing:
        raise ValueError(
            f"none of the model's end ids {sorted(model.end_ids)} closes an assistant turn in its chat template "
            f"({model.template.origin}), which writes {after[:40]!r} after a reply; give a template that ends a "
            f"reply with one of them ({templates.TEMPLATE_OPTION})"
        )
    return max(closing, key=lambda end_id: len(texts[end_id]))


def chat_turn(
    model: ChatModel,
    conversation: Conversation,
    user_message: str,
    settings: sampling.SamplingSettings,
    stops: stopping.StopConditions,
    *,
    on_text: Callable[[str], None] | None = None,
    chunk_size: int = 256,
    block_size: int = 16,
) -> tuple[Conversation, Turn]:
    """One turn: feed the user's message, generate the reply (passing its text to `on_text` as it
    comes), and return the conversation after it (its cache donated) and the turn's record."""
    templates.validate_messages([{"role": "user", "content": user_message}])
    inputs = turn_input(model, conversation, user_message)
    printer = _TextPrinter(model.tokenizer, on_text, hidden_ids=model.end_ids)
    result = generation.generate(
        model.params, conversation.cache, [inputs], model.config, settings, stops,
        chunk_size=chunk_size, block_size=block_size, on_tokens=printer,
    )  # fmt: skip
    reply_ids = result.tokens[0].tolist()
    ended = result.reasons[0] == "end_id"
    reply = decode_text(model.tokenizer, reply_ids[:-1] if ended else reply_ids)
    written = decode_text(model.tokenizer, reply_ids)
    # The message is the reply as the cache holds it up to the template's end of turn: an end id that
    # is not the template's (stays in the cache) stays in the message, and the next turn closes it.
    closed = ended and reply_ids[-1] == end_of_turn_id(model)
    messages = [
        *conversation.messages,
        {"role": "user", "content": user_message},
        {"role": "assistant", "content": reply if closed else written},
    ]
    after = Conversation(result.cache, messages, written)
    return after, _turn_record(after, user_message, reply, inputs, reply_ids, result)


def _turn_record(conversation, user, reply, inputs, reply_ids, result: generation.GenerationResult) -> Turn:
    stats, cache = result.stats, conversation.cache
    prefill_steady = stats["prefill_seconds"] - stats["prefill_compile_seconds"]
    decode_steady = stats["decode_seconds"] - stats["decode_compile_seconds"]
    return Turn(
        turn=conversation.turns, user=user, reply=reply, input_token_ids=inputs, reply_token_ids=reply_ids,
        finish_reason=result.reasons[0], stream_position=int(sharding.to_host(cache.next_position)[0]),
        cache_fill=int(sharding.to_host(cache.length)[0]), cache_capacity=cache.capacity,
        prefill_tokens_per_second=len(inputs) / prefill_steady if prefill_steady > 0 else float("nan"),
        decode_tokens_per_second=max(len(reply_ids) - 1, 0) / decode_steady if decode_steady > 0 else float("nan"),
        prefill_seconds=stats["prefill_seconds"], decode_seconds=stats["decode_seconds"],
        compile_seconds=stats["prefill_compile_seconds"] + stats["decode_compile_seconds"],
    )  # fmt: skip


def decode_text(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class ReplyText:
    """A reply's text as its tokens come: `add(ids)` returns the text they add, holding back an
    incomplete UTF-8 character until its last byte arrives. `hidden_ids` (the end ids, which end the
    reply) are not shown, so the text is the reply's content; `text` is all of it so far."""

    def __init__(self, tokenizer, hidden_ids: Collection[int] = ()):
        self.tokenizer, self.hidden, self.ids, self.shown = tokenizer, hidden_ids, [], 0

    @property
    def text(self) -> str:
        return decode_text(self.tokenizer, self.ids)

    def add(self, ids: Sequence[int]) -> str:
        self.ids.extend(token for token in ids if token not in self.hidden)
        text = self.text.rstrip("\ufffd")
        new, self.shown = text[self.shown :], max(self.shown, len(text))
        return new


class _TextPrinter:
    """`generate`'s `on_tokens` for one stream: hands `on_text` the reply's new text block by block
    (`ReplyText`: end ids hidden, incomplete UTF-8 characters held back)."""

    def __init__(self, tokenizer, on_text: Callable[[str], None] | None, hidden_ids: Collection[int] = ()):
        self.on_text, self.reply = on_text, ReplyText(tokenizer, hidden_ids)

    def __call__(self, new: list[np.ndarray]) -> None:
        if self.on_text is None:
            return
        if text := self.reply.add(new[0].tolist()):
            self.on_text(text)


def turn_settings(config, turn: int) -> sampling.SamplingSettings:
    """Sampling settings of a chat config for one turn; turn n draws with seed `config.seed + n`."""
    return sampling.sampling_settings(1, **turn_sampling(config, turn))


def turn_sampling(config, turn: int) -> dict[str, Any]:
    """The `sampling.sampling_settings` arguments of a chat config for one turn (see `turn_settings`)."""
    return dict(
        temperature=config.temperature, top_k=config.top_k, top_p=config.top_p, min_p=config.min_p,
        repetition_penalty=config.repetition_penalty, seed=(config.seed + turn) % 2**32,
    )  # fmt: skip
