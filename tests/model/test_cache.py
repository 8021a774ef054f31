"""Cache bookkeeping against small hand-written expectations."""

import jax.numpy as jnp
import numpy as np
import pytest

from streamjax.model import cache as cache_lib
from streamjax.model.config import ModelConfig

TINY = ModelConfig(
    family="llama", vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4,
    intermediate_size=8, norm_eps=1e-6, tie_embeddings=True, max_position_embeddings=64,
)  # fmt: skip


def fake_advance(cache, num_new):
    """Advance the bookkeeping of `cache` by `num_new` tokens (keys and values untouched)."""
    plan = plan_chunk(cache, num_new)
    batch, kv_heads, _, head_dim = cache.values[0].shape
    new = [jnp.zeros((batch, kv_heads, num_new, head_dim))] * len(cache.keys)
    return cache_lib.write_chunk(cache, plan, jnp.zeros((batch, num_new), jnp.int32), new, new), plan


def plan_chunk(cache, num_new):
    return cache_lib.plan_chunk(cache, cache.batch_size, num_new, TINY)


def test_one_token_at_a_time_fills_sinks_then_wraps_the_ring():
    cache = cache_lib.init_cache(TINY, 1, num_sinks=2, window=3)
    expected = [  # (slot_positions, length, cursor) after each token
        ([0, 0, 0, 0, 0], 1, 0),
        ([0, 1, 0, 0, 0], 2, 0),
        ([0, 1, 2, 0, 0], 3, 1),
        ([0, 1, 2, 3, 0], 4, 2),
        ([0, 1, 2, 3, 4], 5, 0),
        ([0, 1, 5, 3, 4], 5, 1),
        ([0, 1, 5, 6, 4], 5, 2),
    ]
    for slots, length, cursor in expected:
        cache, _ = fake_advance(cache, 1)
        np.testing.assert_array_equal(cache.slot_positions[0], slots)
        assert int(cache.length[0]) == length and int(cache.cursor[0]) == cursor


def test_a_chunk_longer_than_the_window_keeps_sinks_and_the_last_window():
    cache = cache_lib.init_cache(TINY, 1, num_sinks=2, window=3)
    cache, plan = fake_advance(cache, 7)
    np.testing.assert_array_equal(plan.destinations[0], [0, 1, 5, 5, 4, 2, 3])  # 5 = capacity: dropped
    np.testing.assert_array_equal(cache.slot_positions[0], [0, 1, 5, 6, 4])
    assert int(cache.length[0]) == 5 and int(cache.cursor[0]) == 2 and int(cache.next_position[0]) == 7


def test_positions_and_masks_once_the_cache_is_full():
    cache = cache_lib.init_cache(TINY, 1, num_sinks=1, window=2)
    cache, _ = fake_advance(cache, 4)  # sink 0; ring holds tokens 3 (slot 1) and 2 (slot 2)
    np.testing.assert_array_equal(cache.slot_positions[0], [0, 3, 2])

    plan = plan_chunk(cache, 3)  # tokens 4, 5, 6
    np.testing.assert_array_equal(plan.sink_query_positions[0], [3, 3, 3])  # query at S + W
    np.testing.assert_array_equal(plan.sink_mask[0], [[True]] * 3)
    np.testing.assert_array_equal(plan.window_query_positions[0], [0, 1, 2])
    # Every cache slot (the sink slot at offset -4, never in the window block), then the new tokens.
    np.testing.assert_array_equal(plan.window_key_positions[0], [-4, -1, -2, 0, 1, 2])
    expected_mask = [[0, 1, 1, 1, 0, 0], [0, 1, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]  # itself and 2 before it
    np.testing.assert_array_equal(plan.window_mask[0], np.array(expected_mask, bool))
    np.testing.assert_array_equal(plan.destinations[0], [3, 1, 2])


def test_filling_phase_positions_are_stream_indices():
    cache = cache_lib.init_cache(TINY, 1, num_sinks=2, window=4)
    plan = plan_chunk(cache, 4)
    np.testing.assert_array_equal(plan.sink_query_positions[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(plan.sink_mask[0], [[1, 0], [1, 1], [1, 1], [1, 1]])
    np.testing.assert_array_equal(plan.sink_sources[0], [0, 1])
    # New tokens 0 and 1 are sinks, so the window block only offers tokens 2 and 3 (and no ring yet).
    np.testing.assert_array_equal(plan.window_mask[0, :, 6:], [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    assert not np.asarray(plan.window_mask[0, :, :6]).any()


def test_stream_counter_wraps_without_changing_offsets():
    cache = cache_lib.init_cache(TINY, 1, num_sinks=1, window=2, first_position=2**31 - 2)
    cache, _ = fake_advance(cache, 5)
    assert int(cache.next_position[0]) == -(2**31) + 3  # wrapped int32
    plan = plan_chunk(cache, 1)
    np.testing.assert_array_equal(plan.window_key_positions[0], [-5, -2, -1, 0])  # sink 0, ring tokens 3, 4


@pytest.mark.parametrize("num_sinks, window", [(-1, 4), (2, 0), (0, -3)])
def test_bad_cache_shapes_are_refused(num_sinks, window):
    with pytest.raises(ValueError, match="num_sinks|window"):
        cache_lib.init_cache(TINY, 1, num_sinks=num_sinks, window=window)


def test_cache_shape_and_dtype():
    cache = cache_lib.init_cache(TINY, 3, num_sinks=4, window=12, dtype=jnp.bfloat16)
    assert len(cache.keys) == len(cache.values) == 1
    assert cache.keys[0].shape == (3, 1, 4, 16) and cache.values[0].shape == (3, 1, 16, 4)
    assert cache.keys[0].dtype == cache.values[0].dtype == jnp.bfloat16
    assert cache.capacity == 16 and cache.batch_size == 3
