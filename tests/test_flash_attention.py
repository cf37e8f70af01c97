"""flash_attention: xla and pallas_interpret paths against the float32 reference.

Tolerances: float32 within 1e-4 max abs, bfloat16 within 2e-2 max abs.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import FlashAttentionBlockSizes, flash_attention
from pallas_kernels.flash_attention import flash_attention_reference

TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
IMPLS = ("xla", "pallas_interpret")
SMALL_BLOCKS = FlashAttentionBlockSizes(block_q=16, block_k=16)


def make_inputs(q_lens, kv_lens, *, q_len=None, kv_len=None, num_kv_heads=2, group=2, head_dim=16,
                dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    batch = len(q_lens)
    q_len = q_len or max(q_lens)
    kv_len = kv_len or max(kv_lens)
    q = rng.standard_normal((batch, q_len, num_kv_heads * group, head_dim))
    k = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim))
    v = rng.standard_normal((batch, kv_len, num_kv_heads, head_dim))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(q_lens, jnp.int32), jnp.asarray(kv_lens, jnp.int32))


def numpy_attention(q, k, v, q_lens, kv_lens, causal):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    batch, q_len, num_heads, head_dim = q.shape
    group = num_heads // k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for i in range(int(q_lens[b])):
            visible = int(kv_lens[b]) - int(q_lens[b]) + i + 1 if causal else int(kv_lens[b])
            for h in range(num_heads):
                scores = k[b, :visible, h // group] @ q[b, i, h] / math.sqrt(head_dim)
                weights = np.exp(scores - scores.max())
                out[b, i, h] = weights @ v[b, :visible, h // group] / weights.sum()
    return out


def check_against_reference(inputs, impl, *, causal=True, dtype=jnp.float32, block_sizes=SMALL_BLOCKS):
    expected = flash_attention(*inputs, causal=causal, impl="reference")
    got = flash_attention(*inputs, causal=causal, impl=impl, block_sizes=block_sizes)
    assert got.shape == inputs[0].shape and got.dtype == inputs[0].dtype
    error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32))))
    assert error <= TOLERANCE[dtype], f"{impl}: max abs error {error}"
    # Padding rows are exactly zero.
    rows = jnp.arange(inputs[0].shape[1])[None, :] >= inputs[3][:, None]
    assert bool(jnp.all(jnp.where(rows[:, :, None, None], got, 0) == 0))


@pytest.mark.parametrize("causal", [True, False])
def test_reference_matches_numpy_loop(causal):
    inputs = make_inputs([5, 3], [5, 9], group=3)
    got = flash_attention_reference(*inputs, causal=causal, sm_scale=1 / math.sqrt(16))
    np.testing.assert_allclose(np.asarray(got), numpy_attention(*inputs, causal), atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [1, 3, 127])
def test_odd_lengths_prefill(impl, length):
    inputs = make_inputs([length, max(1, length // 2)], [length, max(1, length // 2)])
    check_against_reference(inputs, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_prefill_queries_continue_a_prefix(impl):
    # q_len < kv_len: queries sit at the end of their sequence; padding in both axes.
    inputs = make_inputs([4, 17, 1], [20, 17, 33], q_len=19, kv_len=40)
    check_against_reference(inputs, impl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group", [1, 3, 4, 6, 8])
def test_gqa_ratios(impl, group):
    # 4 and 8 put a whole group in one program (rows = tokens x heads); 6 splits it into 3 programs
    # of 2 heads; 3 gives one head per program.
    inputs = make_inputs([9, 5], [9, 12], num_kv_heads=1 if group == 8 else 2, group=group)
    check_against_reference(inputs, impl)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ragged_batch_unmasked_and_masked_key_blocks(causal, dtype):
    # Small tiles so a query block meets full (unmasked) key blocks, the diagonal block and a
    # kv_len tail block; chunked prefixes of different lengths per sequence; GQA 4 shares programs.
    inputs = make_inputs([37, 5, 50, 1], [90, 5, 61, 77], q_len=53, kv_len=93, num_kv_heads=2, group=4,
                         head_dim=32, dtype=dtype, seed=3)
    check_against_reference(inputs, "pallas_interpret", causal=causal, dtype=dtype,
                            block_sizes=FlashAttentionBlockSizes(block_q=32, block_k=16))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_bfloat16_hopper_default_blocks(head_dim):
    # The sm_90 tiles (128 rows = 32 tokens x 4 heads; 64 or 128 keys) over several key blocks.
    inputs = make_inputs([150, 61], [200, 61], num_kv_heads=1, group=4, head_dim=head_dim, dtype=jnp.bfloat16)
    check_against_reference(inputs, "pallas_interpret", dtype=jnp.bfloat16, block_sizes=None)


def test_more_queries_than_keys():
    # Queries at negative positions (q_len > kv_len) see no key when causal and come out as zeros.
    inputs = make_inputs([9], [4], group=2)
    check_against_reference(inputs, "pallas_interpret")


@pytest.mark.parametrize("impl", IMPLS)
def test_not_causal(impl):
    inputs = make_inputs([6, 2], [11, 30])
    check_against_reference(inputs, impl, causal=False)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16(impl):
    inputs = make_inputs([21, 8], [21, 30], dtype=jnp.bfloat16, head_dim=64)
    check_against_reference(inputs, impl, dtype=jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_head_dim_64_and_default_blocks(impl):
    inputs = make_inputs([70, 33], [70, 80], head_dim=64, group=2, num_kv_heads=1)
    check_against_reference(inputs, impl, block_sizes=FlashAttentionBlockSizes())


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_sequence_gives_zeros(impl):
    inputs = make_inputs([0, 3], [0, 3])
    got = flash_attention(*inputs, impl=impl, block_sizes=SMALL_BLOCKS)
    assert bool(jnp.all(got[0] == 0)) and bool(jnp.all(jnp.isfinite(got)))


def test_length_513_xla():
    inputs = make_inputs([513, 200], [513, 700], group=3, head_dim=32)
    check_against_reference(inputs, "xla")


@pytest.mark.slow
def test_length_513_interpret():
    inputs = make_inputs([513], [513], group=1, num_kv_heads=1, head_dim=16)
    check_against_reference(inputs, "pallas_interpret", block_sizes=FlashAttentionBlockSizes(64, 64))


def test_xla_path_never_builds_the_full_score_matrix():
    shapes = (jax.ShapeDtypeStruct((1, 4096, 8, 64), jnp.float32),
              jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.float32),
              jax.ShapeDtypeStruct((1, 4096, 2, 64), jnp.float32),
              jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((1,), jnp.int32))
    compiled = jax.jit(lambda *a: flash_attention(*a, impl="xla")).lower(*shapes).compile()
    full_scores = 8 * 4096 * 4096 * 4
    assert compiled.memory_analysis().temp_size_in_bytes < full_scores / 8


def test_auto_resolves_to_xla_on_cpu():
    inputs = make_inputs([3], [3])
    np.testing.assert_array_equal(np.asarray(flash_attention(*inputs)),
                                  np.asarray(flash_attention(*inputs, impl="xla")))


class TestValidation:
    inputs = make_inputs([3, 2], [3, 4], group=3)

    def call(self, *replacements, **kwargs):
        args = list(self.inputs)
        for index, value in replacements:
            args[index] = value
        return flash_attention(*args, **kwargs)

    def test_heads_not_multiple_of_kv_heads(self):
        with pytest.raises(ValueError, match=r"num_heads=5 must be a multiple of num_kv_heads=2"):
            self.call((0, jnp.zeros((2, 3, 5, 16))))

    def test_q_rank(self):
        with pytest.raises(ValueError, match=r"q.shape=\(3, 6, 16\)"):
            self.call((0, jnp.zeros((3, 6, 16))))

    def test_batch_mismatch(self):
        with pytest.raises(ValueError, match=r"k.shape=\(1, 4, 2, 16\) does not match q.shape"):
            self.call((1, jnp.zeros((1, 4, 2, 16))), (2, jnp.zeros((1, 4, 2, 16))))

    def test_v_shape(self):
        with pytest.raises(ValueError, match=r"v.shape=\(2, 3, 2, 16\) must equal k.shape=\(2, 4, 2, 16\)"):
            self.call((2, jnp.zeros((2, 3, 2, 16))))

    def test_lengths_shape_and_dtype(self):
        with pytest.raises(ValueError, match=r"q_lens.shape=\(3,\) must be \(2,\)"):
            self.call((3, jnp.zeros((3,), jnp.int32)))
        with pytest.raises(ValueError, match=r"kv_lens.dtype=float32 must be int32"):
            self.call((4, jnp.zeros((2,), jnp.float32)))

    def test_integer_inputs_rejected(self):
        with pytest.raises(ValueError, match=r"q.dtype=int32"):
            self.call((0, self.inputs[0].astype(jnp.int32)))

    def test_block_sizes_validated(self):
        with pytest.raises(ValueError, match=r"block_q=48 must be a power of two"):
            FlashAttentionBlockSizes(block_q=48)
        with pytest.raises(ValueError, match=r"block_k=0 must be a power of two"):
            FlashAttentionBlockSizes(block_k=0)
        with pytest.raises(ValueError, match=r"block_q=8 must be >= 16"):
            FlashAttentionBlockSizes(block_q=8)
        with pytest.raises(ValueError, match=r"num_stages=0 must be >= 1"):
            FlashAttentionBlockSizes(num_stages=0)


def lower_for_cuda(fn, *args) -> str:
    """StableHLO of fn lowered for a CUDA GPU: runs the Pallas -> Triton lowering without a GPU."""
    from pallas_kernels.backend import abstract_cuda_device

    try:
        with abstract_cuda_device():  # JAX >= 0.11 needs a target GPU to lower for
            return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    except ImportError as error:  # a jaxlib without the Triton dialect bindings
        pytest.skip(f"cannot lower for CUDA here: {error}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_kernel_lowers_to_triton(dtype):
    inputs = make_inputs([70, 33], [70, 80], head_dim=64, group=4, num_kv_heads=2, dtype=dtype)
    hlo = lower_for_cuda(lambda *a: flash_attention(*a, impl="pallas", lowering="triton"), *inputs)
    assert "__gpu$xla.gpu.triton" in hlo


class TestBackend:
    def test_resolve_impl(self):
        from pallas_kernels import resolve_impl
        assert resolve_impl("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
        assert resolve_impl("pallas_interpret") == "pallas_interpret"
        with pytest.raises(ValueError, match=r"impl='triton' is not one of"):
            resolve_impl("triton")

    def test_lowering_from_argument_then_env_then_default(self, monkeypatch):
        from pallas_kernels import resolve_lowering
        monkeypatch.delenv("RIDGELINE_PALLAS_LOWERING", raising=False)
        assert resolve_lowering() == "triton"
        monkeypatch.setenv("RIDGELINE_PALLAS_LOWERING", "mosaic")
        assert resolve_lowering() == "mosaic"
        assert resolve_lowering("triton") == "triton"
        monkeypatch.setenv("RIDGELINE_PALLAS_LOWERING", "cuda")
        with pytest.raises(ValueError, match=r"lowering='cuda' is not one of"):
            resolve_lowering()

    def test_compiler_params_pick_the_lowering(self):
        from jax.experimental.pallas import mosaic_gpu, triton

        from pallas_kernels.backend import gpu_compiler_params
        assert isinstance(gpu_compiler_params("triton", num_warps=4, num_stages=2), triton.CompilerParams)
        assert isinstance(gpu_compiler_params("mosaic", num_stages=2), mosaic_gpu.CompilerParams)

    def test_lowering_a_kernel_does_not_implement(self):
        from pallas_kernels.backend import kernel_lowering
        with pytest.raises(NotImplementedError, match=r"update_kv_cache has no 'mosaic' Pallas kernel"):
            kernel_lowering("pallas", "mosaic", "update_kv_cache")
        assert kernel_lowering("pallas", "mosaic", "flash_attention", implemented=("triton", "mosaic")) == "mosaic"

    def test_lowering_ignored_off_gpu_paths(self, monkeypatch):
        monkeypatch.setenv("RIDGELINE_PALLAS_LOWERING", "mosaic")
        flash_attention(*make_inputs([3], [3]), impl="xla")  # no error: xla never lowers Pallas
