"""Stop conditions checked on device inside the decode loop: end-of-sequence ids and stop strings.

Letters: B streams, V vocabulary, L the longest token in bytes, S automaton states, K stop strings.

End ids come in as an array (`streamjax.files.end_ids.eos_token_ids` reads them from a model's files).

Stop strings are matched exactly, on the bytes of the generated text, with static shapes:
- `token_bytes.token_bytes` (host): every token's bytes, [V, L] uint8 and lengths [V].
- `stop_strings` (host): a byte-level Aho-Corasick automaton of all streams' stop strings, as a
  transition table [S, 256], which strings each state completes [S, K], and which strings each
  stream stops at [B, K].
- `read_token` (device): feeds each stream's new token's bytes through the automaton; a stream stops
  at the token during which one of its stop strings completes, even if the string ends before the
  token does (the token is kept), as transformers' StopStringCriteria decides.
A stream's automaton state starts at `initial_state` (0: nothing seen), so stop strings match
within the generated text only; read prompt tokens first to let a match begin there.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from streamjax.stream.token_bytes import TokenBytes, pack_token_bytes, token_bytes

# ---------------------------------------------------------------- stop strings


@flax.struct.dataclass
class StopStrings:
    """A byte-level Aho-Corasick automaton of K stop strings and which of them each of B streams uses.

    transitions: [S, 256] int32, the state after reading a byte; state 0 is the start (nothing seen).
    completes: [S, K] bool, reading into state s completes stop string k.
    active: [B, K] bool, stream b stops at stop string k.
    Or one automaton per stream (`per_stream_stop_strings`): transitions [B, S, 256] and completes
    [B, S, K], so that one stream's strings change without renumbering the others' states (a server
    whose streams come and go).
    """

    transitions: jax.Array
    completes: jax.Array
    active: jax.Array


def stop_strings(
    per_stream: Sequence[Sequence[str]], num_states: int | None = None, num_strings: int | None = None
) -> StopStrings:
    """The automaton of B streams' stop strings, `per_stream[b]` being stream b's (possibly none).

    `num_states` (S) and `num_strings` (K) pad the arrays to those sizes (padding is never reached
    and never active), so that other stop strings need no new compilation; by default they fit.
    """
    if isinstance(per_stream, str) or any(isinstance(strings, str) for strings in per_stream):
        raise ValueError(f"stop strings are given per stream, as a list of lists of strings; got {per_stream!r}")
    for stream, strings in enumerate(per_stream):
        for string in strings:
            if not isinstance(string, str) or not string:
                raise ValueError(f"stop string {string!r} of stream {stream} is not a non-empty string")
    patterns = sorted({string for strings in per_stream for string in strings})
    transitions, completes = _aho_corasick([pattern.encode("utf-8") for pattern in patterns])
    active = np.array([[pattern in strings for pattern in patterns] for strings in per_stream], bool)
    active = active.reshape(len(per_stream), len(patterns))
    states = _padded_size("num_states", num_states, len(transitions))
    strings = _padded_size("num_strings", num_strings, len(patterns))
    transitions = np.pad(transitions, ((0, states - len(transitions)), (0, 0)))
    completes = np.pad(completes, ((0, states - len(completes)), (0, strings - len(patterns))))
    active = np.pad(active, ((0, 0), (0, strings - len(patterns))))
    return StopStrings(jnp.asarray(transitions), jnp.asarray(completes), jnp.asarray(active))


def per_stream_stop_strings(per_stream: Sequence[Sequence[str]], num_states: int, num_strings: int) -> StopStrings:
    """One automaton per stream (transitions [B, S, 256], completes [B, S, K]), each padded to `num_states`
    and `num_strings`: replacing one stream's rows (`with_stream_stop_strings`) leaves the others' as they are."""
    automata = [stop_strings([strings], num_states, num_strings) for strings in per_stream]
    return jax.tree.map(lambda *parts: jnp.concatenate([part[None] for part in parts]), *automata).replace(
        active=jnp.concatenate([automaton.active for automaton in automata])
    )


def _padded_size(name: str, wanted: int | None, needed: int) -> int:
    if wanted is not None and wanted < needed:
        raise ValueError(f"{name}={wanted} is too small: these stop strings need {needed}")
    return needed if wanted is None else wanted


def _aho_corasick(patterns: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(transitions [S, 256] int32, completes [S, K] bool) of the automaton that finds every pattern."""
    children, completes = _trie(patterns)
    transitions = np.zeros((len(children), 256), np.int32)
    fail = np.zeros(len(children), np.int32)
    transitions[0, list(children[0])] = list(children[0].values())
    queue = collections.deque(children[0].values())
    while queue:  # breadth first: a state's failure state is shallower, so already complete
        state = queue.popleft()
        completes[state] |= completes[fail[state]]
        transitions[state] = transitions[fail[state]]
        for byte, child in children[state].items():
            fail[child] = transitions[fail[state], byte]
            transitions[state, byte] = child
            queue.append(child)
    return transitions, completes


def _trie(patterns: list[bytes]) -> tuple[list[dict[int, int]], np.ndarray]:
    """(children of each state, completes [S, K] without failure links) of the patterns' trie."""
    children: list[dict[int, int]] = [{}]
    ends = []
    for pattern in patterns:
        state = 0
        for byte in pattern:
            if byte not in children[state]:
                children[state][byte] = len(children)
                children.append({})
            state = children[state][byte]
        ends.append(state)
    completes = np.zeros((len(children), len(patterns)), bool)
    completes[ends, np.arange(len(patterns))] = True
    return children, completes


def initial_state(batch_size: int) -> jax.Array:
    """[B] int32 automaton states of streams that have generated nothing yet."""
    return jnp.zeros(batch_size, jnp.int32)


def read_token(
    stops: StopStrings, token_table: TokenBytes, state: jax.Array, tokens: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(state [B] int32, stopped [B] bool) after each stream's new token `tokens` [B] int32.

    stopped[b]: one of stream b's stop strings completes within the token's bytes. The loop runs
    over the longest of the B tokens, each stream masked to its own token's length.
    """
    token_bytes = token_table.table[tokens]  # [B, L]
    lengths = token_table.lengths[tokens]
    per_stream = stops.transitions.ndim == 3  # static: one automaton per stream
    rows = (jnp.arange(tokens.shape[0]),) if per_stream else ()

    def read_byte(i, carry):
        state, stopped = carry
        following = stops.transitions[(*rows, state, token_bytes[:, i])]
        inside = i < lengths
        completed = jnp.any(stops.completes[(*rows, following)] & stops.active, axis=-1)
        return jnp.where(inside, following, state), stopped | (inside & completed)

    return jax.lax.fori_loop(0, jnp.max(lengths), read_byte, (state, jnp.zeros(tokens.shape, bool)))


# ---------------------------------------------------------------- every condition of a generation

NO_LIMIT = 2**31 - 1  # max_new_tokens of a stream that only an end id or a stop string (or its caller) ends
REASONS = (None, "end_id", "stop_string", "max_new_tokens")  # `StopConditions.check` codes 0..3


@flax.struct.dataclass
class StopConditions:
    """When each of B streams stops, as arrays, so one compiled decode program serves any values.

    end_ids: [E] int32 ids that end every stream (padded with -1, which is no token).
    max_new_tokens: [B] int32 tokens a stream generates at most (`NO_LIMIT`: no limit).
    strings: the streams' stop strings (K = 0: none); token_bytes: the vocabulary's bytes they read.
    """

    end_ids: jax.Array
    max_new_tokens: jax.Array
    strings: StopStrings
    token_bytes: TokenBytes

    def check(self, tokens: jax.Array, generated: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(reason [B] int32, automaton state [B]) for each stream's new token `tokens` [B], its
        `generated`-th (1-based) token: the index in `REASONS` of why it is the stream's last, 0 if not."""
        hit_string = jnp.zeros(tokens.shape, bool)
        if self.strings.completes.shape[1]:  # static: no automaton to run without stop strings
            state, hit_string = read_token(self.strings, self.token_bytes, state, tokens)
        hit_end = jnp.any(tokens[:, None] == self.end_ids[None, :], axis=-1)
        hit_limit = generated >= self.max_new_tokens
        return jnp.where(hit_end, 1, jnp.where(hit_string, 2, jnp.where(hit_limit, 3, 0))).astype(jnp.int32), state


def stop_conditions(
    batch_size: int,
    *,
    end_ids: Sequence[int] = (),
    max_new_tokens: int | None | Sequence[int | None] = None,
    stop: Sequence[str] | Sequence[Sequence[str]] = (),
    tokenizer: Any = None,
    vocab_size: int | None = None,
) -> StopConditions:
    """Stop conditions of `batch_size` streams, checked on the host before anything is traced.

    end_ids: ids that end every stream (`eos_token_ids` of the model); max_new_tokens: one for all or
    one per stream, None for no limit (endless generation), else >= 0; stop: stop strings for all, or
    a list per stream; `tokenizer` and `vocab_size` (the model's) are needed with stop strings.
    """
    limits = [max_new_tokens] * batch_size if max_new_tokens is None or np.ndim(max_new_tokens) == 0 else max_new_tokens
    if len(limits) != batch_size:
        raise ValueError(f"max_new_tokens has {len(limits)} values for {batch_size} streams")
    for stream, limit in enumerate(limits):
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int | np.integer) or limit < 0):
            raise ValueError(f"max_new_tokens of stream {stream} is {limit!r}: give an int >= 0, or None for no limit")
    per_stream = [list(stop)] * batch_size if all(isinstance(s, str) for s in stop) else [list(s) for s in stop]
    if len(per_stream) != batch_size:
        raise ValueError(f"stop strings are given for {len(per_stream)} streams, the batch has {batch_size}")
    strings = stop_strings(per_stream)
    if strings.completes.shape[1] and (tokenizer is None or vocab_size is None):
        raise ValueError("stop strings need the tokenizer and the model's vocab_size, to read generated tokens' bytes")
    table = token_bytes(tokenizer, vocab_size) if strings.completes.shape[1] else pack_token_bytes([b""])
    ids = np.asarray(sorted({int(i) for i in end_ids}) or [-1], np.int32)
    limits_array = np.asarray([NO_LIMIT if limit is None else min(int(limit), NO_LIMIT) for limit in limits], np.int32)
    return StopConditions(jnp.asarray(ids), jnp.asarray(limits_array), strings, table)
