"""What float32 criss-cross attention built from 16-bit matrix products would cost in accuracy.

Usage: python experiments/split_precision.py [--shapes B,H,W,Cqk,Cv ...] [--seeds 3] [--magnitude 1]

A float32 path on Hopper's tensor cores has two routes. TF32 operands
(wgmma's float32 mode) must be K-major on both sides, which the criss-cross
products are not (P·V, dV = Pᵀ·dO, dQ = dS·K and dK = dSᵀ·Q contract over
a side's leading axis), so that route needs transposed copies. bfloat16
operands transpose freely, and a float32 value x splits into bfloat16 parts:
    2 parts, hi + lo (16 bits of significand): a·b by 3 products (hi·hi, hi·lo, lo·hi);
    3 parts, hi + mid + lo (24 bits):          a·b by 6 products.
float16 parts hold 11 bits each but only float16's range: "f16x3" splits each
operand, scaled by a power of two from its largest magnitude, into two float16
parts (22 bits), a·b by 3 products, as the Triton kernels' float32_dot="f16x3"
does per tile (pallas_kernels.criss_cross.tile_products, whose split this uses
on whole operands); "f16x3 unscaled" skips the scale, which --magnitude 1e-3
shows is needed (q and k scale by at most 1, so that the softmax stays soft;
v and the cotangent by the magnitude).
This emulates both on the CPU, product by product as a kernel would form
them (float32 accumulation), for the forward and the analytic backward (each
of its five products split, not differentiated through the casts), and
prints the worst relative error of out, dq, dk and dv against the float64
dense reference over the seeds, beside the float32 tolerance the tests apply
(pallas_kernels.criss_cross.testing.tolerance). Each row names the split of
the products that feed the softmax (S = Q·Kᵀ, and dP = dO·Vᵀ) and of the
others.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.criss_cross import testing, tile_products

PARTS = {"bf16x1": 1, "bf16x3": 2, "bf16x6": 3}
PAIRS = ("f16x3", "f16x3 unscaled")


def split(x: jax.Array, parts: int) -> list[jax.Array]:
    """x (float32) as `parts` bfloat16 terms, largest first: each rounds what the others leave."""
    terms = []
    rest = x
    for _ in range(parts):
        term = rest.astype(jnp.bfloat16)
        terms.append(term)
        rest = rest - term.astype(jnp.float32)
    return terms


def split_product(equation: str, a: jax.Array, b: jax.Array, parts: int) -> jax.Array:
    """einsum(equation, a, b) from bfloat16 part products accumulated in float32, dropping the
    products below the last part's order (3 of 4 for two parts, 6 of 9 for three)."""
    a_parts, b_parts = split(a, parts), split(b, parts)
    total = jnp.zeros((), jnp.float32)
    for order in range(parts):  # smallest terms last, as a kernel would add them
        for i in range(order + 1):
            total = total + jnp.einsum(equation, a_parts[i], b_parts[order - i], preferred_element_type=jnp.float32)
    return total


def pair_product(equation: str, a: jax.Array, b: jax.Array, scaled: bool = True) -> jax.Array:
    """einsum(equation, a, b) from float16 pairs: lo·hi + hi·lo + hi·hi in float32, then unscaled."""
    if scaled:
        pairs = [tile_products.split(x) for x in (a, b)]
    else:
        pairs = []
        for x in (a, b):
            hi = x.astype(jnp.float16)
            pairs.append(tile_products.Pair(hi, (x - hi.astype(jnp.float32)).astype(jnp.float16), jnp.float32(1)))
    pa, pb = pairs

    def product(x, y):
        return jnp.einsum(equation, x, y, preferred_element_type=jnp.float32)

    total = product(pa.lo, pb.hi) + product(pa.hi, pb.lo) + product(pa.hi, pb.hi)
    return total * pa.unscale * pb.unscale


def _product(mode: str):
    if mode in PAIRS:
        return lambda equation, a, b: pair_product(equation, a, b, scaled=mode == "f16x3")
    return lambda equation, a, b: split_product(equation, a, b, PARTS[mode])


def attention_and_vjp(q, k, v, dout, softmax_mode: str, other_mode: str):
    """out, dq, dk, dv of dense criss-cross attention with every product split as the modes say
    (a PARTS or PAIRS name) for the products that feed the softmax and for the others."""
    b, h, w, _ = q.shape
    softmax_product, other_product = _product(softmax_mode), _product(other_mode)
    qf, kf, vf, gf = (x.reshape(b, h * w, -1) for x in (q, k, v, dout))
    mask = jnp.asarray(testing.criss_cross_mask(h, w))[None]
    scores = jnp.where(mask, softmax_product("bnc,bmc->bnm", qf, kf), -jnp.inf)
    p = jax.nn.softmax(scores, axis=-1)
    out = other_product("bnm,bmc->bnc", p, vf)
    dp = softmax_product("bnc,bmc->bnm", gf, vf)
    ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
    dq = other_product("bnm,bmc->bnc", ds, kf)
    dk = other_product("bnm,bnc->bmc", ds, qf)
    dv = other_product("bnm,bnc->bmc", p, gf)
    return [x.reshape(b, h, w, -1) for x in (out, dq, dk, dv)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1,16,16,64,128", "1,24,20,64,64", "2,12,13,8,16"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--magnitude", type=float, default=1.0,
                        help="scale of v and the cotangent (and of q and k, up to 1)")
    args = parser.parse_args()
    rows = [("bf16x1", "bf16x1"), ("bf16x3", "bf16x3"), ("bf16x6", "bf16x3"), ("bf16x3", "bf16x6"),
            ("bf16x6", "bf16x6"), ("f16x3 unscaled", "f16x3 unscaled"), ("f16x3", "f16x3")]
    print("worst relative error against the float64 reference over seeds; the float32 tolerance beside it")
    print(f"{'shape':16} {'S, dP':14} {'others':14} {'out':>9} {'dq':>9} {'dk':>9} {'dv':>9} {'tolerance':>10}")
    for text in args.shapes:
        shape = tuple(int(n) for n in text.split(","))
        tolerance = testing.tolerance(jnp.float32, shape[1] + shape[2])
        for softmax_split, other_split in rows:
            worst = np.zeros(4)
            for seed in range(args.seeds):
                q, k, v, g = testing.random_inputs(seed, *shape, jnp.float32)
                q, k = (x * jnp.float32(min(args.magnitude, 1.0)) for x in (q, k))
                v, g = (x * jnp.float32(args.magnitude) for x in (v, g))
                want = [testing.dense_forward(q, k, v), *testing.dense_vjp(q, k, v, g)]
                got = attention_and_vjp(q, k, v, g, softmax_split, other_split)
                worst = np.maximum(worst, [testing.relative_error(x, y) for x, y in zip(got, want)])
            errors = " ".join(f"{e:9.1e}" for e in worst)
            verdict = "within" if worst.max() <= tolerance else "past"
            print(f"{text:16} {softmax_split:14} {other_split:14} {errors} {tolerance:10.1e}  {verdict}", flush=True)


if __name__ == "__main__":
    main()
