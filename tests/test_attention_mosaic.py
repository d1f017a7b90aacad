"""The Mosaic GPU (Hopper) kernels without a GPU: the Mosaic GPU interpreter and CUDA export.

The interpreter simulates TMA, barriers, warpgroups and wgmma on the CPU, with race
detection on: it checks ordinary and TMA accesses to shared memory, not the operands
that wgmma reads (jax 0.11.2 does not track those). It takes tiled TMA copies from
arrays whose strips are not multiples of 8, which real lowering rejects; compiled, the
kernels copy swizzled rows into the same bytes instead and read them as tiles through a
second view (mosaic_layout), which the interpreter refuses (it keeps the views of a
RefUnion in separate buffers). So every kernel is also exported for CUDA against an
abstract H100 (its shared memory checked against 227 KiB), the layout of the two views is
pinned here, and the GPU tests check the values.
"""

import dataclasses
import functools
import math
import re
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic_gpu.core import UnswizzleRef, flatten_ref_union
from jax._src.pallas.mosaic_gpu.interpret import gpu_callbacks
from jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call import get_races

from pallas_kernels import CrissCrossConfig, MosaicConfig, XlaConfig, criss_cross_attention
from pallas_kernels.criss_cross import (
    mosaic_backward,
    mosaic_backward_long,
    mosaic_backward_pairs,
    mosaic_op,
    mosaic_work,
    testing,
)
from pallas_kernels.criss_cross.gpu_targets import cuda_arch
from pallas_kernels.criss_cross.implementations import LoweringTarget, choose, mosaic_unsupported
from pallas_kernels.criss_cross.mosaic_backward_pairs import float32_backward_unsupported, strip_backward_pairs
from pallas_kernels.criss_cross.mosaic_layout import CHANNEL_TILE, QUERY_BLOCK, MosaicStrips, round_up, tile_buffer
from pallas_kernels.criss_cross.mosaic_op import per_pixel, per_strip, value_splits
from pallas_kernels.criss_cross.mosaic_work import WorkItems
from pallas_kernels.criss_cross.residuals import keep_attention_residuals
from pallas_kernels.criss_cross.testing import random_inputs, relative_error, tolerance
from pallas_kernels.criss_cross.triton_resources import export_for_cuda

H100 = "NVIDIA H100 80GB HBM3"
# The cases past a few seconds each, which the README's test command leaves to .ci/run's slow step.
SLOW = pytest.mark.slow

# (B, H, W, Cqk, Cv): H and W not multiples of 8, one-pixel rows and columns, H != W,
# two query warpgroups (70 -> 128 keys), CCNet's channel counts, two query/key channel
# tiles with padding (100 -> 128), and strips past 128 pixels, which take the query-side and
# key-side backward, each with three value tiles (150 or 192 channels) through the rings,
# after the one-CTA backward of the short direction, whose gradients they add: rows of 150
# (192 keys, two warpgroups a CTA on both sides; the columns' kernel sums delta = sum_c dO·O
# from the 192-channel output), columns of 150 with two query/key channel tiles (one key
# warpgroup a CTA; the diagonal masked; XLA sums delta, the output's 150 channels needing
# padding), and columns of 200 (256 keys) in float16. Both directions past the one-CTA
# backward: below.
SHAPES_AND_DTYPES = [
    ((2, 5, 7, 3, 5), jnp.bfloat16),
    pytest.param((2, 5, 7, 3, 5), jnp.float16, marks=SLOW),
    ((1, 1, 9, 4, 6), jnp.bfloat16),
    ((1, 9, 1, 1, 3), jnp.float16),
    pytest.param((1, 12, 70, 24, 40), jnp.bfloat16, marks=SLOW),
    pytest.param((1, 10, 9, 64, 512), jnp.bfloat16, marks=SLOW),
    ((1, 6, 5, 100, 70), jnp.float16),
    pytest.param((1, 3, 150, 8, 192), jnp.bfloat16, marks=SLOW),
    pytest.param((1, 150, 3, 100, 150), jnp.bfloat16, marks=SLOW),
    pytest.param((1, 200, 3, 8, 150), jnp.float16, marks=SLOW),
    # float32: forward and backward on float16 pairs, one warpgroup a CTA (the backward a
    # query-side and a key-side kernel per direction); 70-pixel rows take two 64-key blocks. A
    # batch of 2 at 1e-3: test_float32_splits_small_inputs_and_gradients_without_losing_them.
    # 130 value channels make 3 tiles (the rings' slots and dV's staging reused), 72 query/key
    # channels 2 tiles.
    ((1, 1, 9, 4, 6), jnp.float32),
    pytest.param((1, 3, 9, 72, 130), jnp.float32, marks=SLOW),
    pytest.param((1, 3, 70, 24, 40), jnp.float32, marks=SLOW),
]


@pytest.fixture(autouse=True)
def copies_stay_inside_minor_axes(monkeypatch):
    """Fails a test whose kernels copy past the end of a global array's last axis. The interpreter
    clips such a copy (TMA's documented behaviour), but on an H100 a store of 64 floats past the
    end of a row of per-pixel values was not clipped there: it overwrote the start of the next row
    (2026-11-27). Copies past the end of other axes (the strip axis of an NHWC array) were
    clipped there, and the kernels rely on that."""
    overruns = []
    for task, side in ((gpu_callbacks.AsyncCopyGmemToSmemTask, "src"), (gpu_callbacks.AsyncCopySmemToGmemTask, "dst")):

        def checked(self, tma_thread_id, original=task.__call__, side=side):
            access = getattr(self, f"{side}_access")
            key = getattr(self, f"{side}_allocation_key")
            shape = tuple(gpu_callbacks._get_shared_memory().buffer_shape_and_dtype(key).shape)
            last = access.range[-1]
            if isinstance(last, slice) and last.stop > shape[-1]:
                overruns.append(f"{type(self).__name__}: global {shape}[{access.range}]")
            return original(self, tma_thread_id)

        monkeypatch.setattr(task, "__call__", checked)
    yield
    assert not overruns, f"{len(overruns)} copies past a global array's last axis, e.g. {overruns[:3]}"


def _mosaic(q, k, v):
    return criss_cross_attention(q, k, v, implementation="mosaic", interpret=True)


@pytest.mark.parametrize("shape,dtype", SHAPES_AND_DTYPES, ids=lambda x: getattr(x, "__name__", str(x)))
def test_interpreter_matches_float64_reference(shape, dtype):
    b, h, w, cqk, cv = shape
    q, k, v, g = random_inputs(zlib.crc32(repr((shape, jnp.dtype(dtype).name)).encode()), b, h, w, cqk, cv, dtype)
    out, vjp = jax.vjp(_mosaic, q, k, v)
    grads = vjp(g)
    assert out.dtype == dtype and out.shape == v.shape
    tol = tolerance(dtype, h + w + max(cqk, cv))
    assert relative_error(out, testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", grads, testing.dense_vjp(q, k, v, g)):
        assert grad.dtype == dtype and grad.shape == ref.shape, name
        assert relative_error(grad, ref) < tol, f"d{name}"
    assert not get_races().races_found


def test_both_directions_past_the_one_cta_backward(monkeypatch):
    # With both directions' strips too long for the one-CTA backward, the query-side and key-side
    # kernels serve both: the first without previous gradients, on a delta that XLA sums, the
    # second adding the first's. The kernels themselves run at 192 and 256 keys in the cases
    # above; this is the order between them. At the real threshold it takes strips of 129 pixels,
    # so at least 129 of them a direction (5-6 minutes in the interpreter); with the threshold at
    # 0 keys, a 9x10 map's strips (64 keys, ragged both ways) take the same path in about 10 s.
    monkeypatch.setattr(mosaic_op, "MAX_BACKWARD_STRIP", 0)
    passes = []
    long_pass = mosaic_op.strip_backward_long_mosaic

    def recorded(strips, *args, previous=None, **kwargs):
        passes.append((strips.direction, previous is None))
        return long_pass(strips, *args, previous=previous, **kwargs)

    monkeypatch.setattr(mosaic_op, "strip_backward_long_mosaic", recorded)
    b, h, w, cqk, cv = 1, 9, 10, 4, 8
    q, k, v, g = random_inputs(11, b, h, w, cqk, cv, jnp.bfloat16)
    out, vjp = jax.vjp(_mosaic, q, k, v)
    grads = vjp(g)
    assert passes == [("row", True), ("col", False)]
    tol = tolerance(jnp.bfloat16, h + w + max(cqk, cv))
    assert relative_error(out, testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", grads, testing.dense_vjp(q, k, v, g)):
        assert relative_error(grad, ref) < tol, f"d{name}"
    assert not get_races().races_found


@pytest.mark.parametrize(
    "config",
    [MosaicConfig(query_warpgroups=1, stages=3), MosaicConfig(stages=2, value_splits=2),
     MosaicConfig(query_warpgroups=1, value_splits=4)],
    ids=str,
)
@pytest.mark.slow
def test_launch_options_give_the_same_function(config):
    # One warpgroup per CTA (two CTAs per 70-pixel row), a shallower ring than the default's 3
    # value tiles in flight, and the 4 value tiles (Cv 200 padded to 256) shared by 2 or 4 CTAs
    # per block of queries (with 4, each CTA's one tile in a ring of 3). pad_positions:
    # test_padding_positions_changes_no_bit.
    q, k, v, g = random_inputs(9, 1, 10, 70, 24, 200, jnp.bfloat16)
    out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, implementation="mosaic", interpret=True,
                                                             config=config), q, k, v)
    tol = tolerance(jnp.bfloat16, 10 + 70 + 200)
    assert relative_error(out, testing.dense_forward(q, k, v)) < tol
    for grad, ref in zip(vjp(g), testing.dense_vjp(q, k, v, g)):
        assert relative_error(grad, ref) < tol
    assert not get_races().races_found


# (SMs, shape, config): 70 row items, then 10 column items on 3 CTAs (4, 3 and 3 each) with two
# query warpgroups (70 -> 128 keys), which merge the row result in place; 4 value tiles in a ring
# of 3, so that the ring's slots shift from item to item; one query warpgroup with 2 value splits
# on 5 CTAs, where the column pass reads the row's lse from a buffer of its own; one CTA taking
# every item, each a single value tile, so that the ring of 3 runs across items.
@pytest.mark.parametrize(
    "sms,shape,config",
    [pytest.param(3, (1, 70, 10, 24, 200), MosaicConfig(persistent=True), marks=SLOW),
     pytest.param(5, (1, 10, 70, 24, 200), MosaicConfig(persistent=True, query_warpgroups=1, value_splits=2),
                  marks=SLOW),
     (1, (2, 5, 7, 3, 5), MosaicConfig(persistent=True))],
    ids=str,
)
def test_persistent_forward_changes_no_bit(monkeypatch, sms, shape, config):
    # A persistent CTA takes the same items as the one-CTA-per-item launch, in the same arithmetic,
    # so the output and the lse the backward keeps must be the same to the bit.
    monkeypatch.setattr(mosaic_op, "multiprocessors", lambda: sms)
    q, k, v, _ = random_inputs(12, *shape, jnp.bfloat16)
    one_cta_per_item = dataclasses.replace(config, persistent=False)
    for name, a, b in zip(("out", "lse"), mosaic_op._forward(q, k, v, config, interpret=True),
                          mosaic_op._forward(q, k, v, one_cta_per_item, interpret=True)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    assert not get_races().races_found


def test_persistent_forward_takes_16_bit_inputs_only():
    q, k, v, _ = random_inputs(13, 1, 3, 4, 2, 2, jnp.float32)
    with pytest.raises(ValueError, match=r"persistent=True\) takes bfloat16 or float16 inputs"):
        criss_cross_attention(q, k, v, implementation="mosaic", interpret=True, config=MosaicConfig(persistent=True))
    with pytest.raises(ValueError, match="persistent='True': must be True or False"):
        MosaicConfig(persistent="True")


@pytest.mark.parametrize("last_first", [False, True], ids=["first_to_last", "last_to_first"])
@pytest.mark.parametrize("items,ctas", [((2, 97, 1, 1), 132), ((2, 97, 1, 2), 132), ((1, 3, 2, 1), 4),
                                        ((2, 5, 1, 1), 1), ((1, 2, 1, 1), 132), ((3, 2, 1, 1), 2)], ids=str)
def test_persistent_ctas_take_every_work_item_once(items, ctas, last_first):
    # CTA c takes items c, c + ctas, ...: each exactly once, and no CTA without one (there are at
    # most as many CTAs as items); the first item (CTA 0, step 0) is of the first image to be taken,
    # the last one of the last.
    work = WorkItems(items, ctas, images_last_first=last_first)
    launched = work.launch_grid[0]
    assert launched == min(ctas, math.prod(items))

    def taken(_):
        steps = work.steps()
        most = -(-math.prod(items) // launched)
        indices = jnp.stack([jnp.stack([*dataclasses.astuple(work.item(step))]) for step in range(most)])
        return steps, indices

    steps, indices = jax.vmap(taken, axis_name="cta")(jnp.arange(launched))
    assert int(steps.min()) >= 1
    seen = [tuple(map(int, indices[c, step])) for c in range(launched) for step in range(int(steps[c]))]
    assert sorted(seen) == sorted(np.ndindex(*items))
    assert int(indices[0, 0, 0]) == (items[0] - 1 if last_first else 0)
    last = math.prod(items) - 1
    assert int(indices[last % launched, last // launched, 0]) == (0 if last_first else items[0] - 1)


# (shape, dtype, long backward, image order of each kernel in launch order): the one-CTA
# backward; the query-side and key-side backward of both directions (the threshold
# lowered as in test_both_directions_past_the_one_cta_backward); float32's kernels on float16
# pairs, also two a direction.
@pytest.mark.parametrize(
    "shape,dtype,long_backward,orders",
    [((2, 3, 5, 3, 5), jnp.bfloat16, False, [False, True, False, True]),
     pytest.param((2, 9, 10, 4, 8), jnp.bfloat16, True, [False, True] * 3, marks=SLOW),
     ((2, 2, 3, 4, 6), jnp.float32, False, [False, True] * 3)],
    ids=str,
)
def test_kernels_alternate_their_image_order_and_change_no_bit(monkeypatch, shape, dtype, long_backward, orders):
    # Each kernel after the first of the forward, and of the backward, takes the images from the
    # other end than the one before it (so that it starts on what L2 may hold), and that changes
    # where the results are computed, not what they are.
    if long_backward:
        monkeypatch.setattr(mosaic_op, "MAX_BACKWARD_STRIP", 0)
    taken = []
    for module in (mosaic_work, mosaic_backward, mosaic_backward_long, mosaic_backward_pairs):

        def recorded(b, batch, last_first, walk=module.walk_images):
            assert batch == shape[0]
            taken.append(last_first)
            return walk(b, batch, last_first)

        monkeypatch.setattr(module, "walk_images", recorded)
    q, k, v, g = random_inputs(14, *shape, dtype)
    results, kernel_orders = {}, {}
    for alternate in (True, False):
        jax.clear_caches()  # every kernel traced again, through the recording walk_images
        taken.clear()
        config = MosaicConfig(alternate_image_order=alternate)
        out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, implementation="mosaic", interpret=True,
                                                                 config=config), q, k, v)
        results[alternate] = (out, *vjp(g))
        # A kernel consults walk_images once or more as it is traced, always with its own order.
        kernel_orders[alternate] = [o for i, o in enumerate(taken) if i == 0 or o != taken[i - 1]]
    assert kernel_orders[True] == orders
    assert kernel_orders[False] == [False]
    for name, a, b in zip(("out", "dq", "dk", "dv"), results[True], results[False]):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    tol = tolerance(dtype, shape[1] + shape[2] + max(shape[3:]))
    assert relative_error(results[True][0], testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", results[True][1:], testing.dense_vjp(q, k, v, g)):
        assert relative_error(grad, ref) < tol, f"d{name}"
    assert not get_races().races_found


@pytest.mark.parametrize(
    "shape,dtype,backward_module,backward_changes",
    [((2, 3, 5, 3, 5), jnp.bfloat16, mosaic_backward, [False, True, True, True]),
     # float32's query-side kernels come first in each direction, so they take the images in order.
     ((2, 2, 3, 4, 6), jnp.float32, mosaic_backward_pairs, [False, False, True, True])],
    ids=["bf16", "f32"],
)
@pytest.mark.slow
def test_the_kernels_index_their_images_by_what_walk_images_returns(monkeypatch, shape, dtype, backward_module,
                                                                   backward_changes):
    # The test above shows each kernel asking for its order and the results unchanged; here, each
    # kernel taking its images from the last must index them by walk_images' answer: broken in the
    # forward's kernels alone (the column pass then reads and writes image 0 twice), the output and
    # the gradients change; in the backward's alone, the output stays and the gradients of the
    # kernels that take the images from the last change.
    q, k, v, g = random_inputs(15, *shape, dtype)

    def run():
        jax.clear_caches()
        out, vjp = jax.vjp(lambda q, k, v: criss_cross_attention(q, k, v, implementation="mosaic", interpret=True),
                           q, k, v)
        return [np.asarray(x, np.float32) for x in (out, *vjp(g))]

    def to_image_0(b, batch, last_first):
        return 0 * b if last_first else b

    right = run()
    for module, changes in ((mosaic_work, [True] * 4), (backward_module, backward_changes)):
        with monkeypatch.context() as patch:
            patch.setattr(module, "walk_images", to_image_0)
            broken = run()
        assert [not np.array_equal(a, b) for a, b in zip(right, broken)] == changes, module.__name__


@pytest.mark.parametrize("shape,dtype",
                         [pytest.param((1, 9, 11, 64, 128), jnp.bfloat16, marks=SLOW),
                          pytest.param((1, 9, 3, 8, 16), jnp.float32, marks=SLOW)],
                         ids=str)
def test_padding_positions_changes_no_bit(shape, dtype):
    # pad_positions only moves where the arrays live (H and W padded to 16), so every result must
    # be the same to the bit. It once let XLA sum delta = sum_c dO·O where the unpadded layout has
    # the kernel sum it: dq and dk then differed in the last bit, in the interpreter and on an H100.
    # float32 (H and W padded to 16 and 8): the zeros leave each map's split scale as it was.
    q, k, v, g = random_inputs(8, *shape, dtype)

    def run(config):
        out, vjp = jax.vjp(lambda *a: criss_cross_attention(*a, implementation="mosaic", interpret=True,
                                                            config=config), q, k, v)
        return (out, *vjp(g))

    for name, a, b in zip(("out", "dq", "dk", "dv"), run(MosaicConfig()), run(MosaicConfig(pad_positions=True))):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
    assert not get_races().races_found


@pytest.mark.parametrize(
    "shape,stages,warpgroups",
    [((2, 97, 97, 64, 512), 3, (2, 2)), ((1, 192, 192, 64, 512), 2, (2, 2)), ((1, 128, 128, 128, 512), 2, (2, 2)),
     ((1, 256, 256, 128, 512), 2, (1, 1)), ((1, 40, 70, 64, 64), 3, (2, 1))],
    ids=str,
)
def test_the_default_ring_is_three_tiles_deep_where_no_warpgroup_is_lost(shape, stages, warpgroups):
    # Three value tiles in flight ran faster on an H100 at CCNet's 97x97; where the third tile
    # would cost a strip a query warpgroup (192 keys at 64 channels, 128 at 128), two stay.
    b, h, w, cqk, _ = shape
    q = jax.ShapeDtypeStruct((b, h, w, cqk), jnp.bfloat16)
    rows, cols, chosen = mosaic_op.forward_strips(q, MosaicConfig(), interpret=False)
    assert (chosen, (rows.query_warpgroups, cols.query_warpgroups)) == (stages, warpgroups)
    assert mosaic_op.forward_strips(q, MosaicConfig(stages=2), interpret=False)[2] == 2  # an explicit depth stays


def test_config_must_match_the_kernels_that_run():
    q, k, v, _ = random_inputs(10, 1, 3, 4, 2, 2, jnp.bfloat16)
    with pytest.raises(ValueError, match="take a MosaicConfig, but config is a CrissCrossConfig"):
        criss_cross_attention(q, k, v, implementation="mosaic", interpret=True, config=CrissCrossConfig())
    with pytest.raises(ValueError, match="take a CrissCrossConfig, but config is a MosaicConfig"):
        criss_cross_attention(q, k, v, implementation="triton", interpret=True, config=MosaicConfig())
    with pytest.raises(ValueError, match="take a MosaicConfig, but config is an XlaConfig"):
        criss_cross_attention(q, k, v, implementation="mosaic", interpret=True, config=XlaConfig("bf16x6"))
    # Where None picks kernels (16-bit inputs on a GPU, or here the interpreter), an XlaConfig set for
    # float32 runs is left unused, as a kernel config is where xla runs.
    unused = criss_cross_attention(q, k, v, interpret=True, config=XlaConfig("bf16x6"))
    np.testing.assert_array_equal(np.asarray(unused, np.float32),
                                  np.asarray(criss_cross_attention(q, k, v, interpret=True), np.float32))
    with pytest.raises(ValueError, match="query_warpgroups=3"):
        MosaicConfig(query_warpgroups=3)
    with pytest.raises(ValueError, match="stages=4"):
        MosaicConfig(stages=4)
    with pytest.raises(ValueError, match="value_splits=3: must be 1, 2 or 4"):
        MosaicConfig(value_splits=3)


def test_golden_constant_inputs():
    # q = 1, k = 2, v = 3 everywhere: every output is 3, and d(sum out)/dv = 1.
    shape = (1, 6, 10)
    q, k = jnp.ones((*shape, 8), jnp.bfloat16), jnp.full((*shape, 8), 2, jnp.bfloat16)
    v = jnp.full((*shape, 16), 3, jnp.bfloat16)
    out, vjp = jax.vjp(_mosaic, q, k, v)
    assert bool(jnp.all(out == 3))
    assert bool(jnp.all(vjp(jnp.ones_like(out))[2] == 1))


def test_saves_only_inputs_output_and_lse_for_the_backward():
    from jax._src.ad_checkpoint import saved_residuals

    b, h, w, cqk, cv = 1, 5, 6, 3, 4
    q, k, v, _ = random_inputs(3, b, h, w, cqk, cv, jnp.bfloat16)
    shapes = sorted(aval.shape for aval, _ in saved_residuals(_mosaic, q, k, v))
    assert shapes == sorted([(b, h, w, cqk)] * 2 + [(b, h, w, cv)] * 2 + [(b, h, w)])


@functools.cache  # several tests read the same program, each export 10-30 s on 2 cores
def _exported(shape, dtype, backward: bool, config: MosaicConfig | None = None, implementation="mosaic",
              device_kind=H100) -> str:
    """The StableHLO of the op (and its VJP) exported for CUDA on an abstract GPU, an H100 unless told."""
    b, h, w, cqk, cv = shape

    def f(q, k, v, g):
        def op(q, k, v):
            return criss_cross_attention(q, k, v, implementation=implementation, config=config)

        if not backward:
            return op(q, k, v)
        out, vjp = jax.vjp(op, q, k, v)
        return out, vjp(g)

    args = [jax.ShapeDtypeStruct((b, h, w, c), dtype) for c in (cqk, cqk, cv, cv)]
    return export_for_cuda(f, args, device_kind).mlir_module()


def _custom_calls(shape, dtype, backward: bool, config: MosaicConfig | None = None, **target) -> list[str]:
    return re.findall(r"stablehlo.custom_call @([\w$.]+)", _exported(shape, dtype, backward, config, **target))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, pytest.param(jnp.float16, marks=SLOW)], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", [(2, 97, 97, 64, 512), pytest.param((8, 97, 97, 64, 512), marks=SLOW),
                                   pytest.param((1, 128, 128, 64, 512), marks=SLOW)], ids=str)
def test_forward_and_backward_export_for_cuda_as_mosaic_kernels_only(shape, dtype):
    # Strips up to 128 pixels: two forward and two backward Mosaic GPU kernels, no Triton.
    assert _custom_calls(shape, dtype, backward=True) == ["mosaic_gpu_v2"] * 4


def _kernel_calls(text: str) -> list[tuple[str, int]]:
    """Each kernel call of exported StableHLO: its name (less "criss_cross_" and a call index) and
    how many of its outputs XLA aliases to an operand (buffers the kernel writes over)."""
    calls = [line for line in text.splitlines() if "stablehlo.custom_call" in line]
    return [(re.search(r"criss_cross_(\w+?)(_\d+)?\W", line).group(1), line.count("stablehlo.output_operand_alias<"))
            for line in calls]


def _written_over(text: str) -> dict[str, int]:
    return dict(_kernel_calls(text))


# Mosaic's column forward writes over the row output and the row's lse (one CTA reads and then
# writes each query block's). The long query side keeps a separate dQ: dS, its other output, would
# need a large zeroed buffer (mosaic_layout.launch).
@pytest.mark.parametrize("implementation,shape,dtype,expected", [
    ("mosaic", (2, 97, 97, 64, 512), jnp.bfloat16, {"mosaic_fwd_row": 0, "mosaic_fwd_col": 2,
                                                     "mosaic_bwd_row": 0, "mosaic_bwd_col": 3}),
    ("mosaic", (1, 128, 256, 64, 512), jnp.bfloat16, {"mosaic_fwd_row": 0, "mosaic_fwd_col": 2, "mosaic_bwd_col": 0,
                                                       "mosaic_bwd_query_side_row": 0, "mosaic_bwd_key_side_row": 2}),
    pytest.param("mosaic", (2, 97, 97, 64, 512), jnp.float32, {
        "mosaic_fwd_row": 0, "mosaic_fwd_col": 2, "mosaic_bwd_f32_query_side_row": 0,
        "mosaic_bwd_f32_key_side_row": 0, "mosaic_bwd_f32_query_side_col": 1, "mosaic_bwd_f32_key_side_col": 2},
        marks=SLOW),
    ("triton", (2, 97, 97, 64, 512), jnp.bfloat16, {"fwd_row": 0, "fwd_col": 1, "bwd_dv_row": 0, "bwd_dv_col": 1,
                                                     "bwd_dkq_row": 0, "bwd_dkq_col": 1}),
    # float32 with a dK/dQ key block that holds the strip: dQ is written whole, and over the first's.
    ("triton", (1, 9, 11, 16, 32), jnp.float32, {"fwd_row": 0, "fwd_col": 1, "bwd_dv_row": 0, "bwd_dv_col": 1,
                                                  "bwd_dkq_row": 0, "bwd_dkq_col": 2}),
], ids=str)
def test_the_second_direction_writes_over_the_first_directions_results(implementation, shape, dtype, expected):
    # The second direction's kernels add the first's results (the row output, dQ, dK, dV) and
    # write the sums over them: XLA aliases those outputs to those operands, so no map is held
    # twice. Compiled for an H100 (experiments/attention_memory_h100.py) the Mosaic forward+backward
    # at (2,97,97,64,512) holds 0.3 MiB of temporaries in bfloat16 where it held 23.2. Not shared:
    # Triton's first-direction dQ (float32 for 16-bit inputs), and lse (with several value splits
    # or Cv blocks, several programs of a query block read the row's and write the merged one).
    # A dK/dQ key block of 16 holds every strip of the 9x11 map: the float32 dQ is then written whole.
    config = CrissCrossConfig(dkq_block_k=16) if dtype == jnp.float32 and implementation == "triton" else None
    assert _written_over(_exported(shape, dtype, True, config, implementation=implementation)) == expected


@pytest.mark.parametrize("shape", [pytest.param((2, 97, 97, 64, 512), marks=SLOW),
                                   pytest.param((1, 128, 128, 64, 512), marks=SLOW)], ids=str)
def test_float32_exports_as_mosaic_kernels_only(shape):
    # float16 pairs fit one warpgroup a CTA at 128 keys: two forward kernels, and per direction a
    # query-side and a key-side backward kernel; no Triton. XLA splits q and k (64 channels)
    # into pairs, but no map of 512 channels (v, dO): the kernels split their tiles themselves.
    text = _exported(shape, jnp.float32, backward=True)
    assert re.findall(r"stablehlo.custom_call @([\w$.]+)", text) == ["mosaic_gpu_v2"] * 6
    b, h, w, cqk, cv = shape
    assert f"tensor<{b}x{h}x{w}x{cqk}xf16>" in text
    assert f"x{cv}xf16>" not in text


@pytest.mark.slow
def test_float32_splits_small_inputs_and_gradients_without_losing_them():
    # Inputs and cotangent of magnitude 1e-3 (dS about 1e-6): an unscaled float16 split loses
    # their low parts to float16's subnormals (1e-1 relative error in dq and dk,
    # experiments/split_precision.py). The backward splits dO per map and dS per row.
    b, h, w, cqk, cv = 2, 6, 9, 8, 16
    q, k, v, g = random_inputs(11, b, h, w, cqk, cv, jnp.float32)
    q, k, v, g = (x * np.float32(1e-3) for x in (q, k, v, g))
    out, vjp = jax.vjp(_mosaic, q, k, v)
    tol = tolerance(jnp.float32, h + w + max(cqk, cv))
    assert out.dtype == jnp.float32
    assert relative_error(out, testing.dense_forward(q, k, v)) < tol
    for name, grad, ref in zip("qkv", vjp(g), testing.dense_vjp(q, k, v, g)):
        assert grad.dtype == jnp.float32
        assert relative_error(grad, ref) < tol, f"d{name}"
    assert not get_races().races_found


@pytest.mark.slow
def test_float32_images_are_split_each_by_its_own_scale():
    # One scale per map made an image's accuracy hang on the largest value of the others in its
    # batch: an image at 1e-7 of another's scale lost its pairs' low parts to float16's
    # subnormals (4e-5 relative error where xla has 2e-7). With one scale per image, each image's
    # values and gradients are what it gets alone, to the bit, and within the float32 bound.
    b, h, w, cqk, cv = 2, 3, 5, 4, 6
    q, k, v, g = random_inputs(16, b, h, w, cqk, cv, jnp.float32)
    tiny = jnp.asarray([1.0, 1e-7], jnp.float32)[:, None, None, None]
    v, g = v * tiny, g * tiny
    out, vjp = jax.vjp(_mosaic, q, k, v)
    together = (out, *vjp(g))
    tol = tolerance(jnp.float32, h + w + max(cqk, cv))
    for i in range(b):
        one = [x[i : i + 1] for x in (q, k, v, g)]
        out_i, vjp_i = jax.vjp(_mosaic, *one[:3])
        alone = (out_i, *vjp_i(one[3]))
        for name, a, x in zip(("out", "dq", "dk", "dv"), alone, together):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(x[i : i + 1]), err_msg=f"image {i} {name}")
        refs = (testing.dense_forward(*one[:3]), *testing.dense_vjp(*one))
        for name, a, ref in zip(("out", "dq", "dk", "dv"), alone, refs):
            assert relative_error(a, ref) < tol, f"image {i} {name}"
    assert not get_races().races_found


def test_float32_residuals_keep_v_itself_and_no_pair():
    # The kernels split V's and dO's float32 tiles themselves (mosaic_split), so the forward
    # keeps v (the caller's array) and its two scales for the backward, not a float16 pair of it:
    # of v's shape, the residuals are v and the output, both float32.
    q, k, v, _ = random_inputs(2, 1, 5, 6, 8, 64, jnp.float32)
    _, vjp = jax.vjp(_mosaic, q, k, v)
    leaves = [x for x in jax.tree_util.tree_leaves(vjp) if hasattr(x, "dtype")]
    kept = [x for x in leaves if x.shape == v.shape]
    assert sorted(jnp.dtype(x.dtype).name for x in kept) == ["float32", "float32"]
    assert not [x for x in leaves if x.dtype == jnp.float16 and x.size >= v.size]
    assert any(x is v for x in kept)


@pytest.mark.slow
def test_float32_under_remat_runs_the_forward_kernels_once():
    # keep_attention_residuals keeps the output and lse: the backward recomputes the projections
    # and v's scales (an XLA reduction), not the forward kernels. Two forward and four backward
    # kernels.
    def f(x, wq, wk, wv, g):
        def layer(x, wq, wk, wv):
            return criss_cross_attention(x @ wq, x @ wk, x @ wv, implementation="mosaic")

        out, vjp = jax.vjp(jax.checkpoint(layer, policy=keep_attention_residuals()), x, wq, wk, wv)
        return out, vjp(g)

    maps = jax.ShapeDtypeStruct((2, 97, 97, 512), jnp.float32)
    args = [maps] + [jax.ShapeDtypeStruct((512, c), jnp.float32) for c in (64, 64, 512)] + [maps]
    text = export_for_cuda(f, args, H100).mlir_module()
    assert re.findall(r"stablehlo.custom_call @([\w$.]+)", text) == ["mosaic_gpu_v2"] * 6


def test_full_remat_recomputes_both_forward_kernels():
    # jax.checkpoint without a policy keeps only the layer's inputs, so the backward runs both
    # forward kernels again before the two backward ones: six calls. The column pass writes over
    # the row result through a pure pl.run_state; through jax.new_ref refs (effects) it was not
    # recomputed but its outputs saved, and an unused row pass ran instead: five calls.
    def f(x, wq, wk, wv, g):
        def layer(x, wq, wk, wv):
            return criss_cross_attention(x @ wq, x @ wk, x @ wv, implementation="mosaic")

        out, vjp = jax.vjp(jax.checkpoint(layer), x, wq, wk, wv)
        return out, vjp(g)

    maps = jax.ShapeDtypeStruct((2, 97, 97, 512), jnp.bfloat16)
    args = [maps] + [jax.ShapeDtypeStruct((512, c), jnp.bfloat16) for c in (64, 64, 512)] + [maps]
    names = [name for name, _ in _kernel_calls(export_for_cuda(f, args, H100).mlir_module())]
    assert sorted(names) == sorted(["mosaic_fwd_row", "mosaic_fwd_col"] * 2 + ["mosaic_bwd_row", "mosaic_bwd_col"])


def test_float32_backward_says_what_it_cannot_take():
    assert float32_backward_unsupported(97, 97, 64) is None
    assert float32_backward_unsupported(64, 64, 128) is None
    assert "strips of 192 keys exceed 128" in float32_backward_unsupported(129, 64, 64)
    assert "192 query/key channels exceed 128" in float32_backward_unsupported(64, 64, 130)
    assert "query-side kernel for 128-key strips with 128 query/key channels does not fit" in (
        float32_backward_unsupported(128, 64, 128))
    def maps(h, w):  # q's and k's pairs, then float32 v and dO
        pair = (jnp.zeros((1, h, w, 64), jnp.float16),) * 2
        return pair, pair, jnp.zeros((1, h, w, 64), jnp.float32), jnp.zeros((1, h, w, 64), jnp.float32)

    stats, unscale = jnp.zeros((1, 2, 192), jnp.float32), jnp.zeros((1, 6, 64), jnp.float32)
    with pytest.raises(ValueError, match="strips of 192 keys exceed 128"):
        strip_backward_pairs(MosaicStrips("row", 1, 2, 129, max_query_warpgroups=1), *maps(2, 129), stats, stats,
                             unscale, interpret=True)
    with pytest.raises(ValueError, match="max_query_warpgroups=1"):
        strip_backward_pairs(MosaicStrips("col", 1, 70, 9), *maps(70, 9), stats, stats, unscale, interpret=True)


@pytest.mark.parametrize(
    "config",
    [MosaicConfig(query_warpgroups=1), MosaicConfig(stages=2), MosaicConfig(pad_positions=True),
     pytest.param(MosaicConfig(value_splits=4), marks=SLOW),
     pytest.param(MosaicConfig(value_splits=2, pad_positions=True), marks=SLOW),
     pytest.param(MosaicConfig(stages=2, value_splits=2), marks=SLOW), MosaicConfig(persistent=True),
     pytest.param(MosaicConfig(persistent=True, value_splits=2, query_warpgroups=1), marks=SLOW)],
    ids=str,
)
def test_launch_options_export_within_shared_memory(config):
    assert _custom_calls((2, 97, 97, 64, 512), jnp.bfloat16, backward=True, config=config) == ["mosaic_gpu_v2"] * 4


@pytest.mark.parametrize("shape", [(256, 64), (2, 128, 64), (2, 2, 64, 64)], ids=str)
def test_a_tile_buffer_is_one_allocation_seen_as_rows_and_as_tiles(shape):
    # Compiled, TMA writes swizzled rows through the first view and wgmma reads (8, 64) tiles
    # through the second. That is right only if both start at the same byte, both swizzle 128
    # bytes, and a tile is 8 consecutive rows of 64 channels (one channel tile per row), so that
    # the tiled buffer's bytes are in row order. This pins all three for the installed jax.
    rows, tiles = flatten_ref_union(tile_buffer(shape, jnp.bfloat16, row_tma=True).get_ref_aval())
    rows_at, tiles_at = rows.transforms[0], tiles.transforms[0]
    assert rows_at.offset == tiles_at.offset == 0
    *lead, positions, channels = shape
    assert rows_at.shape == shape
    assert tiles_at.shape == (*lead, positions // 8, 1, 8, channels)
    for view in (rows, tiles):
        assert [t.swizzle for t in view.transforms if isinstance(t, UnswizzleRef)] == [128]


@pytest.mark.parametrize("length", [1, 8, 63, 64, 97, 129, 200, 256])
def test_per_pixel_rows_hold_every_64_pixel_copy_of_them(length):
    # The kernels copy lse and delta in 64-pixel pieces, one per query warpgroup. On an H100 a piece
    # that ran past the end of a shorter row was not clipped there but wrote into the next strip's
    # row; the interpreter clips it, so here only the layout that prevents it can be pinned.
    x = jax.random.normal(jax.random.key(length), (2, length, length + 3))
    for direction in ("row", "col"):
        for warpgroups in (1, 2):
            strips = MosaicStrips(direction, 2, length, length + 3, warpgroups)
            laid_out = per_strip(x, strips)
            assert laid_out.shape[-1] >= strips.query_blocks * strips.query_warpgroups * QUERY_BLOCK
            assert bool(jnp.all(per_pixel(laid_out, strips) == x))


@pytest.mark.parametrize("config,copied", [(None, False), (MosaicConfig(pad_positions=True), True)], ids=str)
def test_odd_maps_reach_the_kernels_without_copies(config, copied):
    # At 97x97 the compiled kernels move rows between shared memory and the caller's arrays, so
    # no (B, H, W, C) array is padded or sliced; padding H and W to 104 copies every one.
    text = _exported((2, 97, 97, 64, 512), jnp.bfloat16, backward=True, config=config)
    map_copies = re.findall(r"stablehlo\.(?:pad|slice) .*-> tensor<\d+x\d+x\d+x\d+x", text)
    assert bool(map_copies) == copied, map_copies


@pytest.mark.parametrize(
    "shape,config,summed_by_xla",
    [((2, 97, 97, 64, 512), None, False), ((1, 128, 256, 64, 512), None, False),
     pytest.param((1, 200, 200, 64, 512), None, True, marks=SLOW), ((2, 97, 97, 64, 200), None, True),
     ((2, 97, 97, 64, 512), MosaicConfig(pad_positions=True), False)],
    ids=str,
)
def test_delta_is_summed_by_the_first_backward_kernel_where_one_serves(shape, config, summed_by_xla):
    # delta = sum_c dO·O: the one-CTA backward kernel (strips up to 128 pixels) sums it while it
    # streams dO, so no XLA reduction over the (B, H, W, Cv) channels remains; at 128x256 the
    # column pass goes first to do so. XLA sums it when both directions take the long-strip
    # kernels, and when the output's channels would need a padded copy for the kernel (200). With
    # H and W padded to 104 the output is padded with the rest, so that both layouts do the same
    # sums: on an H100 an XLA-summed delta made dq differ from the kernel-summed one in the last
    # bit at some pixels.
    cv = shape[-1]
    reductions = re.findall(rf"stablehlo\.reduce\(.*across dimensions = \[3\] : \(tensor<\d+x\d+x\d+x{cv}xf32>",
                            _exported(shape, jnp.bfloat16, backward=True, config=config))
    assert len(reductions) == int(summed_by_xla), reductions


@pytest.mark.parametrize(
    "wanted,cv,launched", [(1, 512, 1), (2, 512, 2), (4, 512, 4), (4, 384, 2), (2, 192, 1), (4, 200, 4)], ids=str
)
def test_value_splits_are_the_most_that_divide_the_value_tiles(wanted, cv, launched):
    # 384 channels are 6 tiles (not 4 splits: 2), 192 are 3 (1), and 200 are padded to 256 (4).
    assert value_splits(MosaicConfig(value_splits=wanted), round_up(cv, CHANNEL_TILE) // CHANNEL_TILE) == launched


def test_backward_at_128_pixels_and_128_channels_fits_shared_memory():
    # The tightest one-CTA backward: 128-key strips, two query/key channel tiles, the output's
    # ring beside V's and dO's (first pass) or the other direction's dV tiles (second pass).
    assert _custom_calls((1, 128, 128, 128, 512), jnp.bfloat16, backward=True) == ["mosaic_gpu_v2"] * 4


@pytest.mark.parametrize(
    "shape,config",
    [((1, 200, 200, 64, 512), None), ((1, 256, 256, 64, 512), None), ((1, 256, 64, 128, 512), None),
     ((1, 192, 192, 64, 512), MosaicConfig(stages=3)), ((1, 128, 128, 128, 512), MosaicConfig(stages=3))],
    ids=str,
)
def test_long_strips_and_wide_channels_fit_shared_memory(shape, config):
    # Two query warpgroups do not fit these in 227 KiB (Mosaic's own check rejected them); the
    # forward then runs one warpgroup per CTA.
    assert _custom_calls(shape, jnp.bfloat16, backward=False, config=config) == ["mosaic_gpu_v2"] * 2


def test_what_cannot_fit_is_refused_with_the_fix():
    q, k, v, _ = random_inputs(11, 1, 256, 3, 128, 64, jnp.bfloat16)
    with pytest.raises(ValueError, match="does not fit in an H100's shared memory; use MosaicConfig.stages=2."):
        criss_cross_attention(q, k, v, implementation="mosaic", interpret=True, config=MosaicConfig(stages=3))


@pytest.mark.parametrize(
    "shape,kernels",
    [pytest.param((2, 65, 129, 64, 512), 5, marks=SLOW), ((1, 128, 256, 64, 512), 5),
     pytest.param((1, 256, 256, 64, 512), 6, marks=SLOW),
     pytest.param((1, 192, 192, 64, 512), 6, marks=SLOW), pytest.param((1, 192, 150, 128, 64), 6, marks=SLOW)],
    ids=str,
)
def test_strips_past_128_export_as_mosaic_kernels_only(shape, kernels):
    # Two forward kernels, then per direction one backward kernel (strips up to 128 pixels) or a
    # query-side and a key-side kernel (longer strips). At 192x192 the key side's column pass
    # takes two warpgroups, the tightest fit (226 304 bytes by the estimate).
    assert _custom_calls(shape, jnp.bfloat16, backward=True) == ["mosaic_gpu_v2"] * kernels


def test_the_backward_that_fits_no_mosaic_kernel_takes_triton():
    # 128 query/key channels at 256 keys: the key side needs 229 KiB of shared memory.
    calls = _custom_calls((1, 200, 200, 128, 512), jnp.bfloat16, backward=True)
    assert calls[:2] == ["mosaic_gpu_v2"] * 2 and set(calls[2:]) == {"__gpu$xla.gpu.triton"}


@pytest.mark.parametrize(
    "device_kind,dtype,shape,call",
    [(H100, jnp.bfloat16, (2, 97, 97, 64, 512), "mosaic_gpu_v2"),
     ("NVIDIA H200", jnp.float16, (1, 33, 65, 5, 7), "mosaic_gpu_v2"),
     (H100, jnp.bfloat16, (1, 129, 257, 64, 512), "__gpu$xla.gpu.triton"),
     ("NVIDIA A100-SXM4-80GB", jnp.bfloat16, (2, 97, 97, 64, 512), "__gpu$xla.gpu.triton"),
     ("Tesla T4", jnp.float16, (1, 9, 17, 16, 32), None),
     (H100, jnp.float32, (1, 9, 17, 16, 32), None)],
    ids=str,
)
def test_the_default_exports_the_kernels_the_device_is_given(device_kind, dtype, shape, call):
    # implementation=None reads the target GPU off the abstract mesh it is lowered under. float32
    # stays on xla, where the Triton kernels measured 0.5-0.6x xla's speed on an H100, as do
    # GPUs before Ampere.
    calls = _custom_calls(shape, dtype, backward=True, implementation=None, device_kind=device_kind)
    assert set(calls) == ({call} if call else set()) and len(calls) >= (4 if call else 0)


def test_choice_of_implementation():
    def pick(requested, dtype=jnp.bfloat16, h=97, w=97, cqk=64, on_cuda=True, kind=H100, interpret=False):
        target = LoweringTarget(on_cuda, kind, cuda_arch(kind) if on_cuda else None)
        return choose(requested, dtype=dtype, h=h, w=w, cqk=cqk, target=target, interpret=interpret)

    a100 = "NVIDIA A100-SXM4-80GB"
    # Hopper, 16-bit, strips the Mosaic kernels take: them; past their limits, Triton.
    for requested in (None, "pallas"):
        assert pick(requested) == pick(requested, dtype=jnp.float16) == "mosaic"
        assert pick(requested, kind="NVIDIA H200") == pick(requested, h=256, w=1, cqk=128) == "mosaic"
        assert pick(requested, w=257) == pick(requested, cqk=129) == "triton"
        assert pick(requested, kind=a100) == "triton"
        assert pick(requested, interpret=True) == "triton"
    assert pick(None, dtype=jnp.float32) == "xla"
    assert pick("pallas", dtype=jnp.float32) == "triton"
    assert pick(None, on_cuda=False, kind="cpu") == "xla"
    assert pick(None, on_cuda=False, kind="cpu", interpret=True) == "triton"
    assert pick("mosaic") == "mosaic"
    assert pick("mosaic", on_cuda=False, kind="cpu", interpret=True) == "mosaic"
    with pytest.raises(ValueError, match="needs a Hopper GPU.*'triton'"):
        pick("mosaic", kind=a100)
    assert pick("mosaic", dtype=jnp.float32) == "mosaic"  # the forward on float16 pairs
    with pytest.raises(ValueError, match="float32 forward .* does not fit .* 129x97 map.*'triton'"):
        pick("mosaic", dtype=jnp.float32, h=129)
    with pytest.raises(ValueError, match="float32 forward .* does not fit .* with 128 query/key channels"):
        pick("mosaic", dtype=jnp.float32, cqk=128)
    with pytest.raises(ValueError, match="at most 256 pixels"):
        pick("mosaic", h=300)
    with pytest.raises(ValueError, match="at most 128 query/key channels"):
        pick("mosaic", cqk=256)
    with pytest.raises(ValueError, match="unknown implementation 'cuda'"):
        pick("cuda")
    # Before Ampere the Triton kernels cannot run well or at all: None takes xla there, and asking
    # for them says why. A GPU that no name says is taken for a new one.
    for old_gpu in ("Tesla T4", "Tesla V100-SXM2-16GB"):
        assert pick(None, kind=old_gpu) == pick(None, kind=old_gpu, dtype=jnp.float16) == "xla"
        for requested in ("triton", "pallas"):
            with pytest.raises(ValueError, match=r"needs an Ampere or newer GPU .* Tesla .*implementation='xla'"):
                pick(requested, kind=old_gpu)
        assert pick("triton", kind=old_gpu, interpret=True) == "triton"
    assert pick(None, kind="NVIDIA GeForce RTX 4090") == pick(None, kind="NVIDIA Z9000") == "triton"
    assert mosaic_unsupported(jnp.float16, 256, 256, 128) is None


def test_public_op_reports_mosaic_limits():
    q, k, v, _ = random_inputs(4, 1, 3, 130, 2, 2, jnp.float32)
    with pytest.raises(ValueError, match="implementation='mosaic' cannot serve this input"):
        criss_cross_attention(q, k, v, implementation="mosaic", interpret=True)
    if jax.default_backend() != "gpu":
        q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
        with pytest.raises(ValueError, match="needs a Hopper GPU"):
            criss_cross_attention(q, k, v, implementation="mosaic")
