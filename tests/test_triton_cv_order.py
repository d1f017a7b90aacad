"""The Triton kernels' Cv tile order: the second direction's forward and dV kernels take the tiles
from the last (`CrissCrossConfig.alternate_cv_order`), so that they start on what the first
direction wrote last, which L2 may still hold; the results are the same to the bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from pallas_kernels import CrissCrossConfig, criss_cross_attention
from pallas_kernels.criss_cross import testing
from pallas_kernels.criss_cross.testing import random_inputs, relative_error, tolerance

# 16-channel Cv tiles: 40 channels make three, the last with 8 channels past Cv (masked).
TILES = dict(block_q=16, block_k=16, block_cv=16, bwd_block_cv=16)


def _run(q, k, v, g, alternate: bool):
    config = CrissCrossConfig(**TILES, alternate_cv_order=alternate)
    out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, implementation="triton", interpret=True,
                                                             config=config), q, k, v)
    return (out, *vjp(g))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_the_second_kernels_take_the_channel_tiles_from_the_last_and_change_no_bit(dtype):
    shape = (2, 5, 19, 3, 40)  # rows of 19 pixels: two query and key blocks, the second ragged
    q, k, v, g = random_inputs(21, *shape, dtype)
    alternate, in_order = _run(q, k, v, g, True), _run(q, k, v, g, False)
    for name, a, b in zip(("out", "dq", "dk", "dv"), alternate, in_order):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    tol = tolerance(dtype, shape[1] + shape[2] + max(shape[3:]))
    assert relative_error(alternate[0], testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", alternate[1:], testing.dense_vjp(q, k, v, g)):
        assert relative_error(grad, ref) < tol, f"d{name}"


def _first_channel_tiles(alternate: bool) -> dict[str, int]:
    """For each Triton kernel with a channel grid axis: the Cv tile of V (forward) or dO (dV) that
    its first program along that axis reads, from the kernels' own block index maps."""
    q, k, v, g = random_inputs(22, 1, 3, 4, 3, 40, jnp.bfloat16)
    config = CrissCrossConfig(**TILES, alternate_cv_order=alternate)

    def loss(q, k, v):
        out = criss_cross_attention(q, k, v, implementation="triton", interpret=True, config=config)
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    first = {}

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call" and eqn.params["name"].startswith(("criss_cross_fwd",
                                                                                      "criss_cross_bwd_dv")):
                mapping = eqn.params["grid_mapping"]
                # Operand 2 is V in the forward, operand 3 dO in dV; the last block index is the Cv tile.
                operand = 2 if eqn.params["name"].startswith("criss_cross_fwd") else 3
                index_map = mapping.block_mappings[operand].index_map_jaxpr
                zeros = [jnp.int32(0)] * len(mapping.grid)
                first[eqn.params["name"]] = int(jax.core.eval_jaxpr(index_map.jaxpr, index_map.consts, *zeros)[-1])
            for param in eqn.params.values():
                if isinstance(param, jax_core.ClosedJaxpr):
                    visit(param.jaxpr)
                elif isinstance(param, jax_core.Jaxpr):
                    visit(param)

    visit(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)
    return first


def test_the_kernels_index_their_channel_tiles_from_the_last_only_where_configured():
    last = 40 // 16  # three tiles: 0, 1, 2
    assert _first_channel_tiles(True) == {"criss_cross_fwd_row": 0, "criss_cross_fwd_col": last,
                                          "criss_cross_bwd_dv_row": 0, "criss_cross_bwd_dv_col": last}
    assert _first_channel_tiles(False) == {"criss_cross_fwd_row": 0, "criss_cross_fwd_col": 0,
                                           "criss_cross_bwd_dv_row": 0, "criss_cross_bwd_dv_col": 0}


def test_under_vmap_both_orders_give_the_same_bits():
    # vmap appends its axis to the Triton launch grid, after the channel axis: the tiles must still
    # be indexed by their own grid position, not by the mapped one.
    q, k, v, g = random_inputs(23, 2, 3, 6, 3, 40, jnp.bfloat16)
    stack = [jnp.stack([x, x[::-1]]) for x in (q, k, v, g)]
    results = {}
    for alternate in (True, False):
        config = CrissCrossConfig(**TILES, alternate_cv_order=alternate)

        def one(q, k, v, g):
            out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, implementation="triton",
                                                                     interpret=True, config=config), q, k, v)
            return (out, *vjp(g))

        results[alternate] = jax.vmap(one)(*stack)
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[True], results[False]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    tol = tolerance(jnp.bfloat16, 3 + 6 + 40)
    assert relative_error(results[True][0][1], testing.dense_forward(q[::-1], k[::-1], v[::-1])) < tol
    for name, grad, ref in zip("qkv", results[True][1:], testing.dense_vjp(q[::-1], k[::-1], v[::-1], g[::-1])):
        assert relative_error(grad[1], ref) < tol, f"d{name}"
