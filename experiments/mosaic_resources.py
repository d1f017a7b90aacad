"""Registers and spills of every Mosaic GPU criss-cross kernel, compiled for an H100 on any machine.

Usage: python experiments/mosaic_resources.py [--shapes B,H,W,Cqk,Cv ...] [--configs NAME ...]

Needs jax's CUDA plugin (`pip install -e '.[cuda]'`), not a GPU: each shape's
forward+backward is compiled for sm_90a through a compile-only H100 topology
and ptxas's report is read back (pallas_kernels/criss_cross/mosaic_resources.py).
Prints one table: the registers ptxas reports are the launch bound (compute
warpgroups raise theirs to 232 with setmaxnreg); spills are what to watch.
"""

from __future__ import annotations

import argparse
import time

from pallas_kernels.criss_cross.mosaic_resources import mosaic_kernel_resources

SHAPES = [(2, 97, 97, 64, 512), (2, 65, 129, 64, 512), (1, 128, 256, 64, 512), (1, 192, 192, 64, 512),
          (1, 256, 256, 64, 512)]
CONFIGS = {
    "default": {},
    "1 warpgroup": {"query_warpgroups": 1},
    "2 stages": {"stages": 2},
    "padded H, W": {"pad_positions": True},
    "2 value splits": {"value_splits": 2},
    "persistent": {"persistent": True},
    "persistent, 1 wg": {"persistent": True, "query_warpgroups": 1},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=[",".join(map(str, s)) for s in SHAPES],
                        metavar="B,H,W,CQK,CV")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    args = parser.parse_args()
    print(f"{'shape (B,H,W,Cqk,Cv)':20} {'config':14} {'kernel':32} {'regs':>4} {'spill st/ld B':>13}")
    for text in args.shapes:
        shape = tuple(int(x) for x in text.split(","))
        for name in args.configs:
            started = time.perf_counter()
            for r in mosaic_kernel_resources(shape, args.dtype, CONFIGS[name]):
                spills = f"{r.spill_store_bytes}/{r.spill_load_bytes}"
                print(f"{text:20} {name:14} {r.name.removeprefix('criss_cross_mosaic_'):32} {r.registers:4d} "
                      f"{spills:>13}", flush=True)
            print(f"{'':20} {'':14} (compiled in {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
