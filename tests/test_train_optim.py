"""The optimizers against hand-written numpy updates, and the config's optimizer field."""

import numpy as np
import optax
import pytest

from ccnet_jax import config as config_lib
from ccnet_jax.train.optim import OptimizerConfig, make_optimizer

STEPS = 10


def _run(config: OptimizerConfig, grads: list[np.ndarray], param: np.ndarray) -> np.ndarray:
    tx = make_optimizer(config, STEPS)
    params = {"w": param.astype(np.float32)}
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update({"w": g.astype(np.float32)}, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["w"])


def _poly(config: OptimizerConfig, step: int) -> float:
    return config.learning_rate * (1 - step / STEPS) ** config.power


def test_sgd_is_torch_sgd_with_poly_lr():
    rng = np.random.default_rng(0)
    param, grads = rng.normal(size=5), [rng.normal(size=5) for _ in range(4)]
    config = OptimizerConfig(learning_rate=0.1, momentum=0.9, weight_decay=0.01, power=0.9)
    w, buf = param.copy(), None
    for step, g in enumerate(grads):
        d = g + config.weight_decay * w
        buf = d if buf is None else config.momentum * buf + d
        w = w - _poly(config, step) * buf
    np.testing.assert_allclose(_run(config, grads, param), w, rtol=1e-5, atol=1e-6)


def test_adamw_is_adam_with_decoupled_decay_and_poly_lr():
    rng = np.random.default_rng(1)
    param, grads = rng.normal(size=5), [rng.normal(size=5) for _ in range(4)]
    config = OptimizerConfig(learning_rate=0.01, momentum=0.8, weight_decay=0.05, power=0.9, optimizer="adamw")
    w, m, v = param.copy(), np.zeros(5), np.zeros(5)
    for step, g in enumerate(grads):
        m = config.momentum * m + (1 - config.momentum) * g
        v = 0.999 * v + 0.001 * g * g
        m_hat, v_hat = m / (1 - config.momentum ** (step + 1)), v / (1 - 0.999 ** (step + 1))
        w = w - _poly(config, step) * (m_hat / (np.sqrt(v_hat) + 1e-8) + config.weight_decay * w)
    np.testing.assert_allclose(_run(config, grads, param), w, rtol=1e-5, atol=1e-6)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="'sgd' or 'adamw'"):
        make_optimizer(OptimizerConfig(optimizer="adam"), STEPS)
    with pytest.raises(config_lib.ConfigError, match="train.optimizer must be one of"):
        config_lib.from_dict({"train": {"optimizer": "adam"}})
    assert config_lib.from_dict({"train": {"optimizer": "adamw"}}).train.optimizer == "adamw"
