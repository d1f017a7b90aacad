"""Non-local block (Wang et al. 2018, embedded Gaussian), NHWC: the baseline CCA is compared with."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ccnet_jax.models.layers import batch_norm, check_count, check_nhwc, conv2d


class NonLocalBlock(nnx.Module):
    """y = x + BN(W · softmax(theta(x) phi(x)^T) g(x)).

    theta, phi and g are 1x1 convs C -> C/2 (with bias); every pixel attends
    to all H*W pixels, so the block materialises (H*W)^2 energies per image.
    W is a 1x1 conv back to C followed by BN whose scale starts at zero, so a
    fresh block is the identity (as the paper initialises it). No energy
    scaling, like CCA. Input and output (B, H, W, C).
    """

    def __init__(
        self,
        channels: int,
        *,
        inner_channels: int | None = None,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        check_count(channels, "channels", "NonLocalBlock")
        if inner_channels is not None:
            check_count(inner_channels, "inner_channels", "NonLocalBlock")
        inner = max(1, channels // 2) if inner_channels is None else inner_channels
        self.theta = conv2d(channels, inner, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.phi = conv2d(channels, inner, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.g = conv2d(channels, inner, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.out_conv = conv2d(inner, channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.out_bn = batch_norm(channels, dtype=dtype, rngs=rngs)
        self.out_bn.scale[...] = jnp.zeros_like(self.out_bn.scale[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.theta.in_features, "NonLocalBlock")
        b, h, w, _ = x.shape
        theta = self.theta(x).reshape(b, h * w, -1)
        phi = self.phi(x).reshape(b, h * w, -1)
        g = self.g(x).reshape(b, h * w, -1)
        energy = jnp.einsum("bpc,bqc->bpq", theta, phi, preferred_element_type=jnp.float32)
        attention = jax.nn.softmax(energy, axis=-1).astype(g.dtype)
        y = jnp.einsum("bpq,bqc->bpc", attention, g).reshape(b, h, w, -1)
        return x + self.out_bn(self.out_conv(y))
