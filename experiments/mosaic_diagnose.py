"""Where the Mosaic GPU kernels go wrong: each pass alone against a float64 reference.

Usage: python experiments/mosaic_diagnose.py [--interpret] [--shapes B,H,W,CQK,CV ...]

For each shape and each layout (swizzled-row TMA into two-view buffers, and
tiled TMA with H and W padded to multiples of 8), one line per check:
  row      the row pass alone: o_row and lse_row (softmax within each row);
  col      the column pass given the reference row result (the pixel itself
           masked), i.e. the merged output and lse;
  op       the whole forward through the op;
  bwd      the backward alone, from the reference output and lse.
A failing line says where the error sits: which strips, positions along the
strip and channel tiles hold wrong values, and how many are not finite.
Runs on a Hopper GPU, or under the Mosaic GPU interpreter with --interpret
(small shapes only). Exits 1 if any check is wrong or fails.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.criss_cross import mosaic_op
from pallas_kernels.criss_cross.config import MosaicConfig
from pallas_kernels.criss_cross.mosaic_forward import strip_forward_mosaic
from pallas_kernels.criss_cross.reference import criss_cross_attention_reference
from pallas_kernels.criss_cross.testing import random_inputs, tolerance

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


def check(shape, layout: str, interpret: bool) -> list[str]:
    b, h, w, cqk, cv = shape
    config = LAYOUTS[layout]
    q, k, v, g = random_inputs(hash(shape) % 1000, b, h, w, cqk, cv, jnp.bfloat16)
    tol = 4 * tolerance(jnp.bfloat16, h + w + max(cqk, cv))
    lines = []

    def run(name, thunk, pairs):
        try:
            results = jax.block_until_ready(thunk())
        except Exception as e:  # noqa: BLE001 - one failing check must not hide the others
            lines.append(f"{name:5} failed: {type(e).__name__}: {str(e)[:150]}")
            return
        for label, got, ref, axis in pairs(results):
            lines.append(f"{name:5} {label:7} {describe(got, ref, tol, axis)}")

    rows, cols, stages = mosaic_op.forward_strips(q, config, interpret)
    qp, kp, vp = (mosaic_op._pad(x, config) for x in (q, k, v))
    o_row, lse_row = strip_reference(q, k, v, "row")

    def row_pass():
        row = jax.jit(lambda q, k, v: strip_forward_mosaic(rows, q, k, v, interpret=interpret, stages=stages))
        out, lse = row(qp, kp, vp)
        return mosaic_op._unpad(out, v), mosaic_op.per_pixel(lse, rows)

    run("row", row_pass, lambda r: [("out", r[0], o_row, 1), ("lse", r[1], lse_row, 1)])

    o_col, lse_col = strip_reference(q, k, v, "col")
    lse_full = np.logaddexp(lse_row, lse_col)
    full = (np.exp(lse_row - lse_full)[..., None] * o_row + np.exp(lse_col - lse_full)[..., None] * o_col)

    def col_pass():
        prev_o = mosaic_op._pad(jnp.asarray(o_row, jnp.bfloat16), config)
        prev_lse = mosaic_op.per_strip(jnp.asarray(lse_row, jnp.float32), cols)

        def column(q, k, v, prev_o, prev_lse):
            return strip_forward_mosaic(cols, q, k, v, interpret=interpret, stages=stages,
                                        previous=(prev_o, prev_lse))

        out, lse = jax.jit(column)(qp, kp, vp, prev_o, prev_lse)
        return mosaic_op._unpad(out, v), mosaic_op.per_pixel(lse, cols)

    run("col", col_pass, lambda r: [("out", r[0], full, 2), ("lse", r[1], lse_full, 2)])
    run("op", lambda: jax.jit(lambda q, k, v: mosaic_op._forward(q, k, v, config, interpret))(q, k, v),
        lambda r: [("out", r[0], full, 1), ("lse", r[1], lse_full, 1)])

    upcast = [x.astype(jnp.float32) for x in (q, k, v, g)]
    grads = [_f64(x) for x in jax.vjp(criss_cross_attention_reference, *upcast[:3])[1](upcast[3])]
    residuals = (q, k, v, jnp.asarray(full, jnp.bfloat16), jnp.asarray(lse_full, jnp.float32))
    run("bwd", lambda: jax.jit(lambda r, g: mosaic_op._vjp_backward(config, interpret, r, g))(residuals, g),
        lambda r: [(n, x, ref, 1) for n, x, ref in zip(("dq", "dk", "dv"), r, grads)])
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="the Mosaic GPU interpreter on the CPU")
    parser.add_argument("--shapes", nargs="+", type=lambda s: tuple(int(x) for x in s.split(",")), default=SHAPES)
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=sorted(LAYOUTS))
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind}; interpret={args.interpret}", flush=True)
    wrong = 0
    for shape in args.shapes:
        for layout in args.layouts:
            for line in check(shape, layout, args.interpret):
                print(f"{str(shape):22} {layout:5} {line}", flush=True)
                wrong += " ok " not in line
    print(f"{wrong} checks wrong or failed")
    sys.exit(1 if wrong else 0)


if __name__ == "__main__":
    main()
