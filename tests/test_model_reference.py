"""The Flax CCNet against an independent numpy model of the PyTorch network, on converted weights.

The weights are a real PyTorch checkpoint: tests/fixtures/torch_checkpoints/ccnet_tiny.*.pth,
saved by torch (zip and legacy formats) and read here without it.
"""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ccnet_jax import numpy_reference as ref
from ccnet_jax.cli import main as cli_main
from ccnet_jax.convert import load_torch_state_dict, read_state_dict
from ccnet_jax.converted_checkpoint import build_converted
from ccnet_jax.models import CCNet, CCNetConfig, max_pool2d

CHECKPOINTS = Path(__file__).parent / "fixtures" / "torch_checkpoints"

WIDTH = ref.TINY_WIDTH
BLOCKS = ref.TINY_BLOCKS
NUM_CLASSES = ref.TINY_CLASSES
# 39 x 31: the stem gives 20 x 16, where ceil-mode pooling (11 x 9) differs from floor mode (10 x 8).
HEIGHT, WIDTH_PX = 39, 31


def to_nchw(x):
    return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


def assert_close(actual_nhwc, expected_nchw):
    actual = to_nchw(actual_nhwc)
    assert actual.shape == expected_nchw.shape
    scale = np.abs(expected_nchw).max()
    np.testing.assert_allclose(actual, expected_nchw, rtol=1e-4, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def converted():
    sd = read_state_dict(CHECKPOINTS / "ccnet_tiny.zip.pth")
    config = CCNetConfig(num_classes=NUM_CLASSES, width=WIDTH, blocks=BLOCKS, recurrence=2)
    model = CCNet(config=config, rngs=nnx.Rngs(0))
    load_torch_state_dict(model, sd, strict=True, inplace_abn=True)
    model.eval()
    images = np.random.default_rng(2).normal(size=(2, HEIGHT, WIDTH_PX, 3)).astype(np.float32)
    return model, sd, images


@pytest.mark.parametrize("size", [5, 6, 7, 8, 16, 17, 20, 385])
@pytest.mark.parametrize("ceil_mode", [True, False])
def test_max_pool_matches_pytorch_semantics(size, ceil_mode):
    x = np.random.default_rng(size).normal(size=(1, size, size + 1, 2)).astype(np.float32)
    expected = ref.max_pool2d(to_nchw(x), 3, 2, 1, ceil_mode=ceil_mode)
    actual = max_pool2d(jnp.asarray(x), 3, 2, 1, ceil_mode=ceil_mode)
    np.testing.assert_array_equal(to_nchw(actual), expected)


def test_ceil_mode_pool_sizes_of_the_authors_crop():
    # 769 -> stem conv 385 -> ceil-mode pool 193 (a 97 x 97 map after layer2).
    out = max_pool2d(jnp.zeros((1, 385, 385, 1)), 3, 2, 1, ceil_mode=True)
    assert out.shape == (1, 193, 193, 1)


def test_stem_matches_numpy_reference(converted):
    model, sd, images = converted
    actual = model.backbone.stem(jnp.asarray(images))
    assert actual.shape[1:3] == (11, 9)
    assert_close(actual, ref.stem(to_nchw(images), sd))


def test_dilated_bottleneck_matches_numpy_reference(converted):
    model, sd, _ = converted
    # layer3's first block: 1x1 downsample shortcut and a 3x3 conv of dilation 2 (padding 2).
    x = np.random.default_rng(3).normal(size=(2, 7, 6, 8 * WIDTH)).astype(np.float32)
    actual = model.backbone.layer3[0](jnp.asarray(x))
    assert_close(actual, ref.bottleneck(to_nchw(x), sd, "layer3.0", stride=1, dilation=2))
    # layer4's second block: identity shortcut, dilation 4 (wider than the 7 x 6 map).
    x = np.random.default_rng(4).normal(size=(2, 7, 6, 32 * WIDTH)).astype(np.float32)
    actual = model.backbone.layer4[1](jnp.asarray(x))
    assert_close(actual, ref.bottleneck(to_nchw(x), sd, "layer4.1", stride=1, dilation=4))


def test_head_matches_numpy_reference(converted):
    model, sd, _ = converted
    x = np.random.default_rng(5).normal(size=(2, 6, 5, 32 * WIDTH)).astype(np.float32)
    actual = model.head(jnp.asarray(x))
    assert_close(actual, ref.head(to_nchw(x), sd, recurrence=2))


def test_whole_network_matches_numpy_reference(converted):
    model, sd, images = converted
    main, aux = model(jnp.asarray(images))
    expected_main, expected_aux = ref.ccnet(to_nchw(images), sd, BLOCKS, recurrence=2)
    assert main.shape == (2, 6, 5, NUM_CLASSES)
    assert_close(main, expected_main)
    assert_close(aux, expected_aux)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_converted_pytorch_checkpoint_gives_the_reference_logits(fmt, tmp_path):
    # `ccnet convert` on the .pth as saved by torch, then the restored model against the
    # numpy network run on the same file's weights.
    source = CHECKPOINTS / f"ccnet_tiny.{fmt}.pth"
    assert cli_main(["convert", str(source), str(tmp_path / "out")]) == 0
    model = build_converted(tmp_path / "out")
    model.eval()
    images = np.random.default_rng(6).normal(size=(1, HEIGHT, WIDTH_PX, 3)).astype(np.float32)
    main, aux = model(jnp.asarray(images))
    expected_main, expected_aux = ref.ccnet(to_nchw(images), read_state_dict(source), BLOCKS, recurrence=2)
    assert_close(main, expected_main)
    assert_close(aux, expected_aux)


def test_negative_batch_norm_weights_keep_the_sign_the_authors_inplace_abn_gives_them(tmp_path):
    # InPlaceABN, the authors' BatchNorm, scales by |weight| + eps. Copied as they are, these
    # weights flipped the sign of their channels (before a ReLU in the stem and a block, before a
    # leaky ReLU in the head).
    sd = read_state_dict(CHECKPOINTS / "ccnet_tiny.zip.pth")
    for name in ("bn2.weight", "layer1.0.bn3.weight", "head.conva.1.weight", "dsn.1.weight"):
        sd[name] = (-np.abs(sd[name]) - 0.2 * (np.arange(sd[name].size) % 2)).astype(np.float32)
    np.savez(tmp_path / "negative.npz", **sd)
    assert cli_main(["convert", str(tmp_path / "negative.npz"), str(tmp_path / "out")]) == 0
    model = build_converted(tmp_path / "out")
    model.eval()
    images = np.random.default_rng(7).normal(size=(1, HEIGHT, WIDTH_PX, 3)).astype(np.float32)
    main, aux = model(jnp.asarray(images))
    expected_main, expected_aux = ref.ccnet(to_nchw(images), sd, BLOCKS, recurrence=2)
    assert_close(main, expected_main)
    assert_close(aux, expected_aux)
    np.testing.assert_array_equal(model.head.conva.bn.scale[...], np.abs(sd["head.conva.1.weight"]) + np.float32(1e-5))
    # The same weights read as nn.BatchNorm2d's give another network.
    plain = CCNet(config=CCNetConfig(num_classes=NUM_CLASSES, width=WIDTH, blocks=BLOCKS), rngs=nnx.Rngs(0))
    load_torch_state_dict(plain, sd, strict=True)
    plain.eval()
    assert np.abs(to_nchw(plain(jnp.asarray(images))[0]) - expected_main).max() > 0.1 * np.abs(expected_main).max()
