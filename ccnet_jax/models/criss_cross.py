"""The criss-cross attention layer (NNX), NHWC: y = gamma * CCA(q, k, v) + x."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal, get_args

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ccnet_jax.models.layers import check_count, check_nhwc, conv2d
from pallas_kernels import (
    CrissCrossConfig,
    MosaicConfig,
    XlaConfig,
    criss_cross_attention,
    sharded_criss_cross_attention,
)
from pallas_kernels.criss_cross import criss_cross_attention_map
from pallas_kernels.criss_cross.api import check_batch_axes
from pallas_kernels.criss_cross.implementations import ALIASES, IMPLEMENTATIONS, Implementation, check_interpret
from pallas_kernels.criss_cross.residuals import keep_attention_residuals

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
# What the layer recomputes in the backward instead of keeping: nothing, its q/k/v projections,
# or everything between its input and its output (the attention's forward runs again).
Remat = Literal["none", "projections", "all"]
REMAT_LEVELS: tuple[str, ...] = get_args(Remat)


def check_remat(remat: object, where: str) -> None:
    """A ValueError naming the levels unless `remat` is one of them."""
    if remat not in REMAT_LEVELS:
        raise ValueError(f"{where}={remat!r}; use one of {', '.join(map(repr, REMAT_LEVELS))}.")


def check_attention_fn(attention_fn: object, where: str) -> None:
    """A TypeError naming AttentionOp unless `attention_fn` can be called (a name such as "xla" is
    what CCNetConfig(implementation=...) takes, not a layer's attention_fn)."""
    if not callable(attention_fn):
        hint = f"; for an implementation by name pass AttentionOp({attention_fn!r})" if isinstance(
            attention_fn, str) else ""
        raise TypeError(f"{where}: attention_fn must be a function of (q, k, v), got {attention_fn!r}{hint}.")


def check_implementation(implementation: object, where: str) -> None:
    """A ValueError naming the choices unless `implementation` is one of the op's (or None), so that
    a misspelt name fails where it was given rather than at the model's first call."""
    if implementation is not None and implementation not in IMPLEMENTATIONS + ALIASES:
        raise ValueError(
            f"{where}: unknown implementation {implementation!r}; use one of "
            f"{', '.join(map(repr, IMPLEMENTATIONS + ALIASES))} or None."
        )


def residual_dtype(x: jax.Array, out: jax.Array) -> jnp.dtype:
    """The dtype of gamma * out + x: the input's, unless it is an integer one, which would
    truncate the result; the projections promote such an input to a float, as the op's output is."""
    return x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else out.dtype


def _scale_add_float32(gamma: jax.Array, out: jax.Array, x: jax.Array) -> jax.Array:
    return gamma.astype(jnp.float32) * out.astype(jnp.float32) + x


# Recomputed in the backward: the residual kept for gamma's gradient is then `out` in its own
# dtype, not its float32 copy (which would double what a 16-bit layer keeps).
_scale_add_recomputed = jax.checkpoint(_scale_add_float32)


def scaled_residual(gamma: jax.Array, out: jax.Array, x: jax.Array) -> jax.Array:
    """gamma * out + x, computed in float32 and rounded once to `residual_dtype(x, out)`.

    gamma's gradient is a sum over all B·H·W·C products of the output's cotangent and `out`. In
    `out`'s own 16-bit dtype that sum would be accumulated in 16 bits: 7% off in bfloat16 at
    (2, 33, 33, 64) on the CPU, worse on a CCNet feature map. In float32 it is accurate, and the
    forward rounds once instead of twice."""
    return _scale_add_recomputed(gamma, out, x).astype(residual_dtype(x, out))


@dataclasses.dataclass(frozen=True)
class AttentionOp:
    """How criss-cross attention is computed: `op(q, k, v) -> out`, NHWC, the value a model hands
    down to its attention layers (CCNet -> RCCAHead -> CrissCrossAttention), as
    `flax.nnx.MultiHeadAttention` takes an `attention_fn`.

    implementation, interpret, kernel_config: as `pallas_kernels.criss_cross_attention` takes them
    ("xla", "triton", "mosaic", "pallas" or None = the best for the device and dtype).
    mesh, batch_axis: with a mesh the op runs under shard_map over the batch axis, which a Pallas
    kernel needs inside a jit whose batch is sharded (XLA does not partition a pallas_call).
    Any other function of (q, k, v) may stand in its place.
    """

    implementation: Implementation = None
    interpret: bool = False
    kernel_config: CrissCrossConfig | MosaicConfig | XlaConfig | None = None
    mesh: Mesh | None = None
    batch_axis: str | tuple[str, ...] = "data"

    def __post_init__(self):
        # Checked here, where the op is configured, not at the first call of a model built with it.
        check_implementation(self.implementation, "AttentionOp")
        check_interpret(self.interpret, "AttentionOp")
        if self.mesh is not None:
            check_batch_axes(self.mesh, self.batch_axis, "AttentionOp")
        configs = (CrissCrossConfig, MosaicConfig, XlaConfig)
        if self.kernel_config is not None and not isinstance(self.kernel_config, configs):
            raise ValueError(
                "AttentionOp: kernel_config must be a CrissCrossConfig, a MosaicConfig, an XlaConfig or None, "
                f"got {type(self.kernel_config).__name__}."
            )

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        kwargs = dict(implementation=self.implementation, interpret=self.interpret, config=self.kernel_config)
        if self.mesh is not None:
            return sharded_criss_cross_attention(q, k, v, mesh=self.mesh, batch_axis=self.batch_axis, **kwargs)
        return criss_cross_attention(q, k, v, **kwargs)


class CrissCrossAttention(nnx.Module):
    """Criss-cross attention with a learnt residual scale (Huang et al., CCNet).

    q and k are 1x1 convs C -> `qk_channels` (default C // 8) and v a 1x1
    conv C -> C, all with bias; `gamma` is a scalar initialised to 0, so a
    fresh layer is the identity. Input and output (B, H, W, C), the output in
    the input's dtype (an integer input gives the projections' float dtype).

    Args:
      channels: C.
      qk_channels: width of queries and keys; default max(1, C // 8).
      attention_fn: computes the attention from (q, k, v); an `AttentionOp`
        (the default picks the best implementation for the device).
      dtype: computation dtype of the projections and so of the attention
        (e.g. jnp.bfloat16 for the 16-bit kernels). None follows Flax: the
        input's dtype promoted with the float32 parameters, so a bfloat16
        input still attends in float32.
      remat: what the backward recomputes instead of keeping.
        "none": nothing; the layer keeps q, k, v and what the op keeps.
        "projections": the q, k, v projections; with the fused kernels the
          layer keeps its input, the attention output and a per-pixel
          log-sum-exp (with "xla" the attention is recomputed as well).
        "all": the projections and the attention's forward; the layer keeps
          its input alone, and the backward runs the forward kernels again.
    """

    def __init__(
        self,
        channels: int,
        *,
        qk_channels: int | None = None,
        attention_fn: AttentionFn = AttentionOp(),
        dtype: jnp.dtype | None = None,
        remat: Remat = "none",
        rngs: nnx.Rngs,
    ):
        check_count(channels, "channels", "CrissCrossAttention")
        if qk_channels is not None:
            check_count(qk_channels, "qk_channels", "CrissCrossAttention")
        check_remat(remat, "CrissCrossAttention: remat")
        check_attention_fn(attention_fn, "CrissCrossAttention")
        if remat != "none" and isinstance(attention_fn, AttentionOp) and attention_fn.interpret and (
                attention_fn.implementation == "mosaic"):
            raise ValueError(
                f"CrissCrossAttention: remat={remat!r} cannot run the Mosaic GPU interpreter (its host "
                "callbacks carry effects that jax.checkpoint cannot differentiate). Use remat on a "
                "GPU, or interpret=True with implementation='triton'."
            )
        qk_channels = max(1, channels // 8) if qk_channels is None else qk_channels
        self.query_conv = conv2d(channels, qk_channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.key_conv = conv2d(channels, qk_channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.value_conv = conv2d(channels, channels, 1, use_bias=True, dtype=dtype, rngs=rngs)
        self.gamma = nnx.Param(jnp.zeros((), jnp.float32))
        self.attention_fn = attention_fn
        self.remat = remat

    def attend(self, x: jax.Array) -> jax.Array:
        """The aggregated attention before gamma and the residual, (B, H, W, C)."""
        if self.remat == "projections":
            return nnx.remat(CrissCrossAttention._project_and_attend, policy=keep_attention_residuals())(self, x)
        return self._project_and_attend(x)

    def _project_and_attend(self, x: jax.Array) -> jax.Array:
        return self.attention_fn(self.query_conv(x), self.key_conv(x), self.value_conv(x))

    def _scaled_residual(self, x: jax.Array) -> jax.Array:
        return scaled_residual(self.gamma[...], self.attend(x), x)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_nhwc(x, self.value_conv.in_features, "CrissCrossAttention")
        if self.remat == "all":
            # gamma's gradient needs the attention output: recomputed too, it is not kept.
            return nnx.remat(CrissCrossAttention._scaled_residual)(self, x)
        return self._scaled_residual(x)

    def attention_map(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Attention weights for visualisation: a_col (B, H, W, H) and a_row (B, H, W, W), float32.

        For pixel (i, j), a_col[b, i, j, h] weighs pixel (h, j) (zero at h == i)
        and a_row[b, i, j, w] weighs pixel (i, w). Materialises H*W*(H+W) values.
        """
        check_nhwc(x, self.value_conv.in_features, "CrissCrossAttention.attention_map")
        return criss_cross_attention_map(self.query_conv(x), self.key_conv(x))
