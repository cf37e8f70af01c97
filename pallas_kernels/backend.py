"""Picks which implementation of a kernel runs, and how Pallas lowers it on GPU.

Every public kernel wrapper takes ``impl``:

- ``"reference"``: the simplest pure-jnp float32 implementation (ground truth in tests),
- ``"xla"``: an efficient, memory-bounded pure-jnp path (what the engine runs on CPU),
- ``"pallas"``: the Pallas GPU kernel,
- ``"pallas_interpret"``: the same kernel run by the Pallas interpreter (CPU testing),
- ``"auto"``: ``"pallas"`` on GPU, ``"xla"`` everywhere else.

Pallas GPU has two lowerings. Triton (``jax.experimental.pallas.triton``) takes the
"classic" kernel style (``pl.pallas_call`` + BlockSpecs, ``jnp.dot`` inside the body, gathers
through refs). Mosaic GPU (``jax.experimental.pallas.mosaic_gpu``) is where JAX is moving: in
JAX 0.10 it is the *default* whenever ``compiler_params`` is left out
(``jax_pallas_use_mosaic_gpu`` defaults to True), it wants ``plgpu.kernel`` with explicit
TMA copies / barriers / ``wgmma``, and it does not lower ``dot_general`` or gathers inside a
``pallas_call`` body. We therefore always pass explicit compiler params, so the choice made
here (argument, else ``RIDGELINE_PALLAS_LOWERING``, else ``"triton"``) is the one that runs.

Status: the kernels in this package are written for the Triton lowering (works on JAX 0.10 and,
with a deprecation warning, on 0.11). ``"mosaic"`` is accepted and validated; flash attention has
a Mosaic GPU kernel (``flash_attention_mosaic.py``, opt-in), the other kernels raise
NotImplementedError for it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import jax

IMPLS = ("auto", "reference", "xla", "pallas", "pallas_interpret")
LOWERINGS = ("triton", "mosaic")
LOWERING_ENV_VAR = "RIDGELINE_PALLAS_LOWERING"
DEFAULT_LOWERING = "triton"


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def next_power_of_two(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block shapes are powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def resolve_impl(impl: str) -> str:
    """Maps ``impl`` (one of IMPLS) to a concrete implementation name (never "auto")."""
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def is_pallas(impl: str) -> bool:
    """True for the implementations that go through ``pl.pallas_call``."""
    return impl in ("pallas", "pallas_interpret")


def resolve_lowering(lowering: str | None = None) -> str:
    """The Pallas GPU lowering to use: the argument, else $RIDGELINE_PALLAS_LOWERING, else triton."""
    if lowering is None:
        lowering = os.environ.get(LOWERING_ENV_VAR, DEFAULT_LOWERING).strip().lower() or DEFAULT_LOWERING
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering={lowering!r} is not one of {LOWERINGS} (set via argument or ${LOWERING_ENV_VAR})")
    return lowering


def gpu_compiler_params(lowering: str, *, num_warps: int | None = None, num_stages: int | None = None) -> Any:
    """Explicit compiler params for ``pl.pallas_call``; they also select the lowering.

    Imports are lazy so CPU-only installs never touch the GPU lowering modules.
    """
    lowering = resolve_lowering(lowering)
    if lowering == "triton":
        from jax.experimental.pallas import triton as pltriton

        # JAX >= 0.11 warns at every Triton lowering that the backend is deprecated; choosing it is
        # deliberate here (see module docstring), so silence exactly that message.
        warnings.filterwarnings("ignore", message=r"The Pallas Triton backend is deprecated",
                                category=DeprecationWarning)
        return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    from jax.experimental.pallas import mosaic_gpu as plmgpu

    # Mosaic GPU schedules warpgroups itself; num_warps has no meaning there. num_stages maps
    # onto how many grid steps may have their copies in flight at once.
    return plmgpu.CompilerParams(max_concurrent_steps=max(1, num_stages or 1))


# Lowerings each kernel has an implementation for.
IMPLEMENTED_LOWERINGS = ("triton",)


def kernel_lowering(impl: str, lowering: str | None, kernel_name: str,
                    implemented: tuple[str, ...] = IMPLEMENTED_LOWERINGS) -> str | None:
    """The lowering a kernel call compiles with: None unless impl == "pallas".

    ``implemented``: the lowerings this kernel has. Raises NotImplementedError for a valid
    lowering that the kernel does not implement yet.
    """
    if impl != "pallas":
        return None
    lowering = resolve_lowering(lowering)
    if lowering not in implemented:
        raise NotImplementedError(
            f"{kernel_name} has no {lowering!r} Pallas kernel yet (implemented: {implemented}); "
            f"pass lowering='triton' or unset ${LOWERING_ENV_VAR}")
    return lowering


# The GPU that cross-lowering targets when no GPU is attached (the kernels are tuned for Hopper).
ABSTRACT_CUDA_DEVICE_KIND = "NVIDIA H100 80GB HBM3"


@contextlib.contextmanager
def abstract_cuda_device(device_kind: str = ABSTRACT_CUDA_DEVICE_KIND):
    """Lets ``jit(f).trace(...).lower(lowering_platforms=("cuda",))`` lower Pallas Triton kernels on a host
    without a GPU.

    JAX >= 0.11 asks the Triton lowering for a target GPU and, with none attached, raises "No supported GPU
    devices found, please specify an abstract GPU device"; a one-device abstract mesh carrying an abstract
    CUDA device answers it. JAX 0.10 ignores the abstract device (it falls back to sm_90 by itself).
    """
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    device = AbstractDevice(device_kind=device_kind, num_cores=None, platform="cuda")
    with use_abstract_mesh(AbstractMesh((1,), ("_abstract_cuda",), abstract_device=device)):
        yield


def targets_gpu() -> bool:
    """True when traced kernels will run on (or are being lowered for) a CUDA/ROCm GPU."""
    if jax.default_backend() == "gpu":
        return True
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(device, "platform", None) in ("cuda", "rocm")
