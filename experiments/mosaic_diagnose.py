"""Where the Mosaic GPU kernels go wrong: each pass alone against a float64 reference.

Usage: python experiments/mosaic_diagnose.py [--interpret] [--shapes B,H,W,CQK,CV ...]
                                             [--dtypes bfloat16 float32] [--layouts rows tiles]

For each shape, dtype and layout (swizzled-row TMA into two-view buffers, and
tiled TMA with H and W padded to multiples of 8), one line per check:
  row      the row pass alone: o_row and lse_row (softmax within each row);
  col      the column pass given the reference row result (the pixel itself
           masked), i.e. the merged output and lse;
  op       the whole forward through the op;
  bwd-row  one direction's backward alone, given the reference lse and
  bwd-col  delta: what its keys contribute to dq, dk and dv (for float32,
           dq comes from the query-side kernel, dk and dv from the key side);
  bwd      the whole backward, from the reference output and lse.
float32 runs the kernels on float16 pairs, the way the op does; a shape they
cannot take says why and is skipped. A failing line says where the error
sits: which strips, positions along the strip and channel tiles hold wrong
values, and how many are not finite. Runs on a Hopper GPU, or under the
Mosaic GPU interpreter with --interpret (small shapes only). Exits 1 if any
check is wrong or fails.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.criss_cross import mosaic_op
from pallas_kernels.criss_cross.config import MosaicConfig
from pallas_kernels.criss_cross.implementations import mosaic_unsupported
from pallas_kernels.criss_cross.mosaic_backward_pairs import pairs_unscale, strip_backward_pairs
from pallas_kernels.criss_cross.mosaic_forward import forward_unscale, strip_forward_mosaic
from pallas_kernels.criss_cross.mosaic_layout import MosaicStrips
from pallas_kernels.criss_cross.mosaic_split import map_scales
from pallas_kernels.criss_cross.testing import random_inputs, tolerance
from pallas_kernels.criss_cross.tile_products import split_images

# 97 pixels: strips whose length is not a multiple of 64; 128 query/key channels: two chunks;
# 150 pixels (192 keys): a forward CTA's second warpgroup past the keys; 200: the long backward.
SHAPES = [(1, 8, 64, 64, 64), (1, 8, 97, 64, 64), (2, 97, 97, 64, 512), (1, 8, 128, 64, 64), (1, 8, 64, 128, 128),
          (1, 8, 150, 64, 64), (1, 8, 200, 64, 64)]
LAYOUTS = {"rows": MosaicConfig(), "tiles": MosaicConfig(pad_positions=True)}


def _f64(x) -> np.ndarray:
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def strip_reference(q, k, v, direction: str):
    """Attention within each row (or column, the pixel itself masked): out (B,H,W,Cv), lse (B,H,W)."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    if direction == "col":
        q, k, v = (np.swapaxes(x, 1, 2) for x in (q, k, v))
    e = np.einsum("bswc,bsxc->bswx", q, k)
    if direction == "col":
        e = np.where(np.eye(e.shape[-1], dtype=bool), -np.inf, e)
    m = e.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(e - m).sum(-1))
    out = np.einsum("bswx,bsxc->bswc", np.exp(e - lse[..., None]), v)
    if direction == "col":
        out, lse = np.swapaxes(out, 1, 2), np.swapaxes(lse, 1, 2)
    return out, lse


def _ranges(indices) -> str:
    idx = sorted(set(int(i) for i in indices))
    if not idx:
        return "-"
    parts, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            if b is not None:
                start = b
    text = ",".join(parts)
    return text if len(text) < 60 else text[:57] + "..."


def describe(got, ref, tol: float, strip_axis: int) -> str:
    """'ok err' or where the wrong values of an NHWC (or B,H,W) array are."""
    got = _f64(got)
    finite = np.isfinite(got)
    err = float(np.linalg.norm(np.where(finite, got, 0) - ref) / max(np.linalg.norm(ref), 1e-30))
    if finite.all() and err < tol:
        return f"ok   {err:.2e}"
    scale = np.abs(ref).max() + 1e-30
    bad = ~finite | (np.abs(np.where(finite, got, 0) - ref) > 0.05 * scale)
    where = np.nonzero(bad)
    along = 2 if strip_axis == 1 else 1
    text = (f"BAD  {err:.2e}  bad {bad.mean():.1%} nonfinite {(~finite).sum()}  strips {_ranges(where[strip_axis])}"
            f"  positions {_ranges(where[along])}")
    if got.ndim == 4:
        text += f"  channel tiles {_ranges(where[3] // 64)}"
    return text


def strip_gradients(q, k, v, g, lse, delta, direction: str):
    """float64 (dq, dk, dv): what one direction's keys contribute to the criss-cross VJP, given the
    merged per-pixel lse and delta = sum_c dO·O (B, H, W). The two directions' sum is the VJP."""
    q, k, v, g = (_f64(x) for x in (q, k, v, g))
    lse, delta = np.asarray(lse, np.float64), np.asarray(delta, np.float64)
    if direction == "col":
        q, k, v, g = (np.swapaxes(x, 1, 2) for x in (q, k, v, g))
        lse, delta = np.swapaxes(lse, 1, 2), np.swapaxes(delta, 1, 2)
    e = np.einsum("bswc,bsxc->bswx", q, k)
    p = np.exp(e - lse[..., None])
    if direction == "col":
        p = np.where(np.eye(e.shape[-1], dtype=bool), 0.0, p)
    ds = p * (np.einsum("bswc,bsxc->bswx", g, v) - delta[..., None])
    grads = (np.einsum("bswx,bsxc->bswc", ds, k), np.einsum("bswx,bswc->bsxc", ds, q),
             np.einsum("bswx,bswc->bsxc", p, g))
    return tuple(np.swapaxes(x, 1, 2) for x in grads) if direction == "col" else grads


def _forward_operands(q, k, v, config: MosaicConfig) -> tuple:
    """(q, k, v, launch arguments) as the op hands them to the forward kernels: padded, and for
    float32 q and k split into float16 pairs, with each image's unscales and v's scale."""
    qp, kp, vp = (mosaic_op._pad(x, config) for x in (q, k, v))
    if q.dtype != jnp.float32:
        return qp, kp, vp, {}
    q_pair, k_pair = split_images(qp), split_images(kp)
    unscale = forward_unscale(q_pair.unscale, k_pair.unscale, map_scales(vp))
    return (q_pair.hi, q_pair.lo), (k_pair.hi, k_pair.lo), vp, {"unscale": unscale}


def _direction_backward(strips, q, k, v, g, lse, delta, config: MosaicConfig, interpret: bool):
    """One direction's (dq, dk, dv) from the kernels, given lse and delta (B, H, W) float32: the
    one-CTA or long kernels for 16-bit inputs, the query side (dq) and key side (dk, dv) on float16
    pairs for float32 (q and k split by XLA, v and dO by the kernels)."""
    qp, kp, vp, gp = (mosaic_op._pad(x, config) for x in (q, k, v, g))
    if q.dtype == jnp.float32:
        q_pair, k_pair = split_images(qp), split_images(kp)
        unscale = pairs_unscale(q_pair.unscale, k_pair.unscale, map_scales(vp), map_scales(gp))
        grads = strip_backward_pairs(strips, (q_pair.hi, q_pair.lo), (k_pair.hi, k_pair.lo), vp, gp,
                                     mosaic_op.per_strip(lse, strips), mosaic_op.per_strip(delta, strips), unscale,
                                     interpret=interpret)
    else:
        grads, _ = mosaic_op._backward_pass(strips, q=qp, k=kp, v=vp, dout=gp, lse=lse, delta=delta,
                                            interpret=interpret, orders=mosaic_op.image_orders(config))
    return tuple(mosaic_op._unpad(x, like) for x, like in zip(grads, (q, k, v)))


def check(shape, layout: str, dtype, interpret: bool) -> list[str]:
    b, h, w, cqk, cv = shape
    config = LAYOUTS[layout]
    unsupported = mosaic_unsupported(dtype, h, w, cqk)
    if unsupported is not None:
        return [f"skipped: {unsupported}"]
    q, k, v, g = random_inputs(hash(shape) % 1000, b, h, w, cqk, cv, dtype)
    tol = 4 * tolerance(dtype, h + w + max(cqk, cv))
    lines = []

    def run(name, thunk, pairs):
        try:
            results = jax.block_until_ready(thunk())
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            lines.append(f"{name:7} failed: {type(e).__name__}: {str(e)[:150]}")
            return
        for label, got, ref, axis in pairs(results):
            lines.append(f"{name:7} {label:7} {describe(got, ref, tol, axis)}")

    rows, cols, stages = mosaic_op.forward_strips(q, config, interpret)
    launch = dict(interpret=interpret, stages=stages)
    o_row, lse_row = strip_reference(q, k, v, "row")

    def row_pass():
        def row(q, k, v):
            *operands, extra = _forward_operands(q, k, v, config)
            return strip_forward_mosaic(rows, *operands, **launch, **extra)

        out, lse = jax.jit(row)(q, k, v)
        return mosaic_op._unpad(out, v), mosaic_op.per_pixel(lse, rows)

    run("row", row_pass, lambda r: [("out", r[0], o_row, 1), ("lse", r[1], lse_row, 1)])

    o_col, lse_col = strip_reference(q, k, v, "col")
    lse_full = np.logaddexp(lse_row, lse_col)
    full = (np.exp(lse_row - lse_full)[..., None] * o_row + np.exp(lse_col - lse_full)[..., None] * o_col)
    # The output and the row result are float32 for float32 inputs (pairs), else in the inputs' dtype.
    lse_f32, full_as_output = jnp.asarray(lse_full, jnp.float32), jnp.asarray(full, dtype)

    def col_pass():
        def column(q, k, v, prev_o, prev_lse):
            *operands, extra = _forward_operands(q, k, v, config)
            return strip_forward_mosaic(cols, *operands, **launch, **extra, previous=(prev_o, prev_lse))

        prev_o = mosaic_op._pad(jnp.asarray(o_row, dtype), config)
        prev_lse = mosaic_op.per_strip(jnp.asarray(lse_row, jnp.float32), cols)
        out, lse = jax.jit(column)(q, k, v, prev_o, prev_lse)
        return mosaic_op._unpad(out, v), mosaic_op.per_pixel(lse, cols)

    run("col", col_pass, lambda r: [("out", r[0], full, 2), ("lse", r[1], lse_full, 2)])
    run("op", lambda: jax.jit(lambda q, k, v: mosaic_op._forward(q, k, v, config, interpret)[:2])(q, k, v),
        lambda r: [("out", r[0], full, 1), ("lse", r[1], lse_full, 1)])

    delta = np.sum(_f64(g) * _f64(full_as_output), axis=-1)
    per_direction = {d: strip_gradients(q, k, v, g, lse_full, delta, d) for d in ("row", "col")}
    row_tma = mosaic_op._row_tma(config, interpret)
    for direction, axis in (("row", 1), ("col", 2)):
        # The float32 kernels run one warpgroup a CTA; the one-CTA 16-bit backward takes the strip's.
        strips = MosaicStrips(direction, b, h, w, max_query_warpgroups=1 if dtype == jnp.float32 else 2,
                              row_tma=row_tma)
        if dtype != jnp.float32 and not mosaic_op._backward_fits(strips, q):
            lines.append(f"bwd-{direction} skipped: the Triton backward serves these strips")
            continue
        references = per_direction[direction]

        def direction_pass(strips=strips):
            backward = jax.jit(lambda *args: _direction_backward(strips, *args, config, interpret))
            return backward(q, k, v, g, lse_f32, jnp.asarray(delta, jnp.float32))

        run(f"bwd-{direction}", direction_pass,
            lambda r, references=references, axis=axis: [(n, x, ref, axis)
                                                         for n, x, ref in zip(("dq", "dk", "dv"), r, references)])

    grads = [x + y for x, y in zip(*per_direction.values())]
    v_scales = map_scales(mosaic_op._pad(v, config)) if dtype == jnp.float32 else None
    residuals = (q, k, v, full_as_output, lse_f32, v_scales)
    run("bwd", lambda: jax.jit(lambda r, g: mosaic_op._vjp_backward(config, interpret, r, g))(residuals, g),
        lambda r: [(n, x, ref, 1) for n, x, ref in zip(("dq", "dk", "dv"), r, grads)])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="the Mosaic GPU interpreter on the CPU")
    parser.add_argument("--shapes", nargs="+", type=lambda s: tuple(int(x) for x in s.split(",")), default=SHAPES)
    parser.add_argument("--dtypes", nargs="+", choices=("bfloat16", "float16", "float32"), default=["bfloat16"])
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=sorted(LAYOUTS))
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; interpret={args.interpret}", flush=True)
    wrong = 0
    for dtype in args.dtypes:
        for shape in args.shapes:
            for layout in args.layouts:
                for line in check(shape, layout, jnp.dtype(dtype), args.interpret):
                    print(f"{dtype:8} {str(shape):22} {layout:5} {line}", flush=True)
                    wrong += " BAD " in line or " failed: " in line
    print(f"{wrong} checks wrong or failed")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
