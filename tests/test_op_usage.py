"""The op as a user calls it: transformations the kernels cannot take, config and default_config
arguments, float64 inputs, the sharded wrapper's checks, and the attention scripts' command lines."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from ccnet_jax.models.criss_cross import AttentionOp
from pallas_kernels import (
    CrissCrossConfig,
    MosaicConfig,
    criss_cross_attention,
    criss_cross_attention_map,
    criss_cross_attention_reference,
    default_config,
    sharded_criss_cross_attention,
)
from pallas_kernels.criss_cross.testing import SMALL_BLOCKS, dense_forward, random_inputs

ROOT = Path(__file__).resolve().parents[1]
TRITON = {"implementation": "triton", "interpret": True, "config": SMALL_BLOCKS}


def _sum_of(kwargs, k, v):
    return lambda q: jnp.sum(criss_cross_attention(q, k, v, **kwargs).astype(jnp.float32))


def test_second_derivatives_through_the_triton_kernels_say_to_use_xla():
    q, k, v, _ = random_inputs(31, 1, 3, 5, 4, 6, jnp.float32)
    loss = _sum_of(TRITON, k, v)
    # Differentiating the custom VJP reaches Pallas's JVP of a kernel, which used to fail with a bare
    # AssertionError.
    with pytest.raises(NotImplementedError, match="one reverse-mode derivative.*implementation='xla'"):
        jax.grad(lambda q: jnp.sum(jax.grad(loss)(q)))(q)
    with pytest.raises(NotImplementedError, match="second derivative"):
        jax.hessian(loss)(q)
    with pytest.raises(NotImplementedError, match=r"forward mode \(jax.jvp, jax.jacfwd, jax.linearize\)"):
        jax.jacfwd(loss)(q)
    # What the message points to works.
    xla = _sum_of({"implementation": "xla"}, k, v)
    assert np.all(np.isfinite(jax.grad(lambda q: jnp.sum(jax.grad(xla)(q)))(q)))


def test_second_derivatives_through_the_mosaic_kernels_say_to_use_xla():
    # Traced only (the Mosaic GPU interpreter never runs): it used to fail with "Differentiation
    # rule for 'mpmd_map' not implemented".
    q, k, v, _ = random_inputs(32, 1, 3, 5, 4, 6, jnp.bfloat16)
    loss = _sum_of({"implementation": "mosaic", "interpret": True}, k, v)
    with pytest.raises(NotImplementedError, match="mosaic kernels.*implementation='xla'"):
        jax.make_jaxpr(jax.grad(lambda q: jnp.sum(jax.grad(loss)(q).astype(jnp.float32))))(q)


def test_first_order_gradients_through_the_kernels_are_untouched():
    q, k, v, g = random_inputs(33, 1, 3, 5, 4, 6, jnp.float32)

    def loss(kwargs):
        return lambda q, k, v: jnp.sum(criss_cross_attention(q, k, v, **kwargs) * g)

    kernels = jax.grad(loss(TRITON), argnums=(0, 1, 2))(q, k, v)
    xla = jax.grad(loss({"implementation": "xla"}), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(kernels, xla):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "triton"])
def test_float64_inputs_are_told_to_cast_to_float32(implementation):
    with jax.enable_x64(True):
        x = jnp.zeros((1, 3, 4, 2), jnp.float64)
        with pytest.raises(ValueError, match=r"q has dtype float64; .*\(cast it to float32\)"):
            criss_cross_attention(x, x, x, implementation=implementation, interpret=True)
    with pytest.raises(ValueError, match=r"dtype int32; .*\(cast it to a float type\)"):
        criss_cross_attention(*(jnp.zeros((1, 3, 4, 2), jnp.int32),) * 3)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: CrissCrossConfig(block_q=16.0), r"block_q=16\.0: must be a power of two"),
        (lambda: CrissCrossConfig(block_cv=None), r"block_cv=None: must be a power of two"),
        (lambda: CrissCrossConfig(fwd_num_warps=4.0), r"fwd_num_warps=4\.0: must be 1, 2, 4, 8 or 16"),
        (lambda: CrissCrossConfig(fwd_num_stages=1.5), r"fwd_num_stages must be >= 1 \(an integer\), not 1\.5"),
        (lambda: CrissCrossConfig(bwd_num_stages=None), r"bwd_num_stages must be >= 1 \(an integer\), not None"),
        (lambda: MosaicConfig(value_splits=2.0), r"value_splits=2\.0: must be 1, 2 or 4"),
        (lambda: MosaicConfig(query_warpgroups=True), r"query_warpgroups=True: must be 1 or 2"),
        (lambda: MosaicConfig(stages=3.0), r"stages=3\.0: must be 2, 3 or None"),
        (lambda: MosaicConfig(pad_positions="False"), r"pad_positions='False': must be True or False"),
    ],
)
def test_config_fields_that_are_not_integers_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_config_takes_numpy_integers_from_a_shape():
    assert CrissCrossConfig(block_q=np.int64(32), fwd_num_stages=np.int32(3)) == CrissCrossConfig(
        block_q=32, fwd_num_stages=3
    )
    assert MosaicConfig(value_splits=np.int64(2)).value_splits == 2


@pytest.mark.parametrize(
    "args,message",
    [
        ((0, 5, 4, 4, 2), r"h=0 must be an integer >= 1"),
        ((5, 5, 4, -1, 2), r"cv=-1 must be an integer >= 1"),
        ((5.5, 5, 4, 4, 2), r"h=5\.5 must be an integer >= 1"),
        ((5, 5, 4, 4, 8), r"itemsize=8 must be 2 \(bfloat16, float16\) or 4 \(float32\)"),
        ((5, 5, 4, 4, jnp.bfloat16), r"itemsize=.*bfloat16.* must be 2"),
        # A compute capability as jax's devices spell it would silently take another GPU's tiling.
        ((5, 5, 4, 4, 2, 9.0), r"arch=9\.0 must be a compute capability as major \* 10 \+ minor"),
        ((5, 5, 4, 4, 2, "sm_90"), r"arch='sm_90' must be"),
    ],
)
def test_default_config_rejects_arguments_out_of_range(args, message):
    with pytest.raises(ValueError, match=message):
        default_config(*args)


def test_default_config_takes_unknown_and_numpy_arguments():
    assert default_config(97, 97, 64, 512, 2, None) == default_config(97, 97, 64, 512, 2, arch=None)
    assert default_config(*map(np.int64, (97, 97, 64, 512, 2, 90))) == default_config(97, 97, 64, 512, 2, 90)


def _mesh():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4, set by conftest)")
    return Mesh(np.array(jax.devices()[:4]), ("data",))


def test_sharded_op_checks_the_whole_inputs_before_sharding():
    mesh = _mesh()
    q, k, v, _ = random_inputs(34, 4, 3, 5, 2, 3, jnp.float32)
    # A rank-3 q used to be reported as a batch of 3 that does not divide over the mesh.
    with pytest.raises(ValueError, match=r"q must be NHWC of rank 4.*\(3, 5, 2\)"):
        sharded_criss_cross_attention(q[0], k[0], v[0], mesh=mesh, implementation="xla")
    # A k of another batch used to fail inside shard_map, or name the shards' shapes.
    with pytest.raises(ValueError, match=r"same shape.*q \(4, 3, 5, 2\) and k \(2, 3, 5, 2\)"):
        sharded_criss_cross_attention(q, k[:2], v, mesh=mesh, implementation="xla")


def test_pallas_off_the_gpu_names_what_was_asked_for():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU 'pallas' compiles")
    q, k, v, _ = random_inputs(35, 1, 3, 5, 2, 3, jnp.float32)
    with pytest.raises(ValueError, match=r"implementation='pallas' compiles through Triton.*interpret=True"):
        criss_cross_attention(q, k, v, implementation="pallas")


@pytest.mark.parametrize("interpret", ["no", "yes", None, 0.5, 1, 0])
def test_interpret_takes_only_true_or_false(interpret):
    # interpret="no" was taken as true, and ran the interpreter.
    q, k, v, _ = random_inputs(36, 1, 3, 5, 2, 3, jnp.float32)
    with pytest.raises(ValueError, match=f"interpret must be True or False, got {interpret!r}"):
        criss_cross_attention(q, k, v, implementation="xla", interpret=interpret)
    np.testing.assert_array_equal(criss_cross_attention(q, k, v, implementation="xla", interpret=np.False_),
                                  criss_cross_attention(q, k, v, implementation="xla"))
    with pytest.raises(ValueError, match=f"AttentionOp: interpret must be True or False, got {interpret!r}"):
        AttentionOp("xla", interpret)


@pytest.mark.parametrize("shape", [(2, 3, 5, 4, 6), (1, 1, 4, 2, 3), (1, 4, 1, 2, 3)])
def test_attention_map_rows_sum_to_one_without_the_pixel_itself_and_give_the_output(shape):
    q, k, v, _ = random_inputs(36, *shape, jnp.float32)
    a_col, a_row = criss_cross_attention_map(q, k)
    np.testing.assert_allclose(jnp.sum(a_col, -1) + jnp.sum(a_row, -1), 1.0, rtol=1e-6)
    h = shape[1]
    # The pixel itself is weighed once, through its row.
    assert np.all(np.asarray(a_col)[:, np.arange(h), :, np.arange(h)] == 0)
    applied = jnp.einsum("bijh,bhjc->bijc", a_col, v) + jnp.einsum("bijw,biwc->bijc", a_row, v)
    np.testing.assert_allclose(applied, dense_forward(q, k, v), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(applied, criss_cross_attention(q, k, v), rtol=1e-6, atol=1e-6)


def _script(*args, timeout=30):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)


def test_attention_check_help_prints_usage_instead_of_running_the_checks():
    # It used to ignore its arguments and start minutes of interpreted kernels.
    done = _script("experiments/attention_check.py", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage: attention_check.py" in done.stdout and "float64 reference" in done.stdout
    assert "rel err" not in done.stdout
    done = _script("experiments/attention_check.py", "--quick")
    assert done.returncode == 2 and "unrecognized arguments: --quick" in done.stderr


@pytest.mark.parametrize("script", ["bench_attention", "tune_attention"])
def test_attention_scripts_refuse_an_unknown_dtype_up_front(script):
    # bench_attention used to time a copy first and then fail with "data type 'fp16' not understood".
    done = _script(f"experiments/{script}.py", "--dtypes", "fp16")
    assert done.returncode == 2
    assert "argument --dtypes: invalid choice: 'fp16'" in done.stderr


def test_the_reference_refuses_what_it_would_truncate_or_misread():
    # An integer input gave an integer result, the attention truncated; a mismatch, einsum's
    # message about a label.
    q, k, v, _ = random_inputs(37, 1, 3, 5, 2, 3, jnp.float32)
    with pytest.raises(ValueError, match=r"criss_cross_attention_reference: v has dtype int32; cast it to a float"):
        criss_cross_attention_reference(q, k, v.astype(jnp.int32))
    with pytest.raises(ValueError, match=r"q and k must have the same shape .* k \(1, 3, 5, 3\)"):
        criss_cross_attention_reference(q, jnp.concatenate([k, k[..., :1]], -1), v)
    with pytest.raises(ValueError, match=r"v must share q's \(B, H, W\)"):
        criss_cross_attention_reference(q, k, v[:, :, :4])
    with pytest.raises(ValueError, match=r"criss_cross_attention_map: k must be NHWC of rank 4"):
        criss_cross_attention_map(q, k[0])
    with pytest.raises(ValueError, match=r"criss_cross_attention_map: q and k must have the same shape"):
        criss_cross_attention_map(q, k[:, :, :4])
    assert criss_cross_attention_reference(q, k, v.astype(jnp.bfloat16)).dtype == jnp.bfloat16
