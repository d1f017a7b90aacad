"""Building blocks with PyTorch semantics, NHWC.

PyTorch pads convolutions symmetrically by an explicit amount, pools with an
optional ceil mode and keeps BatchNorm running statistics with momentum 0.1;
the helpers here reproduce those rules so that converted weights give the
same outputs as the PyTorch network.
"""

from __future__ import annotations

import math
import numbers
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from ccnet_jax.models.atrous import DilatedConvs, conv_function
from ccnet_jax.models.max_pool import max_pool

Activation = Literal["relu", "leaky_relu", "none"]

# PyTorch's BatchNorm2d(momentum=0.1) keeps 0.9 of the old running value.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5
# The slope of InPlaceABN's default leaky ReLU, used by the authors' heads.
LEAKY_RELU_SLOPE = 0.01


def check_nhwc(x: jax.Array, channels: int | None, where: str) -> None:
    """A ValueError saying how to fix `x` unless it is (B, H, W, channels) (any C if None).

    Without it, an NCHW or unbatched array fails deep inside a conv or the op, in terms of a
    projection's shape the caller never passed."""
    shape = tuple(x.shape)
    c = channels if channels is not None else (shape[-1] if shape else "C")
    if len(shape) == 4 and shape[-1] == c:
        return
    if len(shape) == 3 and shape[-1] == c:
        hint = f"add the batch axis, x[None] is (1, {shape[0]}, {shape[1]}, {c})"
    elif len(shape) == 4 and shape[1] == c:
        hint = "this looks like NCHW; transpose it with x.transpose(0, 2, 3, 1)"
    elif len(shape) == 4:
        hint = f"the last axis must hold the {c} channels this module was built for"
    else:
        hint = "pass a batch of images with channels last"
    raise ValueError(f"{where} expects NHWC input (B, H, W, {c}); got shape {shape}: {hint}.")


def check_count(value: object, name: str, where: str, *, minimum: int = 1) -> None:
    """A ValueError naming `name` unless `value` is an integer >= `minimum` (a channel or class count,
    a recurrence).

    Without it a zero, negative or fractional count fails far from the constructor that took it: a
    ZeroDivisionError in the PyTorch-style init, an MLIR error or an empty query axis at the first
    call, or logits with no classes that no loss can use."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: {name} must be an integer >= {minimum}, got {value!r}.")


def check_rate(rate: object, name: str, where: str) -> None:
    """A ValueError unless `rate` is a probability in [0, 1]: Flax's dropout takes any number and,
    past 1, silently zeroes every channel, and below 0 rescales them all."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate <= 1:
        raise ValueError(f"{where}: {name} must be a probability in [0, 1], got {rate!r}.")


def torch_conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PyTorch's default Conv2d weight init (kaiming_uniform, a=sqrt(5)).

    That is U(-1/sqrt(fan_in), 1/sqrt(fan_in)); `shape` is the Flax kernel
    layout (kh, kw, in, out).
    """
    fan_in = math.prod(shape[:-1])
    bound = 1.0 / math.sqrt(fan_in)
    # Drawn flat: XLA:CPU compiles a rank-4 threefry draw ~10x slower than a rank-1 one.
    return jax.random.uniform(key, (math.prod(shape),), dtype, -bound, bound).reshape(shape)


def torch_bias_init(fan_in: int):
    """PyTorch's default conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    dilated_convs: DilatedConvs = "auto",
    use_bias: bool = False,
    dtype: jnp.dtype | None = None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An `nnx.Conv` that behaves like `torch.nn.Conv2d` with the same arguments.

    The padding is symmetric and explicit (never 'SAME'), so strided convs
    on odd sizes give PyTorch's floor((H + 2p - d(k-1) - 1)/s) + 1 outputs.
    Initialisation follows PyTorch's defaults. Input and output are NHWC.
    `dilated_convs` says how a dilated one is computed (`models.atrous`).
    """
    fan_in = in_channels * kernel_size * kernel_size
    return nnx.Conv(
        in_channels,
        out_channels,
        (kernel_size, kernel_size),
        strides=stride,
        padding=((padding, padding), (padding, padding)),
        kernel_dilation=dilation,
        conv_general_dilated=conv_function(dilated_convs),
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=torch_conv_kernel_init,
        bias_init=torch_bias_init(fan_in),
        rngs=rngs,
    )


def batch_norm(num_features: int, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """`nnx.BatchNorm` configured like PyTorch's BatchNorm2d (momentum 0.1, eps 1e-5).

    Running variance: Flax stores the biased batch variance where PyTorch
    stores the unbiased one; over the B*H*W >> 1 pixels of a segmentation
    batch the difference is negligible.
    """
    return nnx.BatchNorm(num_features, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)


def activate(x: jax.Array, activation: Activation) -> jax.Array:
    """ReLU, leaky ReLU with slope 0.01 (InPlaceABN's default) or identity."""
    if activation == "relu":
        return jax.nn.relu(x)
    if activation == "leaky_relu":
        return jax.nn.leaky_relu(x, negative_slope=LEAKY_RELU_SLOPE)
    if activation == "none":
        return x
    raise ValueError(f"unknown activation {activation!r}; use 'relu', 'leaky_relu' or 'none'.")


def _pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    span = size + 2 * padding - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # PyTorch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def max_pool2d(
    x: jax.Array, kernel_size: int = 3, stride: int = 2, padding: int = 1, ceil_mode: bool = False
) -> jax.Array:
    """`torch.nn.functional.max_pool2d` on NHWC input, including ceil_mode.

    Padding contributes -inf (it never wins the max); in ceil mode the right
    and bottom edges get just enough extra padding for the last window. The
    gradient goes to each window's first maximum, as PyTorch's does, without a
    scatter (`max_pool.max_pool`).
    """
    pads = []
    for size in x.shape[1:3]:
        out = _pool_output_size(size, kernel_size, stride, padding, ceil_mode)
        right = (out - 1) * stride + kernel_size - size - padding
        pads.append((padding, max(right, 0)))
    return max_pool(x, kernel_size, stride, tuple(pads))


class ConvBN(nnx.Module):
    """Conv2d, BatchNorm and an activation: PyTorch's Sequential(conv, bn[, act]).

    The attribute names `conv` and `bn` are the Sequential's entries 0 and 1
    in the weight converter. NHWC in, NHWC out.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        use_bias: bool = False,
        activation: Activation = "relu",
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        self.conv = conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            use_bias=use_bias,
            dtype=dtype,
            rngs=rngs,
        )
        self.bn = batch_norm(out_channels, dtype=dtype, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return activate(self.bn(self.conv(x)), self.activation)


def channel_dropout(rate: float, *, rngs: nnx.Rngs) -> nnx.Dropout:
    """PyTorch's Dropout2d on NHWC: whole channels of an image are dropped together."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2), rngs=rngs)
