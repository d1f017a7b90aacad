"""The authors' optimizer: SGD with momentum, L2 weight decay on the gradient, poly learning rate."""

from __future__ import annotations

import dataclasses

import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """lr * (1 - step / steps) ** power, SGD(momentum), weight decay added to the gradient."""

    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    power: float = 0.9


def poly_schedule(config: OptimizerConfig, steps: int) -> optax.Schedule:
    """The poly learning rate: `lr * (1 - step / steps) ** power`, 0 from `steps` on."""
    if steps <= 0:
        raise ValueError(f"the number of training steps must be positive, got {steps}")
    return optax.polynomial_schedule(
        init_value=config.learning_rate, end_value=0.0, power=config.power, transition_steps=steps
    )


def make_optimizer(config: OptimizerConfig, steps: int) -> optax.GradientTransformation:
    """torch.optim.SGD(momentum, weight_decay) with a poly schedule.

    torch adds `weight_decay * param` to the gradient before the momentum
    buffer (`buf = momentum * buf + grad`, first step `buf = grad`) and steps
    `param -= lr * buf`; the chain below is that, for every parameter
    (the authors decay BatchNorm and biases too).
    """
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay),
        optax.trace(decay=config.momentum, nesterov=False),
        optax.scale_by_learning_rate(poly_schedule(config, steps)),
    )
