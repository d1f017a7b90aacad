"""Kernel tiling: validation and the heuristic default."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import CrissCrossConfig, XlaConfig, default_config


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"block_q": 48}, "block_q=48: must be a power of two >= 16"),
        ({"block_k": 8}, "block_k=8"),
        ({"block_cv": 0}, "block_cv=0"),
        ({"bwd_block_cv": 100}, "bwd_block_cv=100"),
        ({"dkq_block_k": 24}, "dkq_block_k=24"),
        ({"fwd_num_warps": 3}, "fwd_num_warps=3"),
        ({"bwd_num_stages": 0}, "bwd_num_stages must be >= 1"),
        ({"float32_dot": "fast"}, "float32_dot='fast': use one of 'tf32x3', 'bf16x6'"),
        ({"alternate_cv_order": 1}, "alternate_cv_order=1: must be True or False"),
    ],
)
def test_invalid_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CrissCrossConfig(**kwargs)


def test_xla_config_names_its_products_and_refuses_others():
    assert XlaConfig().precision(jnp.float32) == jax.lax.Precision.HIGHEST
    assert XlaConfig("bf16x6").precision(jnp.float32) == jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X6
    assert XlaConfig("bf16x6").precision(jnp.bfloat16) == jax.lax.Precision.HIGHEST
    with pytest.raises(ValueError, match="float32_products='tf32': use one of 'exact', 'bf16x6'"):
        XlaConfig("tf32")


def test_config_is_hashable_and_frozen():
    config = CrissCrossConfig()
    assert hash(config) == hash(CrissCrossConfig())
    with pytest.raises(AttributeError):
        config.block_q = 32


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize(
    "h,w,cqk,cv",
    [(97, 97, 64, 512), (128, 256, 64, 512), (65, 129, 64, 512), (5, 3, 1, 1), (33, 1, 2048, 7)],
)
def test_default_config_is_valid_and_no_larger_than_needed(h, w, cqk, cv, itemsize):
    config = default_config(h, w, cqk, cv, itemsize)
    longest = max(h, w)
    for block in (config.block_q, config.block_k, config.dkq_key_block):
        assert block >= 16
        # Never more than one block of padding beyond the longest strip.
        assert block < 2 * max(longest, 16)
    assert 16 <= config.block_cv < 2 * max(cv, 16)
    assert 16 <= config.bwd_block_cv < 2 * max(cv, 16)
    # A key block of q/k channels stays within 32 KiB unless already minimal.
    assert config.block_k == 16 or config.block_k * max(16, cqk) * itemsize <= 32 * 1024


@pytest.mark.parametrize(
    "h,w,cqk,itemsize,whole_strip",
    [
        (97, 97, 64, 2, True),  # CCNet's training map
        (65, 128, 64, 2, True),
        (128, 65, 1, 2, True),
        (64, 97, 64, 2, False),  # a 64-pixel direction would pad its strips to 128
        (97, 129, 64, 2, False),  # 129-pixel strips span two 128-pixel blocks
        (97, 97, 65, 2, False),  # 128 padded query/key channels: untried, may spill
        (97, 97, 64, 4, False),  # float32: 16-pixel dK/dQ key blocks
    ],
)
def test_16_bit_maps_of_65_to_128_pixels_take_one_block_per_strip(h, w, cqk, itemsize, whole_strip):
    config = default_config(h, w, cqk, 512, itemsize)
    if whole_strip:
        assert (config.block_q, config.block_k, config.dkq_key_block) == (128, 128, 128)
        assert (config.fwd_num_warps, config.bwd_num_warps) == (8, 8)
    else:
        assert config.dkq_key_block <= 64 and config.bwd_num_warps == 4


@pytest.mark.parametrize(
    "h,w,itemsize,stages",
    [
        (97, 97, 4, 1),  # CCNet's training map: 97-pixel strips end inside the second 64-pixel block
        (129, 257, 4, 1),  # whole-image Cityscapes
        (65, 129, 4, 1),
        (128, 256, 4, 2),  # with one stage, the column dV kernel spills here
        (64, 64, 4, 2),
        (256, 256, 4, 2),
        (97, 97, 2, 2),  # 16-bit kernels spill with neither
    ],
)
def test_float32_takes_one_backward_stage_where_strips_end_inside_a_block(h, w, itemsize, stages):
    config = default_config(h, w, 64, 512, itemsize)
    assert config.bwd_num_stages == stages
    assert config.fwd_num_stages == 2
