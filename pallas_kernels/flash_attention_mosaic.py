"""Flash attention for prefill on Hopper, written with Mosaic GPU (``lowering="mosaic"``).

Same contract as ``flash_attention.flash_attention`` (padded dense batches, per-sequence
``q_lens`` / ``kv_lens``, query i of sequence b at absolute position ``kv_lens[b] - q_lens[b] + i``,
causal or not, GQA, rows past ``q_lens[b]`` zero), for bf16 / f16 and head_dim 64 or 128. The
reference is ``flash_attention.flash_attention_reference``.

Structure (warp specialised, one CTA per (head slot, query tile, sequence)):

- ``compute_wgs`` (1 or 2) consumer warpgroups each own 64 score rows: one query head x 64
  tokens. When the GQA group is even, the two warpgroups take two query heads of one group over
  the same 64 tokens, so each K/V tile is read once for both heads and both run the same number of
  key steps; otherwise they take consecutive 64-token blocks of one head.
- One producer warpgroup streams K and V tiles of ``block_kv`` keys with TMA into a ring of
  ``num_stages`` shared-memory slots. Each slot has a "loaded" barrier (TMA completion) and a
  "consumed" barrier (one arrival per consumer warpgroup) so a slot is refilled only after every
  consumer finished reading it.
- Consumers run ``Q K^T`` and ``P V`` on wgmma with an online softmax in base 2. Key blocks every
  row sees in full skip the mask; the diagonal and kv_len-tail blocks are masked; blocks past the
  last visible key are not loaded. A consumer that needs fewer steps than its CTA (the earlier
  token block under the causal mask) still waits and releases the remaining slots in order, so the
  ring's barrier phases stay in step.
- K is handed over transposed ([batch, kv_heads, head_dim, kv_len], one XLA pass over K) so Q K^T
  is a plain [64, head_dim] x [head_dim, block_kv] wgmma that the Mosaic GPU interpreter can run.

``interpret=True`` runs Mosaic GPU's interpreter (CPU), which takes wgmma operands only from
shared memory and has no ``run_state``: there P is staged through shared memory and P V is added
to the accumulator after the wgmma; on the GPU P stays in registers and P V accumulates in place.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.flash_attention import MASK_VALUE, FlashAttentionBlockSizes

# wgmma's M: the rows one warpgroup multiplies at a time.
WARPGROUP_ROWS = 64
WARPS_PER_WARPGROUP = 4
HEAD_DIMS = (64, 128)
# Registers per thread: consumers hold the f32 accumulator and score tile; the TMA producer
# needs few. 2 x 128 x 232 + 128 x 40 fits the SM's 64K registers.
CONSUMER_REGISTERS = 232
PRODUCER_REGISTERS = 40


def default_block_sizes(head_dim: int) -> FlashAttentionBlockSizes:
    """128 rows (2 consumer warpgroups) x 128 keys; as many ring slots as shared memory allows."""
    return FlashAttentionBlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=2 if head_dim > 64 else 3)


def validate_block_sizes(block_sizes: FlashAttentionBlockSizes, head_dim: int, dtype) -> None:
    """Mosaic constraints on top of FlashAttentionBlockSizes' own (powers of two, >= 16)."""
    compute_wgs = block_sizes.num_warps // WARPS_PER_WARPGROUP
    if compute_wgs not in (1, 2):
        raise ValueError(f"num_warps={block_sizes.num_warps} must be 4 or 8 for the Mosaic kernel "
                         f"(one or two consumer warpgroups)")
    if block_sizes.block_q != compute_wgs * WARPGROUP_ROWS:
        raise ValueError(f"block_q={block_sizes.block_q} must be {compute_wgs * WARPGROUP_ROWS} "
                         f"(64 rows per consumer warpgroup) with num_warps={block_sizes.num_warps}")
    if block_sizes.block_k % 64:
        raise ValueError(f"block_k={block_sizes.block_k} must be a multiple of 64 for the Mosaic kernel")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim={head_dim} must be one of {HEAD_DIMS} for the Mosaic kernel")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise ValueError(f"dtype={jnp.dtype(dtype)} must be bfloat16 or float16 for the Mosaic kernel")


def flash_attention_mosaic_kernel(
    q_lens_ref,  # [batch] int32 (GMEM)
    kv_lens_ref,  # [batch] int32 (GMEM)
    q_ref,  # [batch, padded_q_len, num_heads, head_dim] (GMEM)
    kt_ref,  # [batch, num_kv_heads, head_dim, padded_kv_len] (GMEM): K transposed
    v_ref,  # [batch, padded_kv_len, num_kv_heads, head_dim] (GMEM)
    o_ref,  # [batch, padded_q_len, num_heads, head_dim] (GMEM)
    qo_smem,  # [compute_wgs, 64, head_dim]: each consumer's Q tile, reused for its output
    kt_smem,  # [num_stages, head_dim, block_kv]
    v_smem,  # [num_stages, block_kv, head_dim]
    q_loaded,  # compute_wgs barriers
    k_loaded,  # num_stages barriers
    v_loaded,  # num_stages barriers
    k_consumed,  # num_stages barriers, compute_wgs arrivals each
    v_consumed,  # num_stages barriers, compute_wgs arrivals each
    probs_smem,  # [compute_wgs, 64, block_kv] when interpreting (P staged for wgmma), else None
    *,
    causal: bool,
    sm_scale: float,
    group: int,
    wg_heads: int,
):
    compute_wgs, rows, head_dim = qo_smem.shape
    num_stages, _, block_kv = kt_smem.shape
    wg_tokens = compute_wgs // wg_heads
    batch = lax.axis_index("batch")
    wg = lax.axis_index("wg")
    q_len = q_lens_ref[batch]
    kv_len = kv_lens_ref[batch]
    first_head = lax.axis_index("heads") * wg_heads
    kv_head = lax.div(first_head, jnp.int32(group))
    tile_tokens = wg_tokens * rows
    # Heaviest (last) query tiles first, so the causal tail does not straggle.
    q_tile = q_ref.shape[1] // tile_tokens - 1 - lax.axis_index("q_tiles")
    cta_first_token = q_tile * tile_tokens

    def key_steps(first_token, num_tokens):
        """(unmasked steps, all steps) for queries first_token .. first_token + num_tokens - 1."""
        first_position = kv_len - q_len + first_token
        if causal:
            keys = jnp.minimum(kv_len, first_position + num_tokens)
            full = lax.div(jnp.maximum(first_position + 1, 0), jnp.int32(block_kv))
        else:
            keys = kv_len
            full = kv_len
        keys = jnp.where(first_token < q_len, jnp.maximum(keys, 0), 0)
        steps = lax.div(keys + block_kv - 1, jnp.int32(block_kv))
        full = jnp.minimum(jnp.minimum(full, lax.div(kv_len, jnp.int32(block_kv))), steps)
        return full, steps

    # The producer loads what the CTA's last token block needs; every consumer walks that many slots.
    _, cta_steps = key_steps(cta_first_token, tile_tokens)

    @pl.when(wg < compute_wgs)
    def _consumer():
        plgpu.set_max_registers(CONSUMER_REGISTERS, action="increase")
        head = first_head + lax.rem(wg, jnp.int32(wg_heads))
        first_token = cta_first_token + lax.div(wg, jnp.int32(wg_heads)) * rows
        q_smem = qo_smem.at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first_token, rows), head], q_smem, q_loaded.at[wg])
        full_steps, steps = key_steps(first_token, rows)
        first_position = kv_len - q_len + first_token
        scale_log2 = sm_scale * math.log2(math.e)

        def step(kv_step, carry, *, masked):
            acc, row_max, row_sum = carry
            slot = lax.rem(kv_step, jnp.int32(num_stages))
            plgpu.barrier_wait(k_loaded.at[slot])

            def qk_product(scores_ref):
                plgpu.wgmma(scores_ref, q_smem, kt_smem.at[slot])
                return scores_ref[...]

            scores = pl.run_scoped(qk_product, plgpu.ACC((rows, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_consumed.at[slot])
            scores = scores * scale_log2
            if masked:
                shape = (rows, block_kv)
                row_positions = first_position + plgpu.broadcasted_iota(
                    jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA)
                key_positions = kv_step * block_kv + plgpu.broadcasted_iota(
                    jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA)
                allowed = key_positions < kv_len
                if causal:
                    allowed = allowed & (key_positions <= row_positions)
                scores = jnp.where(allowed, scores, MASK_VALUE)
            new_max = jnp.maximum(row_max, scores.max(axis=1))
            correction = jnp.exp2(row_max - new_max)
            probs = jnp.exp2(scores - lax.broadcast_in_dim(new_max, scores.shape, [0]))
            if masked:  # a row with no allowed key yet has new_max == MASK_VALUE: exp2(0) == 1
                probs = jnp.where(allowed, probs, 0.0)
            row_sum = row_sum * correction + probs.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
            probs = probs.astype(v_smem.dtype)
            plgpu.barrier_wait(v_loaded.at[slot])
            if probs_smem is None:  # GPU: P from registers, accumulated into acc in place
                def pv_into_acc(acc_ref):
                    plgpu.wgmma(acc_ref, probs, v_smem.at[slot])

                acc = pl.run_state(pv_into_acc)(plgpu.ACC.init(acc))
            else:  # the interpreter takes wgmma operands from shared memory and has no run_state
                probs_smem[wg] = probs
                plgpu.commit_smem()

                def pv_product(pv_ref):
                    plgpu.wgmma(pv_ref, probs_smem.at[wg], v_smem.at[slot])
                    return pv_ref[...]

                acc = acc + pl.run_scoped(pv_product, plgpu.ACC((rows, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_consumed.at[slot])
            return acc, new_max, row_sum

        def release(kv_step, _):
            """A slot this consumer does not need: wait for it to land (keeps barrier phases in order)."""
            slot = lax.rem(kv_step, jnp.int32(num_stages))
            plgpu.barrier_wait(k_loaded.at[slot])
            plgpu.barrier_arrive(k_consumed.at[slot])
            plgpu.barrier_wait(v_loaded.at[slot])
            plgpu.barrier_arrive(v_consumed.at[slot])

        carry = (
            plgpu.layout_cast(jnp.zeros((rows, head_dim), jnp.float32), plgpu.Layout.WGMMA),
            plgpu.layout_cast(jnp.full((rows,), MASK_VALUE, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
            plgpu.layout_cast(jnp.zeros((rows,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
        )
        plgpu.barrier_wait(q_loaded.at[wg])
        carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), carry)
        acc, _, row_sum = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)
        lax.fori_loop(steps, cta_steps, release, None)

        out = acc / lax.broadcast_in_dim(jnp.where(row_sum > 0, row_sum, 1.0), acc.shape, [0])
        valid = first_token + plgpu.broadcasted_iota(jnp.int32, acc.shape, 0, layout=plgpu.Layout.WGMMA) < q_len
        q_smem[...] = jnp.where(valid, out, 0.0).astype(q_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[batch, pl.ds(first_token, rows), head])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == compute_wgs)
    def _producer():
        plgpu.set_max_registers(PRODUCER_REGISTERS, action="decrease")

        def load(kv_step):
            slot = lax.rem(kv_step, jnp.int32(num_stages))
            keys = pl.ds(kv_step * block_kv, block_kv)
            plgpu.copy_gmem_to_smem(kt_ref.at[batch, kv_head, :, keys], kt_smem.at[slot], k_loaded.at[slot])
            plgpu.copy_gmem_to_smem(v_ref.at[batch, keys, kv_head], v_smem.at[slot], v_loaded.at[slot])

        def wait_consumed(kv_step):
            slot = lax.rem(kv_step, jnp.int32(num_stages))
            plgpu.barrier_wait(k_consumed.at[slot])
            plgpu.barrier_wait(v_consumed.at[slot])

        for kv_step in range(min(num_stages, v_ref.shape[1] // block_kv)):  # fill the ring
            pl.when(kv_step < cta_steps)(functools.partial(load, kv_step))

        @pl.loop(num_stages, jnp.maximum(cta_steps, num_stages))
        def _refill(kv_step):
            # The slot's previous tile (step kv_step - num_stages) must be read by every consumer.
            wait_consumed(kv_step)
            load(kv_step)

        # Observe the last tiles' release too, so every barrier phase is waited on exactly once.
        pl.loop(jnp.maximum(cta_steps - num_stages, 0), cta_steps)(wait_consumed)


def flash_attention_mosaic(
    q,  # [batch, q_len, num_heads, head_dim]
    k,  # [batch, kv_len, num_kv_heads, head_dim]
    v,  # [batch, kv_len, num_kv_heads, head_dim]
    q_lens,  # [batch] int32
    kv_lens,  # [batch] int32
    *,
    causal: bool,
    sm_scale: float,
    block_sizes: FlashAttentionBlockSizes,
    interpret: bool = False,
):  # [batch, q_len, num_heads, head_dim]
    """Builds and calls the Mosaic GPU kernel (inputs already validated by the public wrapper)."""
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    validate_block_sizes(block_sizes, head_dim, q.dtype)
    rows = WARPGROUP_ROWS
    compute_wgs = block_sizes.num_warps // WARPS_PER_WARPGROUP
    block_kv, num_stages = block_sizes.block_k, block_sizes.num_stages
    # Two heads of a group over the same tokens share K/V tiles and step counts.
    wg_heads = 2 if compute_wgs == 2 and group % 2 == 0 else 1
    wg_tokens = compute_wgs // wg_heads
    tile_tokens = wg_tokens * rows
    padded_q_len = -(-q_len // tile_tokens) * tile_tokens
    padded_kv_len = -(-kv_len // block_kv) * block_kv
    q = jnp.pad(q, ((0, 0), (0, padded_q_len - q_len), (0, 0), (0, 0)))
    kv_pad = ((0, 0), (0, padded_kv_len - kv_len), (0, 0), (0, 0))
    k, v = jnp.pad(k.astype(q.dtype), kv_pad), jnp.pad(v.astype(q.dtype), kv_pad)
    # K^T tiles make Q K^T a plain [64, head_dim] x [head_dim, block_kv] wgmma (the Mosaic GPU
    # interpreter cannot read transposed operands); one extra pass over K, ~1% of prefill at 2k.
    kt = jnp.transpose(k, (0, 2, 3, 1))

    # wgmma reads shared memory in 8 x 64-element tiles, 128-byte swizzled.
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((compute_wgs, rows, head_dim), q.dtype, transforms=transforms),
        plgpu.SMEM((num_stages, head_dim, block_kv), q.dtype, transforms=transforms),
        plgpu.SMEM((num_stages, block_kv, head_dim), q.dtype, transforms=transforms),
        plgpu.Barrier(num_barriers=compute_wgs),
        plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=num_stages),
        plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=num_stages),
        # On the GPU P stays in registers as wgmma's left operand.
        plgpu.SMEM((compute_wgs, rows, block_kv), q.dtype, transforms=transforms) if interpret else None,
    )
    kernel = functools.partial(flash_attention_mosaic_kernel, causal=causal, sm_scale=sm_scale, group=group,
                               wg_heads=wg_heads)
    out = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_types=scratch,
        grid=(num_heads // wg_heads, padded_q_len // tile_tokens, batch),
        grid_names=("heads", "q_tiles", "batch"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_gpu_interpret_params() if interpret else None,
    )(q_lens, kv_lens, q, kt, v)
    return out[:, :q_len]


def _gpu_interpret_params():
    """Mosaic GPU's own interpreter (simulates SMEM, warpgroups, barriers and TMA on CPU); private API.

    The interpreter evaluates plain primitives with the CPU lowering, and ``layout_cast`` (a hint
    for how registers hold an array) has none; on CPU it is the identity.
    """
    from jax._src.interpreters import mlir
    from jax._src.pallas.mosaic_gpu import core as mgpu_core
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

    mlir.register_lowering(mgpu_core.layout_cast_p, mlir.lower_fun(lambda x, new_layout: x, multiple_results=False),
                           platform="cpu")
    return InterpretGPUParams()
