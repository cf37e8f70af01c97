"""flash_attention with lowering="mosaic": Mosaic GPU lowering on CPU and the Mosaic GPU interpreter.

Lowering for CUDA runs the Mosaic GPU compiler's own checks (shared memory, layouts, wgmma operand
shapes) without a GPU. The interpreter simulates warpgroups, barriers and TMA on CPU; it runs the
kernel with P staged through shared memory and P V added to the accumulator afterwards (on the GPU P is
wgmma's register operand and P V accumulates in place: the interpreter supports neither). bfloat16
tolerance: 2e-2 max abs against the float32 reference. Interpreted cases take 10-30 s each, so
all but one are marked slow.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import FlashAttentionBlockSizes, flash_attention
from pallas_kernels.flash_attention import flash_attention_reference

pytest.importorskip("jax.experimental.pallas.mosaic_gpu")
from pallas_kernels import flash_attention_mosaic  # noqa: E402

TOLERANCE = 2e-2
# 2 consumer warpgroups x 64 rows, 64-key tiles (so short test sequences still span several).
SMALL_BLOCKS = FlashAttentionBlockSizes(block_q=128, block_k=64, num_warps=8, num_stages=2)


def shapes(batch, seq_len, num_heads, num_kv_heads, head_dim, dtype=jnp.bfloat16):
    return (jax.ShapeDtypeStruct((batch, seq_len, num_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, seq_len, num_kv_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch, seq_len, num_kv_heads, head_dim), dtype),
            jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32))


def lower_for_cuda(block_sizes=None, lowering="mosaic", **shape):
    fn = lambda *a: flash_attention(*a, impl="pallas", lowering=lowering, block_sizes=block_sizes)  # noqa: E731
    return jax.jit(fn).trace(*shapes(**shape)).lower(lowering_platforms=("cuda",)).as_text()


PRODUCTION_SHAPES = {
    "llama3-8b-2k": dict(batch=1, seq_len=2048, num_heads=32, num_kv_heads=8, head_dim=128),
    "llama3-8b-8k": dict(batch=1, seq_len=8192, num_heads=32, num_kv_heads=8, head_dim=128),
    "llama3-70b-tp8-2k": dict(batch=1, seq_len=2048, num_heads=8, num_kv_heads=1, head_dim=128),
    "smollm2-2k": dict(batch=1, seq_len=2048, num_heads=9, num_kv_heads=3, head_dim=64),
    "smollm2-8k-batch2": dict(batch=2, seq_len=8192, num_heads=9, num_kv_heads=3, head_dim=64),
}


@pytest.mark.parametrize("name", PRODUCTION_SHAPES)
def test_lowers_for_cuda_at_production_shapes(name):
    hlo = lower_for_cuda(**PRODUCTION_SHAPES[name])
    assert "mosaic_gpu" in hlo and "__gpu$xla.gpu.triton" not in hlo


def test_shared_memory_overflow_is_reported_at_lowering():
    # hd 128: Q/O 32 KB + 4 slots x (K 32 KB + V 32 KB) = 288 KB > 227 KB.
    too_many_slots = dataclasses.replace(flash_attention_mosaic.default_block_sizes(128), num_stages=4)
    with pytest.raises(ValueError, match=r"exceeds available shared memory"):
        lower_for_cuda(too_many_slots, **PRODUCTION_SHAPES["llama3-8b-2k"])


def test_environment_variable_selects_mosaic(monkeypatch):
    monkeypatch.setenv("RIDGELINE_PALLAS_LOWERING", "mosaic")
    assert "mosaic_gpu" in lower_for_cuda(lowering=None, **PRODUCTION_SHAPES["smollm2-2k"])
    monkeypatch.setenv("RIDGELINE_PALLAS_LOWERING", "triton")
    assert "__gpu$xla.gpu.triton" in lower_for_cuda(lowering=None, **PRODUCTION_SHAPES["smollm2-2k"])


class TestValidation:
    def call(self, dtype=jnp.bfloat16, head_dim=64, block_sizes=None):
        args = [jnp.zeros(s.shape, s.dtype) for s in shapes(1, 8, 2, 1, head_dim, dtype)]
        return flash_attention(*args, impl="pallas", lowering="mosaic", block_sizes=block_sizes)

    def test_float32_rejected(self):
        with pytest.raises(ValueError, match=r"dtype=float32 must be bfloat16 or float16"):
            self.call(dtype=jnp.float32)

    def test_head_dim(self):
        with pytest.raises(ValueError, match=r"head_dim=32 must be one of \(64, 128\)"):
            self.call(head_dim=32)

    def test_block_sizes(self):
        with pytest.raises(ValueError, match=r"block_q=64 must be 128 \(64 rows per consumer warpgroup\)"):
            self.call(block_sizes=FlashAttentionBlockSizes(block_q=64, block_k=64, num_warps=8))
        with pytest.raises(ValueError, match=r"num_warps=16 must be 4 or 8"):
            self.call(block_sizes=FlashAttentionBlockSizes(block_q=128, block_k=64, num_warps=16))
        with pytest.raises(ValueError, match=r"block_k=32 must be a multiple of 64"):
            self.call(block_sizes=FlashAttentionBlockSizes(block_q=128, block_k=32, num_warps=8))


def check_interpreted(q_lens, kv_lens, *, num_heads, num_kv_heads, head_dim=64, causal=True,
                      dtype=jnp.bfloat16, block_sizes=SMALL_BLOCKS, q_len=None, kv_len=None, seed=0):
    pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    rng = np.random.default_rng(seed)
    batch = len(q_lens)
    q_len, kv_len = q_len or max(q_lens), kv_len or max(kv_lens)
    q = jnp.asarray(rng.standard_normal((batch, q_len, num_heads, head_dim)), dtype)
    k = jnp.asarray(rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)), dtype)
    v = jnp.asarray(rng.standard_normal((batch, kv_len, num_kv_heads, head_dim)), dtype)
    q_lens, kv_lens = jnp.asarray(q_lens, jnp.int32), jnp.asarray(kv_lens, jnp.int32)
    sm_scale = head_dim ** -0.5
    got = flash_attention_mosaic.flash_attention_mosaic(q, k, v, q_lens, kv_lens, causal=causal, sm_scale=sm_scale,
                                                        block_sizes=block_sizes, interpret=True)
    expected = flash_attention_reference(q, k, v, q_lens, kv_lens, causal=causal, sm_scale=sm_scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    error = float(jnp.max(jnp.abs(got.astype(jnp.float32) - expected.astype(jnp.float32))))
    assert error <= TOLERANCE, f"max abs error {error}"
    padding_rows = jnp.arange(q_len)[None, :] >= q_lens[:, None]
    assert bool(jnp.all(jnp.where(padding_rows[:, :, None, None], got, 0) == 0))


def test_interpreted_head_pairs_ragged_chunked_prefill():
    # GQA 2: both consumer warpgroups take one head each over the same 64 tokens. Sequence 0 is a
    # 30-query chunk after a 120-key prefix (unmasked, diagonal and tail key tiles, a ring of 2
    # slots refilled); sequence 1 is a 7-token prefill.
    check_interpreted([30, 7], [150, 7], num_heads=2, num_kv_heads=1)


@pytest.mark.slow
def test_interpreted_odd_group_splits_tokens():
    # GQA 3: the warpgroups take consecutive 64-token blocks of one head; under the causal mask the
    # first needs fewer key tiles than the second and releases the rest of the ring.
    check_interpreted([100], [100], num_heads=3, num_kv_heads=1, block_sizes=dataclasses.replace(
        SMALL_BLOCKS, num_stages=3))


@pytest.mark.slow
def test_interpreted_not_causal_head_dim_128():
    check_interpreted([70, 20], [90, 130], num_heads=2, num_kv_heads=2, head_dim=128, causal=False)


@pytest.mark.slow
def test_interpreted_one_consumer_warpgroup_float16():
    check_interpreted([50], [77], num_heads=4, num_kv_heads=1, dtype=jnp.float16,
                      block_sizes=FlashAttentionBlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=2))
