"""The sampler's CPU selection kernels (pallas_kernels/cpu_top_k.py) against their references: candidates
against jax.lax.top_k and candidates_reference, the exact cut-off against the sampler's bisection
(inference.sampler._bisect_threshold),
on odd widths, ties, -inf, NaN and distributions from peaked to flat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inference import sampler
from pallas_kernels import cpu_top_k

pytestmark = pytest.mark.skipif(not cpu_top_k.kernel_available(), reason="the CPU kernel library is not available")


def _rows(b: int, v: int, seed: int) -> np.ndarray:
    """Rows from peaked to flat (Zipf-like over a random permutation), some with ties and -inf."""
    rng = np.random.default_rng(seed)
    s = rng.uniform(0.3, 3.0, size=(b, 1))
    x = (-s * np.log(np.stack([rng.permutation(v) + 1 for _ in range(b)]))).astype(np.float32)
    x[1::4] = np.round(x[1::4] * 2) / 2  # many ties
    x[2::4, rng.integers(0, v, size=v // 3)] = -np.inf
    return x


@pytest.mark.parametrize("v,k", [(1, 1), (15, 4), (17, 17), (300, 64), (5000, 1), (5000, 256), (49152, 64)])
def test_candidates_equal_reference(v, k):
    b = 9
    x = _rows(b, v, seed=v + k)
    rng = np.random.default_rng(k)
    top_k = rng.integers(1, v + 1, size=b).astype(np.int32)
    top_k[:2] = [v, min(k, v)]  # top-k off; the k-th value the last candidate
    floor = np.where(rng.random(b) < 0.5, -np.inf, x.max(-1) - rng.uniform(0, 5, size=b)).astype(np.float32)
    values, mass = jax.jit(lambda *a: cpu_top_k.cpu_candidates(a[0], k, *a[1:]))(x, top_k, floor)
    want_values, want_mass = cpu_top_k.candidates_reference(x, k, top_k, floor)
    np.testing.assert_array_equal(np.asarray(values), np.asarray(jax.lax.top_k(x, k)[0]))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))
    np.testing.assert_allclose(np.asarray(mass), np.asarray(want_mass), rtol=2e-6)


def test_candidates_pad_with_minus_inf_and_skip_nan():
    x = np.full((3, 40), -np.inf, np.float32)
    x[0, [3, 30]] = [1.0, 2.0]
    x[1, :] = np.arange(40, dtype=np.float32)
    x[1, [5, 39]] = np.nan
    x[2, 7] = np.nan
    values, mass = cpu_top_k.cpu_candidates(x, 5, np.full(3, 40), np.full(3, -np.inf))
    got = np.asarray(values)
    np.testing.assert_array_equal(got[0], [2.0, 1.0, -np.inf, -np.inf, -np.inf])
    np.testing.assert_array_equal(got[1], [38.0, 37.0, 36.0, 35.0, 34.0])
    np.testing.assert_array_equal(got[2], [-np.inf] * 5)
    np.testing.assert_allclose(np.asarray(mass)[0], 1 + np.exp(-1.0), rtol=1e-6)
    assert np.asarray(mass)[2] == 0


def test_candidates_bad_k_named():
    with pytest.raises(ValueError, match="k=9 must be in"):
        cpu_top_k.cpu_candidates(jnp.zeros((2, 8)), 9, jnp.full(2, 8), jnp.zeros(2))


def _filter_inputs(b: int, v: int, seed: int):
    rng = np.random.default_rng(seed)
    scaled = _rows(b, v, seed) / rng.uniform(0.5, 1.5, size=(b, 1)).astype(np.float32)
    top_k = np.where(rng.random(b) < 0.4, v, rng.integers(1, v + 1, size=b)).astype(np.int32)
    top_p = np.where(rng.random(b) < 0.2, 1.0, rng.uniform(0.05, 0.999, size=b)).astype(np.float32)
    min_p = np.where(rng.random(b) < 0.5, 0.0, rng.uniform(0.0, 0.2, size=b)).astype(np.float32)
    with np.errstate(divide="ignore"):
        floor = (scaled.max(-1) + np.log(min_p)).astype(np.float32)
    return scaled, top_k, top_p, floor


@pytest.mark.parametrize("v", [33, 700, 49152])
@pytest.mark.parametrize("kth_known", [False, True])
def test_cutoff_equals_bisection(v, kth_known):
    b = 24
    scaled, top_k, top_p, floor = _filter_inputs(b, v, seed=v)
    # Given kth: the sampler passes max(k-th largest, floor) where its candidates found it.
    kth = np.maximum(floor, -np.sort(-scaled, axis=-1)[np.arange(b), top_k - 1]) if kth_known else np.zeros(b, np.float32)
    known = np.full(b, kth_known)
    rows = np.ones(b, bool)
    rows[5] = False
    got = np.asarray(jax.jit(cpu_top_k.cpu_filter_cutoff)(scaled, top_k, top_p, floor, kth, known, rows))
    want = np.asarray(jax.jit(sampler._bisect_threshold)(scaled, top_k, top_p, floor, kth, known))
    assert got[5] == -np.inf
    np.testing.assert_array_equal(got[rows], want[rows])


def test_cutoff_nucleus_below_the_stored_band():
    # The nucleus ends more than the kernel's 12-nat band below the maximum, so its second pass runs:
    # one token of mass 1, then 40k tokens 13-14 nats down holding ~0.055 together, and top_p past 1 / 1.055.
    rng = np.random.default_rng(0)
    v = 40000
    x = np.concatenate([[0.0], rng.uniform(-14.0, -13.0, v - 1)]).astype(np.float32)[None].repeat(3, 0)
    top_k = np.full(3, v, np.int32)
    top_p = np.array([0.96, 0.99, 0.999], np.float32)
    floor = np.full(3, -np.inf, np.float32)
    known = np.ones(3, bool)
    got = np.asarray(cpu_top_k.cpu_filter_cutoff(x, top_k, top_p, floor, floor, known, known))
    want = np.asarray(sampler._bisect_threshold(x, top_k, top_p, floor, floor, known))
    assert (got < -12.0).all()
    np.testing.assert_array_equal(got, want)


def _check_inverse_cdf(x, cutoff, u, tokens, block=256):
    """Each token is where its uniforms fall in the float64 CDF (block by mass, then inside the block),
    within float32 rounding, and has positive weight."""
    for r, t in enumerate(tokens):
        w = np.where((x[r] >= cutoff[r]) & (x[r] > -np.inf), np.exp(x[r].astype(np.float64) - x[r].max()), 0.0)
        assert w[t] > 0, (r, t)
        masses = np.add.reduceat(w, np.arange(0, len(w), block))
        b, j = divmod(int(t), block)
        cum = np.cumsum(masses)
        tol = 1e-5 * cum[-1]
        assert (cum[b - 1] if b else 0.0) - tol <= u[r, 0] * cum[-1] <= cum[b] + tol, (r, t)
        inside = np.cumsum(w[b * block:(b + 1) * block])
        tol = 1e-5 * inside[-1]
        assert (inside[j - 1] if j else 0.0) - tol <= u[r, 1] * inside[-1] <= inside[j] + tol, (r, t)


@pytest.mark.parametrize("v", [7, 300, 49152])
def test_draw_follows_the_inverse_cdf_and_matches_xla(v):
    b = 48
    rng = np.random.default_rng(v)
    x = _rows(b, v, seed=3 * v)
    x[0, :] = -np.inf
    x[0, v // 2] = 0.0  # one allowed token
    row_max = x.max(-1)
    cutoff = np.where(rng.random(b) < 0.5, -np.inf, row_max - rng.uniform(0, 4, b)).astype(np.float32)
    u = rng.random((b, 2)).astype(np.float32)
    u[1:4] = np.float32(1 - 2**-24)  # u * total rounding up to the total: the last weighted token
    tokens = np.asarray(jax.jit(cpu_top_k.cpu_draw)(x, cutoff, row_max, u))
    assert tokens[0] == v // 2
    _check_inverse_cdf(x, cutoff, u, tokens)
    # The XLA draw with the same uniforms: the same rule, sums in another order.
    masked = np.where(x >= cutoff[:, None], x, -np.inf)
    keys = jax.vmap(jax.random.key)(jnp.arange(b))
    uniforms = np.asarray(sampler.draw_uniforms(keys))
    xla = np.asarray(jax.jit(sampler._draw)(keys, masked, row_max))
    kernel = np.asarray(cpu_top_k.cpu_draw(x, cutoff, row_max, uniforms))
    assert (kernel == xla).mean() >= 0.95, (kernel, xla)
