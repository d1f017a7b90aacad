"""Sizes, parameter counts, configuration checks and BatchNorm train/eval behaviour."""

import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccnet_jax import numpy_reference as ref
from ccnet_jax.models import CCNet, CCNetConfig, ConvBN, ResNet, ResNetConfig

TINY = CCNetConfig(num_classes=ref.TINY_CLASSES, width=ref.TINY_WIDTH, blocks=ref.TINY_BLOCKS, implementation="xla")


def count(module, variable_type):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, variable_type)))


def abstract_forward(model, shape):
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.fixture(scope="module")
def abstract_ccnet101():
    return nnx.eval_shape(lambda: CCNet(19, depth=101, recurrence=2, stem="deep", rngs=nnx.Rngs(0)))


def test_authors_network_counts(abstract_ccnet101):
    assert count(abstract_ccnet101, nnx.Param) == 71_287_911
    assert count(abstract_ccnet101, nnx.BatchStat) == 109_824


@pytest.mark.parametrize("depth, with_fc", [(50, 25_557_032), (101, 44_549_160)])
def test_torchvision_backbone_counts(depth, with_fc):
    # torchvision's published totals, less its fc layer (2048 x 1000 + 1000).
    backbone = nnx.eval_shape(lambda: ResNet(ResNetConfig(depth=depth, stem="torchvision"), rngs=nnx.Rngs(0)))
    assert count(backbone, nnx.Param) == with_fc - 2_049_000


@pytest.mark.parametrize("size, out", [(769, 97), (97, 13)])
def test_output_stride_8_sizes(abstract_ccnet101, size, out):
    main, aux = abstract_forward(abstract_ccnet101, (1, size, size, 3))
    assert main.shape == (1, out, out, 19) and aux.shape == (1, out, out, 19)
    assert main.dtype == jnp.float32


def test_backbone_features_and_output_stride_16():
    backbone = nnx.eval_shape(lambda: ResNet(ResNetConfig(depth=50, output_stride=16), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(backbone)
    images = jax.ShapeDtypeStruct((2, 769, 513, 3), jnp.float32)
    c3, c4 = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
    assert c3.shape == (2, 49, 33, 1024) and c4.shape == (2, 49, 33, 2048)


def test_dilations_and_multi_grid():
    backbone = nnx.eval_shape(lambda: ResNet(ResNetConfig(depth=50, multi_grid=(1, 2, 4)), rngs=nnx.Rngs(0)))
    assert [b.conv2.kernel_dilation for b in backbone.layer3] == [2] * 6
    assert [b.conv2.kernel_dilation for b in backbone.layer4] == [4, 8, 16]
    assert [b.conv2.padding for b in backbone.layer4] == [((d, d), (d, d)) for d in (4, 8, 16)]
    assert backbone.layer2[0].conv2.strides == 2 and backbone.layer3[0].conv2.strides == 1


def test_configuration_errors_say_what_to_do():
    with pytest.raises(ValueError, match="depth 34"):
        ResNetConfig(depth=34)
    with pytest.raises(ValueError, match="output_stride"):
        CCNetConfig(output_stride=4)
    with pytest.raises(ValueError, match="num_classes"):
        CCNet(rngs=nnx.Rngs(0))
    config = CCNetConfig(num_classes=7, width=8, blocks=(1, 2, 3, 1), multi_grid=(1, 2))
    assert CCNetConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"unknown field\(s\) model.classes"):
        CCNetConfig.from_dict({"num_classes": 3, "classes": 3})
    with pytest.raises(ValueError, match="model.blocks must have 4 entries"):
        CCNetConfig.from_dict({"num_classes": 3, "blocks": [1, 2]})


def test_model_rejects_nchw_input():
    model = nnx.eval_shape(lambda: CCNet(3, depth=50, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="NHWC"):
        abstract_forward(model, (1, 3, 65, 65))


def test_batch_norm_uses_batch_statistics_in_train_and_running_ones_in_eval():
    layer = ConvBN(3, 8, 3, padding=1, activation="none", rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    old_mean = rng.normal(size=8).astype(np.float32)
    old_var = rng.uniform(0.5, 2.0, size=8).astype(np.float32)
    layer.bn.mean.set_value(jnp.asarray(old_mean))
    layer.bn.var.set_value(jnp.asarray(old_var))
    layer.bn.scale.set_value(jnp.asarray(rng.uniform(0.5, 1.5, 8).astype(np.float32)))
    layer.bn.bias.set_value(jnp.asarray(rng.normal(size=8).astype(np.float32)))
    x = rng.normal(2.0, 3.0, size=(4, 9, 7, 3)).astype(np.float32)
    weight = np.transpose(np.asarray(layer.conv.kernel[...]), (3, 2, 0, 1))
    z = ref.conv2d(np.transpose(x, (0, 3, 1, 2)), weight, padding=1)
    batch_mean, batch_var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
    scale = np.asarray(layer.bn.scale[...], np.float64)[None, :, None, None]
    bias = np.asarray(layer.bn.bias[...], np.float64)[None, :, None, None]

    layer.train()
    out = np.transpose(np.asarray(layer(jnp.asarray(x))), (0, 3, 1, 2))
    expected = (z - batch_mean[None, :, None, None]) / np.sqrt(batch_var[None, :, None, None] + 1e-5) * scale + bias
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch.
    np.testing.assert_allclose(layer.bn.mean[...], 0.9 * old_mean + 0.1 * batch_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.bn.var[...], 0.9 * old_var + 0.1 * batch_var, rtol=1e-5, atol=1e-5)

    layer.eval()
    mean, var = np.asarray(layer.bn.mean[...]), np.asarray(layer.bn.var[...])
    out = np.transpose(np.asarray(layer(jnp.asarray(x))), (0, 3, 1, 2))
    expected = (z - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5) * scale + bias
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(layer.bn.mean[...], mean)


def test_ccnet_train_and_eval_modes():
    model = CCNet(config=TINY, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 39, 31, 3)).astype(np.float32))
    stats_before = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    model.train()
    first_main, first_aux = model(x)
    second_main, _ = model(x)
    assert first_main.shape == (2, 6, 5, ref.TINY_CLASSES) and first_aux.shape == first_main.shape
    # Dropout2d draws new channel masks on every call in train mode.
    assert float(jnp.abs(first_main - second_main).max()) > 0
    stats_trained = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]
    assert all(not np.array_equal(a, b) for a, b in zip(stats_before, stats_trained))
    model.eval()
    eval_main, eval_aux = model(x)
    np.testing.assert_array_equal(model(x)[0], eval_main)
    for a, b in zip(stats_trained, jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
        np.testing.assert_array_equal(a, b)


def test_models_import_without_data_or_training_dependencies():
    code = (
        "import sys, ccnet_jax.models, ccnet_jax.convert, ccnet_jax.models.linen;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'orbax', 'grain', 'tensorflow', "
        "'tensorflow_datasets', 'torch'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_gradients_reach_every_parameter():
    model = CCNet(config=TINY, rngs=nnx.Rngs(0))
    model.head.cca.gamma.set_value(jnp.asarray(0.5))
    model.train()
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 33, 33, 3)).astype(np.float32))
    r = jnp.asarray(rng.normal(size=(2, 5, 5, ref.TINY_CLASSES)).astype(np.float32))

    def loss(model):
        main, aux = model(x)
        return jnp.sum(main * r) + 0.4 * jnp.sum(aux * r)

    grads = nnx.grad(loss)(model)
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g[...])
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, path
