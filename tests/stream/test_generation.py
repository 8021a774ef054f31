"""Streaming generation (`streamjax.stream.generation`) on a tiny random Llama, and on SmolLM2.

Greedy generation is checked against an independent loop of single `streamjax.step` calls with an
argmax on the host, and against transformers' `generate(do_sample=False)` (with and without a
repetition penalty, for a tiny random model of each family and for SmolLM2); ragged batches against
each stream run alone; the cache a generation leaves against the tokens it was fed; endless
generation by counting compilations.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import streamjax
from streamjax.files import chat_templates
from streamjax.model.jit import CompileClock
from streamjax.model.transformer import jitted_forward
from streamjax.stream import generation, sampling, stopping, token_bytes
from support.family_models import converted, hf_model
from support.models import random_hf_llama, to_streamjax

VOCAB = 97


@functools.cache
def tiny():
    return to_streamjax(random_hf_llama(seed=9, rope_theta=500.0))


def prompt(seed: int, length: int) -> list[int]:
    return np.random.RandomState(seed).randint(0, VOCAB, length).tolist()


def greedy_by_steps(config, params, prompt_ids, num_sinks, window, count):
    """Tokens and cache of greedy decoding with one `streamjax.step` per token, argmax on the host."""
    cache = streamjax.init_cache(config, 1, num_sinks, window)
    for token in prompt_ids:
        logits, cache = streamjax.step(params, cache, np.array([[token]]), config)
    tokens = []
    for _ in range(count):
        tokens.append(int(np.argmax(logits[0, -1])))
        logits, cache = streamjax.step(params, cache, np.array([[tokens[-1]]]), config)
    return tokens, cache


def run(config, params, prompts, num_sinks, window, settings=None, **stops):
    cache = streamjax.init_cache(config, len(prompts), num_sinks, window)
    conditions = stopping.stop_conditions(len(prompts), **stops)
    return generation.generate(params, cache, prompts, config, settings, conditions, chunk_size=8, block_size=16)


BOOKKEEPING = ("slot_positions", "slot_tokens", "length", "cursor", "next_position")


def assert_same_cache(got, expected, row=0):
    for field in BOOKKEEPING:
        np.testing.assert_array_equal(getattr(got, field)[row], getattr(expected, field)[0], err_msg=field)
    for got_layer, expected_layer in zip(got.keys + got.values, expected.keys + expected.values):
        np.testing.assert_allclose(got_layer[row], expected_layer[0], atol=3.6e-7, rtol=0)  # measured 1.2e-7


@pytest.mark.parametrize("num_sinks", [0, 4])
def test_greedy_generation_equals_a_loop_of_steps_with_argmax(num_sinks):
    """60 new tokens through a 12-slot cache: many evictions, the prompt long gone."""
    config, params = tiny()
    ids = prompt(1, 5)
    expected, expected_cache = greedy_by_steps(config, params, ids, num_sinks, 12 - num_sinks, 60)
    result = run(config, params, [ids], num_sinks, 12 - num_sinks, max_new_tokens=60)
    assert result.tokens[0].tolist() == expected and result.reasons == ["max_new_tokens"]
    assert_same_cache(result.cache, expected_cache)


def test_the_cache_holds_exactly_the_prompt_and_every_generated_token():
    config, params = tiny()
    ids = prompt(2, 6)
    result = run(config, params, [ids], 2, 5, max_new_tokens=9)
    stream = ids + result.tokens[0].tolist()  # 15 tokens: sinks 0, 1 and the last 5, 10..14
    cache = result.cache
    assert int(cache.next_position[0]) == 15 and int(cache.length[0]) == 7
    held = dict(zip(np.asarray(cache.slot_positions[0]).tolist(), np.asarray(cache.slot_tokens[0]).tolist()))
    assert held == {position: stream[position] for position in (0, 1, 10, 11, 12, 13, 14)}


def test_a_ragged_batch_gives_each_stream_what_it_gives_alone():
    """Prompts of 3, 11 and 7 tokens; the second stream stops after 4 tokens while the others go on."""
    config, params = tiny()
    prompts, limits = [prompt(3, 3), prompt(4, 11), prompt(5, 7)], [30, 4, 30]
    batch = run(config, params, prompts, 2, 10, max_new_tokens=limits)
    assert [len(tokens) for tokens in batch.tokens] == limits
    for row, (ids, limit) in enumerate(zip(prompts, limits)):
        alone = run(config, params, [ids], 2, 10, max_new_tokens=limit)
        assert batch.tokens[row].tolist() == alone.tokens[0].tolist()
        assert_same_cache(batch.cache, alone.cache, row)


def test_end_ids_and_stop_strings_end_a_stream_on_the_token_that_hits_them():
    config, params = tiny()
    ids = prompt(6, 4)
    free = run(config, params, [ids], 2, 10, max_new_tokens=40).tokens[0].tolist()
    end = free[7]
    by_end = run(config, params, [ids], 2, 10, max_new_tokens=40, end_ids=[end])
    assert by_end.tokens[0].tolist() == free[: free.index(end) + 1] and by_end.reasons == ["end_id"]
    # A byte-per-token vocabulary (`_ByteTokenizer`): a stop string is a sequence of tokens' bytes.
    tokenizer = _ByteTokenizer()
    text = "".join(_ByteTokenizer.text(t) for t in free)
    stop = text[10:13]
    by_string = run(config, params, [ids], 2, 10, max_new_tokens=40, stop=[stop], tokenizer=tokenizer, vocab_size=VOCAB)
    first_end = text.index(stop) + len(stop)
    assert by_string.tokens[0].tolist() == free[:first_end] and by_string.reasons == ["stop_string"]


class _ByteTokenizer:
    """Just enough of a tokenizer for `token_bytes.token_bytes`: id i is one printable ASCII character."""

    @staticmethod
    def text(token: int) -> str:
        return chr(ord("!") + token % 94)

    def __len__(self):
        return VOCAB


@pytest.fixture(autouse=True)
def _byte_tokens(monkeypatch):
    real = token_bytes.token_byte_strings
    monkeypatch.setattr(
        token_bytes,
        "token_byte_strings",
        lambda tokenizer: (
            [_ByteTokenizer.text(i).encode() for i in range(VOCAB)]
            if isinstance(tokenizer, _ByteTokenizer)
            else real(tokenizer)
        ),
    )


def test_sampling_with_a_seed_is_reproducible_and_differs_by_seed():
    config, params = tiny()
    ids = prompt(7, 5)

    def sampled(seed):
        cache = streamjax.init_cache(config, 1, 2, 10)
        settings = sampling.sampling_settings(1, temperature=1.0, top_k=20, top_p=0.9, seed=seed)
        stops = stopping.stop_conditions(1, max_new_tokens=25)
        return generation.generate(params, cache, [ids], config, settings, stops).tokens[0].tolist()

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


def test_endless_generation_compiles_the_decode_program_once():
    config, params = tiny()
    seen = []

    def enough(new):
        seen.append(len(new[0]))
        return sum(seen) < 2000

    cache = streamjax.init_cache(config, 1, 4, 28)
    before = generation._decode_block._cache_size()
    stops = stopping.stop_conditions(1, max_new_tokens=None)
    result = generation.generate(params, cache, [prompt(8, 3)], config, None, stops, block_size=64, on_tokens=enough)
    assert len(result.tokens[0]) >= 2000 and result.reasons == [None]  # stopped by the caller, not by a limit
    assert generation._decode_block._cache_size() - before == 1
    assert int(result.cache.next_position[0]) == 3 + len(result.tokens[0])  # the last sampled token was fed too


def test_prompts_of_every_length_compile_nothing_after_the_first():
    """A chat (or a server) meets prompts of every length: once a prompt of one chunk and one of two have
    compiled the programs, prompts of 20 other lengths trace and compile nothing (before, padding a
    partial chunk compiled a program per length: 636 MiB for 200 lengths)."""
    config, params = tiny()
    for length in (5, 12):  # chunks of 8
        run(config, params, [prompt(1, length)], 2, 14, max_new_tokens=3)
    with CompileClock() as clock:
        for length in [*range(1, 5), *range(6, 12), *range(13, 23)]:
            run(config, params, [prompt(length, length)], 2, 14, max_new_tokens=3)
    assert clock.seconds == 0


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty prompt", "prompt of stream 1 is empty"),
        ("id outside the vocabulary", "outside the vocabulary"),
        ("prompts and cache disagree", "2 prompts for a cache of 3 streams"),
        ("settings and cache disagree", "sampling settings are for 2 streams"),
        ("negative max_new_tokens", "max_new_tokens of stream 0 is -1"),
        ("negative temperature", "temperature"),
        ("top_p outside (0, 1]", "top_p"),
        ("negative top_k", "top_k"),
        ("stop strings without a tokenizer", "need the tokenizer"),
    ],
)
def test_bad_input_is_refused_before_compiling(case, message):
    config, params = tiny()
    prompts, batch = [prompt(9, 3), [], prompt(10, 2)], 3
    before = jitted_forward._cache_size(), generation._decode_block._cache_size()
    with pytest.raises(ValueError, match=message):
        settings, stops = sampling.sampling_settings(batch), stopping.stop_conditions(batch, max_new_tokens=4)
        if case == "id outside the vocabulary":
            prompts[1] = [3, VOCAB]
        elif case != "empty prompt":
            prompts[1] = [3]
        if case == "prompts and cache disagree":
            prompts = prompts[:2]
        elif case == "settings and cache disagree":
            settings = sampling.sampling_settings(2)
        elif case == "negative max_new_tokens":
            stops = stopping.stop_conditions(batch, max_new_tokens=-1)
        elif case == "negative temperature":
            settings = sampling.sampling_settings(batch, temperature=-0.5)
        elif case == "top_p outside (0, 1]":
            settings = sampling.sampling_settings(batch, top_p=1.5)
        elif case == "negative top_k":
            settings = sampling.sampling_settings(batch, top_k=-1)
        elif case == "stop strings without a tokenizer":
            stops = stopping.stop_conditions(batch, stop=["x"])
        generation.generate(params, streamjax.init_cache(config, batch, 2, 6), prompts, config, settings, stops)
    assert (jitted_forward._cache_size(), generation._decode_block._cache_size()) == before


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(config, params, tokenizer) of SmolLM2, loaded by streamjax once for the module's tests."""
    from streamjax.files import loading

    return loading.load_model(str(smollm2_gguf))


@pytest.mark.real_assets
def test_smollm2_greedy_generation_equals_a_loop_of_steps(smollm2):
    config, params, tokenizer = smollm2
    ids = tokenizer("It is a truth universally acknowledged, that").input_ids
    expected, _ = greedy_by_steps(config, params, ids, 4, 28, 40)  # 40 tokens through a 32-slot cache
    result = run(config, params, [ids], 4, 28, max_new_tokens=40)
    assert result.tokens[0].tolist() == expected
    assert jax.tree.leaves(result.cache)[0].shape[-1] == 32


# ---------------------------------------------------------------- against transformers' generate

PENALTIES = (1.0, 1.3)  # repetition_penalty: off, and the value the comparisons use


def transformers_greedy(model, prompt_ids: list[int], num_new: int, repetition_penalty: float, **stop_strings):
    """transformers' `generate(do_sample=False)` of one prompt: (new tokens, gap between the two largest
    processed scores at each step). No end id (`eos_token_id=[]`), as streamjax without `end_ids`, so
    both make `num_new` tokens, or stop earlier at a stop string (`stop_strings=`, `tokenizer=`)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones((1, len(prompt_ids)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=num_new,
            eos_token_id=[],
            pad_token_id=0,
            repetition_penalty=repetition_penalty,
            return_dict_in_generate=True,
            output_scores=True,
            **stop_strings,
        )
    top_two = torch.topk(torch.stack(out.scores)[:, 0], 2).values.numpy()
    return out.sequences[0, len(prompt_ids) :].tolist(), top_two[:, 0] - top_two[:, 1]


def streamjax_greedy(config, params, prompts: list[list[int]], num_new: int, penalties: list[float], **stops):
    """(tokens, reasons) of streamjax's greedy generation of one stream per prompt (stream b with
    `penalties[b]`, `stops` as `stopping.stop_conditions` takes them), in a cache that holds every
    prompt and generated token (4 sinks and a window past the longest stream)."""
    window = max(map(len, prompts)) + num_new
    settings = sampling.sampling_settings(len(prompts), temperature=0.0, repetition_penalty=penalties)
    result = run(config, params, prompts, 4, window, settings, max_new_tokens=num_new, **stops)
    np.testing.assert_array_equal(result.cache.length, result.cache.next_position)  # nothing was evicted
    return [tokens.tolist() for tokens in result.tokens], result.reasons


def assert_same_tokens(got: list[int], expected: list[int], gaps: np.ndarray, label: str) -> None:
    """Token for token; where they part, the message gives transformers' top-2 gap at that step."""
    parted = next((n for n, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    gap = f"{gaps[parted]:.3g}" if parted < len(gaps) else "-"
    assert got == expected, f"{label}: step {parted} differs, transformers' top-2 gap there {gap}"


FAMILY_MODELS = {  # family -> the variant of tests/test_families.py it is compared with (None: conftest's Llama)
    "llama": None,
    "mpt": "mpt_clip_qkv",
    "gpt_neox": "neox_quarter_rotary_parallel",
    "falcon": "falcon_new_arch_gqa_rope",
    "gemma2": "gemma2_mqa_untied_bias_window_8",  # sliding layers over 8 keys: the hybrid cache evicts there
    "gemma3": "gemma3_gqa_untied_rope_per_type_wide_window",  # a RoPE base per layer type
}


@pytest.mark.parametrize("family", sorted(FAMILY_MODELS))
def test_tiny_greedy_generation_equals_transformers_generate(family):
    """48 greedy tokens after a 7-token prompt, with and without a repetition penalty, no eviction.

    No tie decides a token: transformers' top-2 score gaps were at least 1.1e-3 (gpt_neox, penalty 1.3),
    where the logits of the two agree to 7.6e-6 (test_families.py). Gemma 2's sliding layers see 8 keys, so
    its hybrid cache evicts on the way (transformers' own sliding cache does the same); Gemma 3's tiny model
    with a window of 8 repeats two tokens under greedy decoding, so its wider-window variant (a RoPE base per
    layer type) is the one compared."""
    variant = FAMILY_MODELS[family]
    model = random_hf_llama(seed=9, rope_theta=500.0) if variant is None else hf_model(variant)
    config, params = tiny() if variant is None else converted(variant)
    ids, num_new = prompt(11, 7), 48
    got, reasons = streamjax_greedy(config, params, [ids, ids], num_new, list(PENALTIES))
    assert reasons == ["max_new_tokens"] * 2
    for tokens, penalty in zip(got, PENALTIES):
        expected, gaps = transformers_greedy(model, ids, num_new, penalty)
        assert_same_tokens(tokens, expected, gaps, f"{family}, repetition_penalty {penalty}")
        assert len(set(tokens)) >= 8, tokens  # not one token repeated: the comparison has something to compare
    assert got[0] != got[1]  # the penalty changed the generation, so it was compared too


@pytest.fixture
def one_torch_thread():
    """transformers on one torch thread for the test: on a machine whose cores other processes hold, torch's
    two threads wait on each other (SmolLM2 measured 1.22 s per token on two threads, 0.20 s on one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.real_assets
def test_smollm2_greedy_generation_equals_transformers_generate(smollm2, smollm2_gguf, one_torch_thread):
    """48 greedy tokens after a chat-templated question and after Austen's first sentence, with and
    without a repetition penalty: streamjax's torch-free GGUF load against transformers' own. A fifth
    stream, Austen's without a penalty, ends at a stop string as transformers' `stop_strings` ends it.

    The closest call measured: a top-2 gap of 2.2e-3 (Austen, penalty 1.3, step 42), where the logits of
    the two agree to 1.8e-4 (test_gguf.py); the printed gaps say how close each run came."""
    import torch
    import transformers

    from streamjax.stream import templates

    config, params, tokenizer = smollm2
    template = chat_templates.load_chat_template(str(smollm2_gguf))
    question = [{"role": "user", "content": "Why do leaves change colour in autumn?"}]
    texts = [templates.render(template, question), "It is a truth universally acknowledged, that"]
    runs = [(tokenizer(text).input_ids, penalty) for text in texts for penalty in PENALTIES]
    stop = ["human compre"]  # ends inside a token of the Austen continuation (" comprehension")
    stops = dict(stop=[[]] * len(runs) + [stop], tokenizer=tokenizer, vocab_size=config.vocab_size)
    prompts, penalties = [ids for ids, _ in runs] + [runs[2][0]], [penalty for _, penalty in runs] + [1.0]
    got, reasons = streamjax_greedy(config, params, prompts, 48, penalties, **stops)
    assert reasons == ["max_new_tokens"] * len(runs) + ["stop_string"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    for row, (ids, penalty) in enumerate(runs):
        expected, gaps = transformers_greedy(model, ids, 48, penalty)
        assert_same_tokens(got[row], expected, gaps, f"prompt {row // 2}, repetition_penalty {penalty}")
        print(
            f"\nprompt {row // 2}, repetition_penalty {penalty}: smallest top-2 gap {gaps.min():.3g} (step {gaps.argmin()})"
        )
    assert got[0] != got[1] and got[2] != got[3]  # the penalty changed both generations
    expected, gaps = transformers_greedy(model, runs[2][0], 48, 1.0, stop_strings=stop, tokenizer=tokenizer)
    assert_same_tokens(got[4], expected, gaps, f"stop string {stop}")
    assert len(got[4]) < 48 and got[4] == got[2][: len(got[4])]
