"""Criss-cross attention kernel variants, timed side by side: which tiling or launch wins on this card.

Usage: python experiments/tune_attention.py [--shape B H W Cqk Cv] [--dtypes ...] [--iters N]
                                           [--variants NAME ...] [--profile]

For each dtype, the default Triton tiling and variants of it (warps, blocks,
Cv tiles, stages; for float32 the product mode, and xla's products as six
bfloat16 ones) and, on Hopper for
16-bit inputs, the Mosaic kernels' launch options (and the padded layout
they used before moving rows by TMA), for float32 their float16-pair forward
and backward where they hold the map, run forward+backward
with the timing of bench_attention.py (back-to-back calls over rotated
inputs), next to the xla implementation; each one's output and gradients
are compared with xla's at full float32 matmul precision (relative norm
error of the worst of out, dq, dk, dv; plain xla on a GPU multiplies
float32 in TF32), so that a fast but wrong tiling shows as such. With
--profile, one more forward+backward call of each variant is traced and
its busiest kernels are listed under its row, with their device time.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import INPUT_SETS, per_call_ms, random_arguments
from bench_common import positive_int

from ccnet_jax.trace_times import busiest_lines, busy_times
from pallas_kernels import MosaicConfig, XlaConfig, criss_cross_attention, default_config
from pallas_kernels.criss_cross.implementations import is_hopper, lowering_target, mosaic_unsupported

PROFILE_KERNELS = 8  # kernels listed per variant with --profile


def variants(base, dtype) -> dict[str, object]:
    """Named tilings derived from `base` (the default for the shape); a variant that is the
    default itself at this shape is left out."""

    def change(**fields):
        return dataclasses.replace(base, **fields)

    out = {
        "default": base,
        "fwd 8 warps": change(fwd_num_warps=8),
        "bwd 8 warps": change(bwd_num_warps=8),
        "all 8 warps": change(fwd_num_warps=8, bwd_num_warps=8),
        "stages 3": change(fwd_num_stages=3, bwd_num_stages=3),
        "blocks 128, 8 warps": change(block_q=128, block_k=128, fwd_num_warps=8, bwd_num_warps=8),
        # The 16-bit default below 129 pixels before 2026-11-27: two blocks per 97-pixel strip, so
        # the dK/dQ kernel writes float32 dQ partial sums that XLA adds up.
        "blocks 64, 4 warps": change(block_q=64, block_k=64, fwd_num_warps=4, bwd_num_warps=4),
        # Q·Kᵀ twice per query block instead of once per 128-channel tile (Cv 512 in one tile
        # spills), in the forward and in the dV kernel, whose channel tile block_cv also sets; with
        # 64-pixel blocks and 4 warps that dV kernel spills, with 8 nothing does.
        "Cv 256, 8 warps": change(block_cv=256, fwd_num_warps=8, bwd_num_warps=8),
        # Every kernel taking the Cv tiles first to last, as before the second direction's forward
        # and dV kernels turned back from the last tile (CrissCrossConfig.alternate_cv_order).
        "Cv tiles in one order": change(alternate_cv_order=False),
    }
    if jnp.dtype(dtype) == jnp.float32:
        out = {
            "default": base,
            # The default before 2026-11-27: three TF32 products per tile and two backward stages, 12%
            # slower forward+backward than bf16x6 (two stages too) on an H100 at (2, 97, 97, 64, 512),
            # as accurate.
            "tf32x3": change(float32_dot="tf32x3", bwd_num_stages=2),
            "32-pixel blocks (mma.sync)": change(block_q=32, block_k=32, dkq_block_k=None, bwd_block_cv=32),
            "dK/dQ key block 32": change(dkq_block_k=32),
            # The default takes one backward stage where strips end inside a block (97x97), two
            # elsewhere: with two, the column dV kernel spills 24 bytes at 97x97 (Triton 3.9, sm_90);
            # with one, 8 at 128x256. One of these two is the default at any shape.
            "bwd 1 stage": change(bwd_num_stages=1),
            "bwd 2 stages": change(bwd_num_stages=2),
            "tf32": change(float32_dot="tf32"),
            "tf32, 8 warps": change(float32_dot="tf32", fwd_num_warps=8, bwd_num_warps=8),
            # One 128-pixel block per strip: half the CTAs. At 8 warps and two backward stages (as an
            # H100 timed it) its forward holds 177-180 registers a thread with bf16x6 (TF32x3:
            # 254-255), and no kernel spills at 97x97 (sm_90, compiled on CPU).
            "blocks 128, 8 warps": change(block_q=128, block_k=128, fwd_num_warps=8, bwd_num_warps=8,
                                          bwd_num_stages=2),
            # Two scaled float16 parts per float32 tile and three part products (tile_products): half
            # of bf16x6's products from two thirds of its parts. Compiled for sm_90 on the CPU
            # (Triton 3.9) no kernel spills at 97x97 or 128x256 with the default tiling, and half
            # the matrix instructions of bf16x6 (24 wgmma against 48 in the forward and dV kernels,
            # 21 + 24 mma.sync against 42 + 48 in the dK/dQ kernel).
            "f16x3": change(float32_dot="f16x3"),
            # With f16x3 the dK/dQ kernel holds 64-key blocks without spilling at 8 warps (bf16x6
            # spills 176-216 bytes there at 4 warps, 448-528 at 8): wgmma only, a quarter of the dQ
            # partial sums.
            "f16x3, dK/dQ key block 64, 8 bwd warps": change(float32_dot="f16x3", dkq_block_k=64, bwd_num_warps=8),
            # One 128-pixel block per strip at 8 warps: no spills at 97x97 (128 bytes in the row
            # forward at 128x256).
            "f16x3, blocks 128, 8 warps": change(float32_dot="f16x3", block_q=128, block_k=128, fwd_num_warps=8,
                                                bwd_num_warps=8),
            # The xla implementation's own products as six bfloat16 ones (XLA's Triton GEMMs) instead
            # of exact float32.
            "xla, bf16x6 dots": XlaConfig(float32_products="bf16x6"),
        }
    return {name: config for name, config in out.items() if name == "default" or config != base}


def mosaic_variants() -> dict[str, MosaicConfig]:
    """Named launch options of the Mosaic kernels (16-bit inputs on Hopper)."""
    return {
        "mosaic": MosaicConfig(),
        # Every kernel taking the images first to last, as before the column pass and the second
        # backward kernel turned back from the last image (MosaicConfig.alternate_image_order).
        "mosaic, images in one order": MosaicConfig(alternate_image_order=False),
        "mosaic, 1 warpgroup": MosaicConfig(query_warpgroups=1),
        "mosaic, 2 stages": MosaicConfig(stages=2),
        "mosaic, 1 warpgroup, 2 stages": MosaicConfig(query_warpgroups=1, stages=2),
        "mosaic, H and W padded": MosaicConfig(pad_positions=True),
        # One forward CTA per strip is 194 at (2, 97, 97), a wave and a half on 132 SMs.
        "mosaic, 2 value splits": MosaicConfig(value_splits=2),
        "mosaic, 2 stages, 2 value splits": MosaicConfig(stages=2, value_splits=2),
        "mosaic, 1 warpgroup, 2 value splits": MosaicConfig(query_warpgroups=1, value_splits=2),
        # One CTA per SM looping over the strips, the next strip's queries and keys loading under
        # the current one's value tiles; with 2 value splits, 388 items at (2, 97, 97) over 132 CTAs.
        "mosaic, persistent": MosaicConfig(persistent=True),
        "mosaic, persistent, 2 value splits": MosaicConfig(persistent=True, value_splits=2),
        "mosaic, persistent, 1 warpgroup": MosaicConfig(persistent=True, query_warpgroups=1),
    }


def select_variants(configs: dict[str, object], wanted: list[str], dtype_name: str) -> dict[str, object]:
    """The xla baseline and the `wanted` variants of `configs`, in their order; SystemExit naming
    the variants this card and dtype have if one of `wanted` is not among them."""
    unknown = [name for name in wanted if name not in configs]
    if unknown:
        raise SystemExit(f"unknown variants for {dtype_name}: {unknown}; this card and dtype have {list(configs)} "
                         "(a variant that is the default at this shape is listed only as 'default')")
    return {name: config for name, config in configs.items() if name == "xla" or name in wanted}


def relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=positive_int, nargs=5, default=[2, 97, 97, 64, 512],
                        metavar=("B", "H", "W", "CQK", "CV"))
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--iters", type=positive_int, default=10)
    parser.add_argument("--calls", type=positive_int, default=20)
    parser.add_argument("--variants", nargs="+", metavar="NAME",
                        help="run only these variants (xla always runs, as the baseline), e.g. "
                             "'default' 'blocks 64, 4 warps' 'mosaic' 'mosaic, 2 stages'")
    parser.add_argument("--profile", action="store_true",
                        help="trace one more forward+backward call per variant and list its busiest kernels")
    args = parser.parse_args()
    if jax.default_backend() != "gpu":
        raise SystemExit("tune_attention.py times the Triton kernels and needs a CUDA GPU")
    shape = tuple(args.shape)
    print(f"device: {jax.devices()[0].device_kind}; shape {shape}; per call, median of {args.iters} rounds "
          f"of {args.calls} back-to-back calls over {INPUT_SETS} input sets")
    print(f"{'dtype':9} {'variant':36} {'fwd ms':>8} {'fwd+bwd ms':>10} {'vs xla':>7} {'max rel err':>11}")
    for dtype_name in args.dtypes:
        dtype = jnp.dtype(dtype_name)
        arg_sets = [random_arguments(seed, shape, dtype) for seed in range(INPUT_SETS)]
        b, h, w, cqk, cv = shape
        arch = lowering_target(arg_sets[0][0]).arch
        configs = {"xla": None, **variants(default_config(h, w, cqk, cv, dtype.itemsize, arch), dtype)}
        if is_hopper(jax.devices()[0].device_kind) and mosaic_unsupported(dtype, h, w, cqk) is None:
            # float32: one query warpgroup and two stages are all its float16 pairs leave room for.
            configs.update(mosaic_variants() if dtype.itemsize == 2 else {"mosaic": MosaicConfig()})
        if args.variants:
            configs = select_variants(configs, args.variants, dtype_name)
        reference, xla_ms = None, float("nan")
        for name, config in configs.items():
            impl = ("xla" if config is None or isinstance(config, XlaConfig)
                    else "mosaic" if isinstance(config, MosaicConfig) else "triton")

            def op(q, k, v, config=config, impl=impl):
                return criss_cross_attention(q, k, v, implementation=impl, config=config)

            def fwd_bwd(q, k, v, g, op=op):
                out, vjp = jax.vjp(op, q, k, v)
                return (out, *vjp(g))

            fwd, fb = jax.jit(op), jax.jit(fwd_bwd)
            if reference is None:
                with jax.default_matmul_precision("highest"):
                    reference = jax.jit(fwd_bwd)(*arg_sets[0])
            try:
                results = fb(*arg_sets[0])
                fwd_ms = per_call_ms(fwd, [a[:3] for a in arg_sets], args.iters, args.calls)
                fb_ms = per_call_ms(fb, arg_sets, args.iters, args.calls)
            except Exception as e:  # a tiling that does not compile or fit on this card
                print(f"{dtype_name:9} {name:36} failed: {type(e).__name__}: {str(e)[:100]}", flush=True)
                continue
            if config is None:
                xla_ms = fb_ms
            error = max(relative_error(x, r) for x, r in zip(results, reference))
            print(f"{dtype_name:9} {name:36} {fwd_ms:8.3f} {fb_ms:10.3f} {xla_ms / fb_ms:6.2f}x {error:11.2e}",
                  flush=True)
            if args.profile:
                # Which kernel holds the time (the dV or the dK/dQ kernel, a GEMM or a softmax
                # fusion) is what the next change of the slow paths needs; a profiler that fails
                # costs this variant its profile, not the variants after it.
                try:
                    lines = busiest_lines(busy_times(lambda fb=fb: fb(*arg_sets[0])), PROFILE_KERNELS)
                except Exception as e:
                    lines = [f"  profile failed: {type(e).__name__}: {str(e)[:100]}"]
                print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
