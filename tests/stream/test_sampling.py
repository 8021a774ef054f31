"""streamjax.stream.sampling against transformers' logits processors, and the statistics of its draws.

torch and transformers are the reference only; every streamjax function runs jitted, as the decode
loop runs it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from streamjax.stream import sampling

torch = pytest.importorskip("torch", reason="torch is the test-only reference")
logits_process = pytest.importorskip("transformers.generation.logits_process")

B = 8

# Per-stream values of each setting, edge values included; "off" values make generate skip the processor.
SETTINGS = {
    "temperature": [0.0, 0.01, 0.5, 1.0, 1.7, 5.0, 0.3, 100.0],
    "top_k": [0, 1, 2, 5, 11, 12, 13, 1000],
    "top_p": [1.0, 1e-6, 0.1, 0.5, 0.75, 0.9, 0.999, 1e-8],
    "min_p": [0.0, 1.0, 0.01, 0.05, 0.1, 0.5, 0.9, 0.2],
    "repetition_penalty": [1.0, 0.5, 1.2, 2.0, 1.0001, 10.0, 0.9, 1.5],
}
OFF = {"temperature": (0.0, 1.0), "top_k": (0,), "top_p": (1.0,), "min_p": (0.0,), "repetition_penalty": (1.0,)}
HF_PROCESSOR = {
    "temperature": "TemperatureLogitsWarper",
    "top_k": "TopKLogitsWarper",
    "top_p": "TopPLogitsWarper",
    "min_p": "MinPLogitsWarper",
    "repetition_penalty": "RepetitionPenaltyLogitsProcessor",
}


def _continuous_logits(vocab_size: int = 1000, seed: int = 0) -> np.ndarray:
    """[B, V] float32 logits, scale 3, with some -inf entries (already filtered tokens)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((B, vocab_size)) * 3).astype(np.float32)
    logits[rng.random((B, vocab_size)) < 0.02] = -np.inf
    return logits


def _tied_logits() -> np.ndarray:
    """[B, 12] float32 small integers: ties, also at the top-k and top-p boundaries.

    V <= 16, where torch's sort is stable, so transformers' choice among tied tokens is defined.
    """
    rng = np.random.default_rng(1)
    logits = rng.integers(-2, 3, (B, 12)).astype(np.float32)
    # Rows 3 and 4: eight zeros, so probabilities 1/8 whose cumulative sums hit 1 - top_p exactly.
    logits[3:5] = np.where(rng.permutation(12) < 8, 0.0, -np.inf)
    return logits


def _context(vocab_size: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Context ids [B, 40] with repeats (ids drawn from 30 values) and a mask of the valid ones."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(rng.permutation(vocab_size)[:30], (B, 40)).astype(np.int32)
    mask = rng.random((B, 40)) < 0.6
    return ids, mask


def _hf_reference(name: str, value: float, row: np.ndarray, context: np.ndarray) -> np.ndarray:
    """What generate does for one stream: the transformers processor, or nothing for an "off" value."""
    if value in OFF[name]:
        return row
    processor = getattr(logits_process, HF_PROCESSOR[name])(value)
    input_ids = torch.as_tensor(context, dtype=torch.long)[None]
    return processor(input_ids, torch.tensor(row[None])).numpy()[0]


def _ours(name: str, logits: np.ndarray, values: np.ndarray, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    if name == "repetition_penalty":
        return np.asarray(jax.jit(sampling.apply_repetition_penalty)(logits, values, ids, mask))
    function = {
        "temperature": sampling.apply_temperature,
        "top_k": sampling.apply_top_k,
        "top_p": sampling.apply_top_p,
        "min_p": sampling.apply_min_p,
    }[name]
    return np.asarray(jax.jit(function)(logits, values))


@pytest.mark.parametrize("name", list(SETTINGS))
@pytest.mark.parametrize("kind", ["continuous", "tied", "smollm2-sized"])
def test_each_processor_equals_transformers(name, kind):
    logits = {
        "continuous": _continuous_logits,
        "tied": _tied_logits,
        "smollm2-sized": lambda: _continuous_logits(49152),
    }[kind]()
    ids, mask = _context(logits.shape[-1])
    dtype = np.int32 if name == "top_k" else np.float32
    values = np.asarray(SETTINGS[name], dtype)
    ours = _ours(name, logits, values, ids, mask)
    for b in range(B):
        # transformers is given the float32 setting, the value streamjax stores.
        expected = _hf_reference(name, values[b].item(), logits[b], ids[b][mask[b]])
        np.testing.assert_array_equal(ours[b], expected, err_msg=f"{name}={values[b]} (stream {b})")
    if kind != "tied":  # the edge values did filter: a wrong threshold would show
        kept = np.isfinite(ours).sum(-1)
        if name == "top_k":
            np.testing.assert_array_equal(kept[1:4], [1, 2, 5])
        if name in ("top_p", "min_p"):
            assert kept[1] == 1 and (kept[2:] < np.isfinite(logits[2:]).sum(-1)).all()


def test_signed_zeros_are_ties():
    """-0.0 == 0.0 for transformers' comparisons, so the two tie (hand-worked, and checked against it)."""
    inf = np.inf
    logits = np.array([[1.0, -0.0, 0.0, -1.0], [0.0, -0.0, -inf, -inf]], np.float32)
    top_k = np.asarray(jax.jit(sampling.apply_top_k)(logits, np.array([2, 1], np.int32)))
    np.testing.assert_array_equal(top_k, [[1.0, 0.0, 0.0, -inf], [0.0, 0.0, -inf, -inf]])
    # Probabilities 1/2, 1/2: the first in id order reaches 1 - top_p = 0.5 and goes.
    top_p = np.asarray(jax.jit(sampling.apply_top_p)(logits, np.float32([0.3, 0.5])))
    np.testing.assert_array_equal(top_p[1], [-inf, 0.0, -inf, -inf])
    assert np.signbit(top_p[1, 1])  # the kept one is id 1's -0.0
    for b in range(2):
        np.testing.assert_array_equal(top_k[b], _hf_reference("top_k", [2, 1][b], logits[b], np.zeros(0)))
        np.testing.assert_array_equal(top_p[b], _hf_reference("top_p", [0.3, 0.5][b], logits[b], np.zeros(0)))


def test_greedy_temperature_leaves_logits_unchanged():
    logits = _continuous_logits()
    ours = _ours("temperature", logits, np.zeros(B, np.float32), *_context(1000))
    np.testing.assert_array_equal(ours, logits)


def test_repetition_penalty_counts_each_valid_token_once():
    logits = np.array([[-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]], np.float32)
    ids = np.array([[1, 1, 1, 4, 5, 5, 7, -1]], np.int32)  # 7 and -1: outside the vocabulary, ignored
    mask = np.array([[True, True, False, True, False, False, True, True]])  # 5 only at masked entries
    ours = jax.jit(sampling.apply_repetition_penalty)(logits, np.float32([2.0]), ids, mask)
    np.testing.assert_array_equal(np.asarray(ours), [[-2.0, -2.0, 0.0, 1.0, 1.0, 3.0]])


@pytest.fixture(scope="module")
def tiny_hf_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=500, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    return LlamaForCausalLM(config)


def _hf_generate_processors(model, settings: dict):
    """The processor list transformers' generate builds for one stream's settings (greedy if temperature 0)."""
    from transformers import GenerationConfig

    if settings["temperature"] == 0:
        config = GenerationConfig(do_sample=False, repetition_penalty=settings["repetition_penalty"])
    else:
        config = GenerationConfig(do_sample=True, **settings)
    return model._get_logits_processor(config, input_ids_seq_length=1, device="cpu", model_kwargs={})


def test_process_logits_equals_transformers_generate(tiny_hf_model):
    """Per-stream settings in one batch against the processor list generate builds, in its order."""
    logits = _continuous_logits(vocab_size=500, seed=3)
    ids, mask = _context(500)
    columns = dict(
        SETTINGS, temperature=[0.0, 1.0, 1.5, 2.0, 1.7, 5.0, 0.3, 100.0], top_k=[0, 3, 40, 100, 500, 1, 0, 12],
        top_p=[1.0, 0.999, 0.95, 0.9, 0.75, 0.5, 0.999, 0.3], min_p=[0.0, 0.0, 0.01, 0.02, 0.1, 0.5, 0.9, 0.2],
    )  # fmt: skip
    settings = sampling.sampling_settings(B, **columns)
    ours = np.asarray(jax.jit(sampling.process_logits)(logits, settings, ids, mask))
    for b in range(B):
        stream = {name: np.float32(values[b]).item() for name, values in columns.items()}
        stream["top_k"] = columns["top_k"][b]
        processors = _hf_generate_processors(tiny_hf_model, stream)
        input_ids = torch.as_tensor(ids[b][mask[b]], dtype=torch.long)[None]
        expected = processors(input_ids, torch.tensor(logits[b][None])).numpy()[0]
        np.testing.assert_array_equal(ours[b], expected, err_msg=f"stream {b}: {stream}")
        if b == 2:  # every processor active, in generate's order
            assert [type(p).__name__ for p in processors] == [HF_PROCESSOR["repetition_penalty"]] + [
                HF_PROCESSOR[name] for name in ("temperature", "top_k", "top_p", "min_p")
            ]
    kept = np.isfinite(ours).sum(-1)
    assert kept[0] == np.isfinite(logits[0]).sum() and kept[5] == 1  # greedy: nothing filtered; top_k=1
    assert 1 < kept[2] < 40 and 1 < kept[3] < 100 and 1 < kept[4] < 500  # filters cut below top-k


def test_greedy_and_top_k_1_give_the_argmax():
    logits = _continuous_logits(seed=4)
    ids, mask = _context(1000, seed=5)
    ids[:, 0], mask[:, 0] = logits.argmax(-1), True  # penalize each stream's top token
    penalty = np.float32([1.0, 3.0, 0.5, 1.0, 2.0, 1.0, 1.5, 1.0])
    greedy = sampling.sampling_settings(B, temperature=0.0, repetition_penalty=penalty.tolist(), seed=list(range(B)))
    top_1 = greedy.replace(temperature=jnp.full(B, 2.0), top_k=jnp.ones(B, jnp.int32))
    penalized = np.stack(
        [_hf_reference("repetition_penalty", penalty[b].item(), logits[b], ids[b][mask[b]]) for b in range(B)]
    )
    step = jax.jit(sampling.next_tokens)
    for settings in (greedy, top_1):
        for n in (0, 1, 17):
            np.testing.assert_array_equal(np.asarray(step(logits, settings, ids, mask, n)), penalized.argmax(-1))
    assert (penalized.argmax(-1) != logits.argmax(-1)).any()  # the penalty changed some argmax


def _draw(settings, logits, steps: int) -> np.ndarray:
    """[steps, B] tokens drawn at steps 0..steps-1 from fixed logits, no context."""
    empty = np.zeros((logits.shape[0], 1), np.int32)
    step = jax.jit(sampling.next_tokens)
    return np.stack([np.asarray(step(logits, settings, empty, empty.astype(bool), n)) for n in range(steps)])


def test_fixed_seed_reproduces_draws():
    logits = _continuous_logits(vocab_size=50, seed=6)
    settings = sampling.sampling_settings(B, temperature=1.0, seed=[11, 12, 13, 14, 15, 16, 17, 11])
    first, again = _draw(settings, logits, 30), _draw(settings, logits, 30)
    np.testing.assert_array_equal(first, again)
    other = _draw(settings.replace(seed=settings.seed + 100), logits, 30)
    assert (first != other).mean() > 0.5
    keys = jax.jit(sampling.stream_keys)(jnp.asarray([11, 4_000_000_000], jnp.uint32), jnp.asarray([3, 0]))
    expected = [jax.random.fold_in(jax.random.key(11), 3), jax.random.fold_in(jax.random.key(4_000_000_000), 0)]
    np.testing.assert_array_equal(jax.random.key_data(keys), jax.random.key_data(jnp.stack(expected)))


def test_a_streams_draws_do_not_depend_on_the_batch():
    logits = _continuous_logits(vocab_size=200, seed=7)
    settings = sampling.sampling_settings(
        B, temperature=[0.7, 1.0, 1.3, 0.0, 1.0, 2.0, 0.9, 1.0], top_k=[0, 50, 0, 0, 5, 0, 100, 0],
        top_p=[1.0, 0.9, 0.8, 1.0, 1.0, 0.95, 1.0, 0.5], min_p=[0.0, 0.0, 0.02, 0.0, 0.0, 0.0, 0.1, 0.0],
        seed=[5, 6, 7, 8, 9, 10, 11, 12],
    )  # fmt: skip
    together = _draw(settings, logits, 40)
    others = settings.replace(seed=settings.seed + 1000, temperature=jnp.full(B, 3.0), top_k=jnp.zeros(B, jnp.int32))
    for b in (1, 2, 6):
        alone = _draw(jax.tree.map(lambda x: x[b : b + 1], settings), logits[b : b + 1], 40)
        np.testing.assert_array_equal(together[:, b], alone[:, 0])
        mixed_logits = np.roll(logits, 1, axis=0)
        mixed_logits[b] = logits[b]
        mixed = _draw(jax.tree.map(lambda new, old: new.at[b].set(old[b]), others, settings), mixed_logits, 40)
        np.testing.assert_array_equal(together[:, b], mixed[:, b])
        assert (mixed[:, b - 1] != together[:, b - 1]).any()  # its neighbour did change
    assert len(np.unique(together[:, 2])) > 5  # stream 2 really samples


def test_one_program_for_any_settings_inside_a_loop():
    """next_tokens in a fori_loop, the context the tokens drawn so far: equal to step-by-step draws,
    and new setting values run the same compiled program."""
    logits = _continuous_logits(vocab_size=300, seed=9)
    steps = 12

    @jax.jit
    def generate(settings):
        def step(n, tokens):
            context, valid = tokens.T, jnp.broadcast_to(jnp.arange(steps) < n, (B, steps))
            return tokens.at[n].set(sampling.next_tokens(logits, settings, context, valid, n))

        return jax.lax.fori_loop(0, steps, step, jnp.zeros((steps, B), jnp.int32))

    first = sampling.sampling_settings(B, temperature=1.5, top_k=[0, 5] * 4, repetition_penalty=1.3, seed=3)
    second = sampling.sampling_settings(B, temperature=[0.0, 0.5] * 4, top_p=0.8, repetition_penalty=5.0, seed=4)
    for settings in (first, second):
        tokens = np.zeros((steps, B), np.int32)
        for n in range(steps):
            valid = np.broadcast_to(np.arange(steps) < n, (B, steps))
            tokens[n] = jax.jit(sampling.next_tokens)(logits, settings, tokens.T, valid, n)
        np.testing.assert_array_equal(generate(settings), tokens)
    assert generate._cache_size() == 1
    assert len(np.unique(tokens[:, 0])) == steps  # the penalised context made greedy stream 0 move on


def _renormalised(logits: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    """Exact (float64) probabilities after temperature, top-k, top-p and min-p, from their definitions."""
    probs = np.exp(logits / temperature - np.max(logits / temperature))
    probs /= probs.sum()
    keep = probs >= np.sort(probs)[-top_k]
    ascending = np.argsort(probs)  # no ties in these logits
    cut = np.cumsum(np.where(keep, probs, 0)[ascending] / probs[keep].sum()) <= 1 - top_p
    cut[-1] = False
    keep[ascending[cut]] = False
    keep &= probs >= min_p * probs.max()  # min-p compares ratios, which renormalising keeps
    kept = np.where(keep, probs, 0)
    return kept / kept.sum()


def test_draws_follow_the_renormalised_distribution():
    """20,000 draws (fixed seed): every token within 5 standard errors of its exact probability."""
    logits = np.random.default_rng(8).standard_normal(40).astype(np.float32) * 2
    setting = {"temperature": 0.8, "top_k": 25, "top_p": 0.9, "min_p": 0.02}
    expected = _renormalised(logits.astype(np.float64), **setting)
    num_kept = (expected > 0).sum()
    assert 6 < num_kept < 25  # top-p and min-p both cut below top-k's 25
    n = 20_000
    settings = sampling.sampling_settings(1, **setting, seed=2024)
    processed = jax.jit(sampling.process_logits)(
        logits[None], settings, np.zeros((1, 1), np.int32), np.zeros((1, 1), bool)
    )
    np.testing.assert_array_equal(np.isfinite(np.asarray(processed[0])), expected > 0)
    keys = sampling.stream_keys(jnp.full(n, 2024, jnp.uint32), jnp.arange(n))
    draws = np.asarray(jax.jit(sampling.sample)(jnp.broadcast_to(processed, (n, 40)), jnp.ones(n), keys))
    frequencies = np.bincount(draws, minlength=40) / n
    assert frequencies[expected == 0].sum() == 0  # filtered tokens never drawn
    bound = 5 * np.sqrt(expected * (1 - expected) / n) + 1 / n
    np.testing.assert_array_less(np.abs(frequencies - expected), bound)


COMPILE_EVENTS: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *args, **kwargs: COMPILE_EVENTS.append(name) if "compile" in name else None
)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"temperature": -0.5}, r"temperature is -0.5; it must be a finite number >= 0"),
        ({"temperature": float("nan")}, r"temperature is nan"),
        ({"top_p": 0.0}, r"top_p is 0.0; it must be a number in \(0, 1\]"),
        ({"top_p": [1.0, 1.2, 0.5]}, r"top_p of stream 1 is 1.2"),
        ({"top_k": -1}, r"top_k is -1; it must be an integer >= 0"),
        ({"top_k": 2.5}, r"top_k is 2.5"),
        ({"min_p": 1.5}, r"min_p is 1.5; it must be a number in \[0, 1\]"),
        ({"min_p": [0.1, -0.1, 0.0]}, r"min_p of stream 1 is -0.1"),
        ({"repetition_penalty": 0.0}, r"repetition_penalty is 0.0; it must be a finite number > 0"),
        ({"repetition_penalty": [1.0, 1.1]}, r"repetition_penalty has 2 values for 3 streams"),
        ({"seed": 2**32}, r"seed is 4294967296"),
    ],
)
def test_bad_settings_raise_in_the_constructor_before_any_compilation(bad, message):
    COMPILE_EVENTS.clear()
    with pytest.raises(ValueError, match=message):
        sampling.sampling_settings(3, **bad)
    assert COMPILE_EVENTS == []


def test_mismatched_shapes_raise_while_tracing():
    settings = sampling.sampling_settings(2)
    with pytest.raises(ValueError, match=r"settings.temperature has shape \(2,\), logits have B=3"):
        jax.jit(sampling.process_logits)(
            np.zeros((3, 10), np.float32), settings, np.zeros((3, 1), np.int32), np.ones((3, 1), bool)
        )
    with pytest.raises(ValueError, match=r"context \(2, 4\) and context_mask \(2, 5\)"):
        sampling.process_logits(
            np.zeros((2, 10), np.float32), settings, np.zeros((2, 4), np.int32), np.ones((2, 5), bool)
        )
