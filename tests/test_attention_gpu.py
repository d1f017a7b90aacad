"""The kernels on a real CUDA GPU: values and VJP against the xla implementation.

The Triton kernels on any CUDA GPU, the Mosaic GPU kernels on Hopper GPUs (float32 where
their float16-pair forward and backward hold the map). Skipped (with the reason) wherever no CUDA GPU
is visible, and the Mosaic cases on other GPUs; experiments/gpu_check.sh runs them on one.
"""

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import MosaicConfig, XlaConfig, criss_cross_attention, default_config
from pallas_kernels.criss_cross.implementations import is_hopper, mosaic_unsupported
from pallas_kernels.criss_cross.testing import random_inputs, relative_error, tolerance

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "gpu",
    reason=f"needs a CUDA GPU; the default backend here is {jax.default_backend()!r} "
    "(run experiments/gpu_check.sh on a GPU machine)",
)

SHAPES = [
    (2, 97, 97, 64, 512),  # CCNet training crop 769 -> 97
    (1, 128, 256, 64, 512),  # 128x256 maps (a whole 1024x2048 image gives 129x257: triton only)
    (2, 65, 129, 64, 512),
    (1, 33, 65, 5, 7),
    (3, 1, 129, 8, 20),
    (1, 97, 1, 3, 33),
]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
# (implementation, dtype). Here and in the file's order of tests, what an H100 has run least comes
# first: a GPU run cut off by its time limit (experiments/gpu_check.sh) then still has the answers
# it needs most. The Mosaic float32 kernels (float16 pairs) hold strips of up to 128 pixels.
KERNELS = [("mosaic", jnp.float32), ("mosaic", jnp.bfloat16), ("mosaic", jnp.float16)] + [
    ("triton", d) for d in DTYPES]
CASES = [(shape, implementation, dtype) for implementation, dtype in KERNELS for shape in SHAPES
         if implementation != "mosaic" or mosaic_unsupported(dtype, *shape[1:4]) is None]


def _skip_unless_available(implementation):
    kind = jax.devices()[0].device_kind
    if implementation == "mosaic" and not is_hopper(kind):
        pytest.skip(f"the Mosaic GPU kernels need a Hopper GPU; this one is {kind}")


def _vjp(implementation, q, k, v, g, config=None):
    out, vjp = jax.vjp(lambda *a: criss_cross_attention(*a, implementation=implementation, config=config), q, k, v)
    return (out, *vjp(g))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
def test_default_on_gpu_is_mosaic_on_hopper_else_triton_for_16_bit_and_xla_for_float32(dtype):
    q, k, v, _ = random_inputs(6, 1, 8, 8, 4, 4, dtype)
    hlo = jax.jit(lambda *a: criss_cross_attention(*a)).lower(q, k, v).as_text()
    if jnp.dtype(dtype).itemsize != 2:
        expected = None
    elif is_hopper(jax.devices()[0].device_kind):
        expected = "mosaic_gpu"
    else:
        expected = "triton"
    kernels = {name for name in ("mosaic_gpu", "triton") if name in hlo}
    assert kernels == ({expected} if expected else set())


# The persistent forward (one CTA per SM looping over the strips) has never run on a card: its
# ring running from strip to strip, and the next strip's keys and queries loading under the
# current one's values, are what no interpreter run shows the timing of.
@pytest.mark.parametrize("shape", [(2, 97, 97, 64, 512), (1, 128, 256, 64, 512), (8, 97, 97, 64, 512)], ids=str)
@pytest.mark.parametrize("config", [MosaicConfig(persistent=True), MosaicConfig(persistent=True, value_splits=2)],
                         ids=["persistent", "persistent, 2 value splits"])
def test_persistent_forward_agrees_bitwise_on_gpu(shape, config):
    _skip_unless_available("mosaic")
    q, k, v, g = random_inputs(14, *shape, jnp.bfloat16)

    def run(config):
        return jax.jit(lambda *a: _vjp("mosaic", *a, config=config))(q, k, v, g)

    one_cta_per_item = dataclasses.replace(config, persistent=False)
    for name, a, b in zip(("out", "dq", "dk", "dv"), run(config), run(one_cta_per_item)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)


# float32 first (its kernels, on float16 pairs, have not yet run on a card); it takes strips of up
# to 128 pixels.
LAYOUT_CASES = [(shape, dtype) for dtype in (jnp.float32, jnp.bfloat16)
                for shape in [(2, 97, 97, 64, 512), (1, 33, 65, 5, 7), (1, 128, 256, 64, 512)]
                if mosaic_unsupported(dtype, *shape[1:4]) is None]


@pytest.mark.parametrize("shape,dtype", LAYOUT_CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_mosaic_rows_and_padded_tiles_agree_bitwise_on_gpu(shape, dtype):
    # By default TMA moves swizzled rows into buffers that wgmma reads as tiles, two views of one
    # allocation that no interpreter checks; pad_positions=True pads H and W to multiples of 8
    # and moves tiles. The kernels and their products are the same, so must be every bit: in
    # float32 too, whose rings and staging tiles are reused over 8 value tiles at Cv 512.
    _skip_unless_available("mosaic")
    q, k, v, g = random_inputs(8, *shape, dtype)

    def run(config):
        return jax.jit(lambda *a: _vjp("mosaic", *a, config=config))(q, k, v, g)

    for name, a, b in zip(("out", "dq", "dk", "dv"), run(MosaicConfig()), run(MosaicConfig(pad_positions=True))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)


@pytest.mark.parametrize("shape,implementation,dtype", CASES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_kernels_match_xla_and_are_deterministic_on_gpu(shape, implementation, dtype):
    _skip_unless_available(implementation)
    b, h, w, cqk, cv = shape
    q, k, v, g = random_inputs(zlib.crc32(repr((shape, jnp.dtype(dtype).name)).encode()), b, h, w, cqk, cv, dtype)
    # The xla implementation computes in float32 from the same rounded inputs.
    expected = jax.jit(lambda *a: _vjp("xla", *a))(q, k, v, g)
    kernels = jax.jit(lambda *a: _vjp(implementation, *a))
    got = kernels(q, k, v, g)
    tol = tolerance(dtype, h + w + max(cqk, cv))
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, expected):
        assert x.dtype == ref.dtype == dtype, name
        assert bool(jnp.all(jnp.isfinite(x))), name
        assert relative_error(x, np.asarray(ref, np.float64)) < tol, name
    # No atomics and no partial sums added in a varying order: a second run is the same to the bit.
    for name, x, again in zip(("out", "dq", "dk", "dv"), got, kernels(q, k, v, g)):
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(again, np.float32), err_msg=name)


@pytest.mark.parametrize("implementation,products", [("triton", "tf32x3"), ("triton", "f16x3"), ("xla", "bf16x6")])
@pytest.mark.parametrize("shape", [(2, 97, 97, 64, 512), (1, 33, 65, 5, 7)], ids=str)
def test_float32_products_off_the_default_are_within_the_float32_tolerance_on_gpu(shape, implementation, products):
    # The product modes that the value tests above do not run on a GPU: the Triton kernels' TF32x3
    # (their default until bf16x6, which those tests run, was 11% faster on an H100) and their
    # scaled float16 pairs (f16x3, three products where bf16x6 takes six; the interpreter runs its
    # split, but multiplies float16 on the CPU, not on tensor cores), and XLA's GEMMs as six
    # bfloat16 part products (XlaConfig("bf16x6")). Only a GPU can check them against the
    # tolerance every float32 kernel meets here. experiments/split_precision.py predicts 2e-7 to
    # 9e-7 for bf16x6 and up to 1.2e-6 for f16x3; tune_attention.py prints the error each variant
    # reaches on the card.
    b, h, w, cqk, cv = shape
    q, k, v, g = random_inputs(zlib.crc32(repr(shape).encode()), b, h, w, cqk, cv, jnp.float32)
    if implementation == "triton":
        config = dataclasses.replace(default_config(h, w, cqk, cv, 4), float32_dot=products)
    else:
        config = XlaConfig(products)
    expected = jax.jit(lambda *a: _vjp("xla", *a))(q, k, v, g)
    got = jax.jit(lambda *a: _vjp(implementation, *a, config=config))(q, k, v, g)
    tol = tolerance(jnp.float32, h + w + max(cqk, cv))
    for name, x, ref in zip(("out", "dq", "dk", "dv"), got, expected):
        assert x.dtype == jnp.float32, name
        assert relative_error(x, np.asarray(ref, np.float64)) < tol, name
