"""The authors' optimizer (SGD with momentum, L2 weight decay on the gradient, poly learning rate) and AdamW.

AdamW is there for short runs from scratch, such as the CPU demo: it learns
the attention's query/key projections while gamma is still near zero, where
SGD's steps scale with gamma and barely move them.
"""

from __future__ import annotations

import optax

from ccnet_jax.config import OptimizerConfig


def poly_schedule(config: OptimizerConfig, steps: int) -> optax.Schedule:
    """The poly learning rate: `lr * (1 - step / steps) ** power`, 0 from `steps` on."""
    if steps <= 0:
        raise ValueError(f"the number of training steps must be positive, got {steps}")
    return optax.polynomial_schedule(
        init_value=config.learning_rate, end_value=0.0, power=config.power, transition_steps=steps
    )


def make_optimizer(config: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """`config.optimizer` with the poly schedule: "sgd" is torch.optim.SGD(momentum, weight_decay).

    torch adds `weight_decay * param` to the gradient before the momentum
    buffer (`buf = momentum * buf + grad`, first step `buf = grad`) and steps
    `param -= lr * buf`; the chain below is that, for every parameter
    (the authors decay BatchNorm and biases too). "adamw" is optax.adamw with
    b1 = momentum, b2 = 0.999 and the same schedule.
    """
    if config.optimizer == "adamw":
        return optax.adamw(poly_schedule(config, steps), b1=config.momentum, b2=0.999,
                           weight_decay=config.weight_decay)
    if config.optimizer != "sgd":
        raise ValueError(f"optimizer {config.optimizer!r} is not 'sgd' or 'adamw'")
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.trace(decay=config.momentum, nesterov=False),
        optax.scale_by_learning_rate(poly_schedule(config, steps)),
    )
