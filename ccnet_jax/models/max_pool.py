"""Max pooling of NHWC maps whose gradient is computed without a scatter.

The gradient that jax derives for `lax.reduce_window(max)` is XLA's
select-and-scatter. On a GPU XLA lowers it to a reduction that writes each
window's winning position as int32 indices (four maps of the output's size)
and a scatter-add with atomics into the padded input. For CCNet's stem
(2x385x385x128 in, bfloat16), compiled for an H100, that moves about 0.7 GB
more than the backward here, for a map of 76 MB.

Here the backward finds each window's winner again from the input, one
window offset at a time, and moves every window's gradient to its winner
with a strided pad: elementwise work that XLA fuses. The winner of a tie is
the first maximum in row-major window order, the rule of both XLA's
select-and-scatter and PyTorch's max_pool2d, so the gradient is the one jax
would give.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

Pads = tuple[tuple[int, int], tuple[int, int]]


def _window_view(padded: jax.Array, di: int, dj: int, out_shape: tuple[int, ...], stride: int) -> jax.Array:
    """padded[:, di + stride*i, dj + stride*j, :] for every output position (i, j)."""
    _, out_h, out_w, _ = out_shape
    limit = (padded.shape[0], di + stride * (out_h - 1) + 1, dj + stride * (out_w - 1) + 1, padded.shape[3])
    return jax.lax.slice(padded, (0, di, dj, 0), limit, (1, stride, stride, 1))


def _pad(x: jax.Array, pads: Pads, value) -> jax.Array:
    return jax.lax.pad(x, jnp.asarray(value, x.dtype), ((0, 0, 0), (*pads[0], 0), (*pads[1], 0), (0, 0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x: jax.Array, kernel: int, stride: int, pads: Pads) -> jax.Array:
    """Max over kernel x kernel windows of NHWC `x` at `stride`, after padding H and W by `pads`
    ((top, bottom), (left, right)) with -inf; (B, H', W', C) in x's dtype."""
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, kernel, kernel, 1), (1, stride, stride, 1), ((0, 0), *pads, (0, 0))
    )


def _forward(x, kernel, stride, pads):
    return max_pool(x, kernel, stride, pads), x


def _backward(kernel, stride, pads, x, grad):
    padded = _pad(x, pads, -jnp.inf)
    _, out_h, out_w, _ = grad.shape
    offsets = [(di, dj) for di in range(kernel) for dj in range(kernel)]
    # Each window's winner, by comparing its values with each other: the first strictly greater
    # one replaces the best so far, so a tie keeps the earliest. Not by equality with the output:
    # XLA may recompute x inside a fusion of this backward with other rounding than the
    # forward's, and a window whose maximum then matched nothing would drop its gradient.
    best = _window_view(padded, *offsets[0], grad.shape, stride)
    winner = jnp.zeros(grad.shape, jnp.int8 if len(offsets) < 128 else jnp.int32)
    for index, (di, dj) in enumerate(offsets[1:], start=1):
        values = _window_view(padded, di, dj, grad.shape, stride)
        better = values > best
        best = jnp.where(better, values, best)
        winner = jnp.where(better, jnp.asarray(index, winner.dtype), winner)
    grad_padded = jnp.zeros(padded.shape, grad.dtype)
    # An input in several windows sums their gradients in the order of the windows' positions,
    # as XLA's scatter adds them: the window below or to the right, where the input sits at an
    # earlier offset, comes later. So the sums round as jax's own gradient does.
    for index, (di, dj) in reversed(list(enumerate(offsets))):
        placement = ((0, 0, 0),
                     (di, padded.shape[1] - di - stride * (out_h - 1) - 1, stride - 1),
                     (dj, padded.shape[2] - dj - stride * (out_w - 1) - 1, stride - 1),
                     (0, 0, 0))
        grad_padded = grad_padded + jax.lax.pad(jnp.where(winner == index, grad, jnp.zeros((), grad.dtype)),
                                                jnp.zeros((), grad.dtype), placement)
    (top, _), (left, _) = pads
    batch, height, width, channels = x.shape
    return (jax.lax.slice(grad_padded, (0, top, left, 0), (batch, top + height, left + width, channels)),)


max_pool.defvjp(_forward, _backward)
