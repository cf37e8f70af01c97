"""update_kv_cache: xla and pallas_interpret paths against the reference; drops and in-place updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import KVCacheUpdateBlockSizes, update_kv_cache

IMPLS = ("xla", "pallas_interpret")


def make_inputs(num_tokens, *, num_kv_heads=2, num_pages=6, page_size=8, head_dim=16, dropped=(),
                dtype=jnp.float32, new_dtype=None, seed=0):
    rng = np.random.default_rng(seed)
    k_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    v_pages = rng.standard_normal((num_kv_heads, num_pages, page_size, head_dim))
    k_new = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
    v_new = rng.standard_normal((num_tokens, num_kv_heads, head_dim))
    slots = rng.permutation(num_pages * page_size)[:num_tokens].astype(np.int32)
    slots[list(dropped)] = -1
    new_dtype = new_dtype or dtype
    return (jnp.asarray(k_pages, dtype), jnp.asarray(v_pages, dtype), jnp.asarray(k_new, new_dtype),
            jnp.asarray(v_new, new_dtype), jnp.asarray(slots))


def numpy_update(k_pages, v_pages, k_new, v_new, slots):
    k_pages, v_pages = np.array(k_pages), np.array(v_pages)
    page_size = k_pages.shape[2]
    for t, slot in enumerate(np.asarray(slots)):
        if slot >= 0:
            k_pages[:, slot // page_size, slot % page_size] = np.asarray(k_new[t], k_pages.dtype)
            v_pages[:, slot // page_size, slot % page_size] = np.asarray(v_new[t], v_pages.dtype)
    return k_pages, v_pages


def test_reference_matches_numpy_loop():
    inputs = make_inputs(11, dropped=(2, 7))
    k, v = update_kv_cache(*inputs, impl="reference")
    expected_k, expected_v = numpy_update(*inputs)
    np.testing.assert_array_equal(np.asarray(k), expected_k)
    np.testing.assert_array_equal(np.asarray(v), expected_v)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("page_size", [8, 16, 64])
def test_matches_reference_with_dropped_slots(impl, page_size):
    inputs = make_inputs(13, page_size=page_size, num_pages=3, dropped=(0, 5, 12))
    expected = update_kv_cache(*inputs, impl="reference")
    got = update_kv_cache(*inputs, impl=impl, block_sizes=KVCacheUpdateBlockSizes(tokens_per_program=4))
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_padding_changes_nothing(impl):
    inputs = make_inputs(5, dropped=range(5))
    k, v = update_kv_cache(*inputs, impl=impl)
    np.testing.assert_array_equal(np.asarray(k), np.asarray(inputs[0]))
    np.testing.assert_array_equal(np.asarray(v), np.asarray(inputs[1]))


@pytest.mark.parametrize("impl", IMPLS)
def test_fills_a_whole_page_and_casts_rows_to_cache_dtype(impl):
    inputs = make_inputs(8, page_size=8, dtype=jnp.bfloat16, new_dtype=jnp.float32)
    slots = jnp.arange(8, dtype=jnp.int32) + 2 * 8  # page 2, offsets 0..7
    k, v = update_kv_cache(*inputs[:4], slots, impl=impl)
    assert k.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(k[:, 2]),
                                  np.asarray(jnp.transpose(inputs[2], (1, 0, 2)).astype(jnp.bfloat16)))
    np.testing.assert_array_equal(np.asarray(v[:, 3]), np.asarray(inputs[1][:, 3]))


@pytest.mark.parametrize("impl", IMPLS)
def test_donated_update_is_in_place(impl):
    k_pages, v_pages, k_new, v_new, slots = make_inputs(4, dropped=(1,))
    expected_k, _ = numpy_update(k_pages, v_pages, k_new, v_new, slots)
    k_pointer, v_pointer = k_pages.unsafe_buffer_pointer(), v_pages.unsafe_buffer_pointer()
    k, v = update_kv_cache(k_pages, v_pages, k_new, v_new, slots, impl=impl, donate=True)
    assert k_pages.is_deleted() and v_pages.is_deleted()
    assert k.unsafe_buffer_pointer() == k_pointer and v.unsafe_buffer_pointer() == v_pointer
    np.testing.assert_array_equal(np.asarray(k), expected_k)


@pytest.mark.parametrize("impl", IMPLS)
def test_in_place_inside_a_donating_jit(impl):
    inputs = make_inputs(4)
    step = jax.jit(lambda cache, *rest: update_kv_cache(*cache, *rest, impl=impl), donate_argnums=0)
    cache = (inputs[0], inputs[1])
    pointer = cache[0].unsafe_buffer_pointer()
    new_cache = step(cache, *inputs[2:])
    assert new_cache[0].unsafe_buffer_pointer() == pointer


def test_not_donated_by_default():
    inputs = make_inputs(3)
    update_kv_cache(*inputs, impl="xla")
    assert not inputs[0].is_deleted()


class TestValidation:
    inputs = make_inputs(4)

    def call(self, *replacements, **kwargs):
        args = list(self.inputs)
        for index, value in replacements:
            args[index] = value
        return update_kv_cache(*args, **kwargs)

    def test_pages_rank(self):
        with pytest.raises(ValueError, match=r"k_pages.shape=\(2, 48, 16\)"):
            self.call((0, jnp.zeros((2, 48, 16))))

    def test_new_rows_shape(self):
        with pytest.raises(ValueError, match=r"k_new.shape=\(4, 3, 16\) must be \[num_tokens, 2, 16\]"):
            self.call((2, jnp.zeros((4, 3, 16))))

    def test_v_new_shape(self):
        with pytest.raises(ValueError, match=r"v_new.shape=\(5, 2, 16\) must equal k_new.shape=\(4, 2, 16\)"):
            self.call((3, jnp.zeros((5, 2, 16))))

    def test_slot_mapping(self):
        with pytest.raises(ValueError, match=r"slot_mapping.shape=\(3,\) must be \(4,\)"):
            self.call((4, jnp.zeros((3,), jnp.int32)))
        with pytest.raises(ValueError, match=r"slot_mapping.dtype=float32 must be int32"):
            self.call((4, jnp.zeros((4,), jnp.float32)))

    def test_block_sizes(self):
        with pytest.raises(ValueError, match=r"tokens_per_program=0 must be >= 1"):
            KVCacheUpdateBlockSizes(tokens_per_program=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernel_lowers_to_triton_with_aliasing(dtype):
    """The Pallas -> Triton lowering runs without a GPU; the page buffers alias the outputs."""
    inputs = make_inputs(13, head_dim=64, dtype=dtype)
    fn = lambda *a: update_kv_cache(*a, impl="pallas", lowering="triton")  # noqa: E731
    from pallas_kernels.backend import abstract_cuda_device

    try:
        with abstract_cuda_device():  # JAX >= 0.11 needs a target GPU to lower for
            lowered = jax.jit(fn, donate_argnums=(0, 1)).trace(*inputs).lower(lowering_platforms=("cuda",))
    except ImportError as error:
        pytest.skip(f"cannot lower for CUDA here: {error}")
    hlo = lowered.as_text()
    assert "__gpu$xla.gpu.triton" in hlo
    assert "output_operand_aliases" in hlo
