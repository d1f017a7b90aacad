"""Dilated ResNet backbone (Bottleneck v1.5: stride on the 3x3 conv), NHWC.

The authors' CCNet backbone: a deep stem of three 3x3 convs (64, 64, 128),
a ceil-mode max-pool, and dilation instead of stride in the last stages so
that the output stride is 8. torchvision's 7x7 stem is available for its
ImageNet checkpoints. Attribute names follow the PyTorch modules (conv1,
bn1, layer3[4].downsample, ...) so the weight converter can map them.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from ccnet_jax.json_fields import dataclass_from_json
from ccnet_jax.models.atrous import DilatedConvs, conv_function
from ccnet_jax.models.layers import ConvBN, batch_norm, check_count, check_nhwc, conv2d, max_pool2d

Stem = Literal["deep", "torchvision"]

BLOCKS_BY_DEPTH: dict[int, tuple[int, int, int, int]] = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
    """What defines the backbone.

    depth: 50, 101 or 152 (Bottleneck blocks [3,4,6,3], [3,4,23,3], [3,8,36,3]).
    stem: "deep" (the authors' / MIT CSAIL 3x3 stem, ceil-mode pool) or
      "torchvision" (7x7 conv, floor-mode pool).
    output_stride: 8 (layer3 dilation 2, layer4 dilation 4), 16 (layer4
      dilation 2) or 32 (no dilation).
    multi_grid: per-block multipliers of layer4's dilation, cycled.
    width: channels of layer1's bottleneck (64 in every published ResNet);
      smaller values give small models for tests.
    blocks: explicit blocks per stage, overriding `depth` (tests).
    dilated_convs: how the dilated 3x3 convs run (the same function each way):
      "space_to_batch" as undilated convs over the dilation's residue
      sub-images; "native", dilated convs handed to XLA (on an H100 cuDNN
      ran those 8x slower in bfloat16); "auto" (default), space-to-batch on
      CUDA GPUs and native elsewhere (see `models.atrous`).
    """

    depth: int = 101
    stem: Stem = "deep"
    output_stride: int = 8
    multi_grid: tuple[int, ...] = (1, 1, 1)
    width: int = 64
    blocks: tuple[int, int, int, int] | None = None
    dilated_convs: DilatedConvs = "auto"

    def __post_init__(self):
        check_count(self.depth, "depth", "ResNetConfig")
        if self.blocks is None and self.depth not in BLOCKS_BY_DEPTH:
            raise ValueError(
                f"ResNetConfig: depth {self.depth} is not one of {sorted(BLOCKS_BY_DEPTH)}; "
                "pass one of those or an explicit blocks=(n1, n2, n3, n4)."
            )
        if self.blocks is not None:
            if len(self.blocks) != 4:
                raise ValueError(f"ResNetConfig: blocks must be four counts >= 1, got {self.blocks}.")
            for count in self.blocks:
                check_count(count, f"each of blocks {tuple(self.blocks)}", "ResNetConfig")
        if self.stem not in ("deep", "torchvision"):
            raise ValueError(f"ResNetConfig: stem {self.stem!r} is not 'deep' or 'torchvision'.")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"ResNetConfig: output_stride {self.output_stride} is not 8, 16 or 32.")
        if not self.multi_grid:
            raise ValueError(f"ResNetConfig: multi_grid must be positive ints, got {self.multi_grid}.")
        for rate in self.multi_grid:
            check_count(rate, f"each of multi_grid {tuple(self.multi_grid)}", "ResNetConfig")
        check_count(self.width, "width", "ResNetConfig")
        conv_function(self.dilated_convs)  # a ValueError naming the choices

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ResNetConfig":
        """Inverse of `to_dict` (JSON turns tuples into lists; they are turned back)."""
        return dataclass_from_json(cls, values, "backbone")

    @property
    def stage_blocks(self) -> tuple[int, int, int, int]:
        return self.blocks if self.blocks is not None else BLOCKS_BY_DEPTH[self.depth]

    @property
    def layer3_channels(self) -> int:
        return self.width * 4 * EXPANSION

    @property
    def layer4_channels(self) -> int:
        return self.width * 8 * EXPANSION

    def stage_strides_dilations(self) -> tuple[tuple[int, int], ...]:
        """(stride, dilation) of layer1..layer4."""
        return {
            8: ((1, 1), (2, 1), (1, 2), (1, 4)),
            16: ((1, 1), (2, 1), (2, 1), (1, 2)),
            32: ((1, 1), (2, 1), (2, 1), (2, 1)),
        }[self.output_stride]


class Bottleneck(nnx.Module):
    """1x1 -> 3x3 (stride, dilation) -> 1x1 (x4 channels), BN + ReLU, residual.

    The 3x3 conv is padded by its dilation, as in the authors' code. A
    `downsample` (1x1 conv with the stride, BN) projects the shortcut when
    the stride or the channel count changes. NHWC.
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        *,
        stride: int = 1,
        dilation: int = 1,
        dilated_convs: DilatedConvs = "auto",
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        out_channels = planes * EXPANSION
        self.conv1 = conv2d(in_channels, planes, 1, dtype=dtype, rngs=rngs)
        self.bn1 = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.conv2 = conv2d(
            planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, dilated_convs=dilated_convs,
            dtype=dtype, rngs=rngs,
        )
        self.bn2 = batch_norm(planes, dtype=dtype, rngs=rngs)
        self.conv3 = conv2d(planes, out_channels, 1, dtype=dtype, rngs=rngs)
        self.bn3 = batch_norm(out_channels, dtype=dtype, rngs=rngs)
        if stride != 1 or in_channels != out_channels:
            self.downsample = ConvBN(
                in_channels, out_channels, 1, stride=stride, activation="none", dtype=dtype, rngs=rngs
            )
        else:
            self.downsample = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        shortcut = x if self.downsample is None else self.downsample(x)
        return jax.nn.relu(y + shortcut)


class ResNet(nnx.Module):
    """The dilated ResNet; `__call__` returns (layer3, layer4) features, NHWC.

    Input (B, H, W, 3) float images (normalised by the caller). With
    output_stride 8 both outputs are (B, ceil-ish H/8, W/8, C): 769 -> 97,
    with 1024 and 2048 channels at width 64.
    """

    def __init__(self, config: ResNetConfig | None = None, *, dtype: jnp.dtype | None = None, rngs: nnx.Rngs):
        config = ResNetConfig() if config is None else config
        self.config = config
        w = config.width
        if config.stem == "deep":
            self.conv1 = conv2d(3, w, 3, stride=2, padding=1, dtype=dtype, rngs=rngs)
            self.bn1 = batch_norm(w, dtype=dtype, rngs=rngs)
            self.conv2 = conv2d(w, w, 3, padding=1, dtype=dtype, rngs=rngs)
            self.bn2 = batch_norm(w, dtype=dtype, rngs=rngs)
            self.conv3 = conv2d(w, 2 * w, 3, padding=1, dtype=dtype, rngs=rngs)
            self.bn3 = batch_norm(2 * w, dtype=dtype, rngs=rngs)
            in_channels = 2 * w
        else:
            self.conv1 = conv2d(3, w, 7, stride=2, padding=3, dtype=dtype, rngs=rngs)
            self.bn1 = batch_norm(w, dtype=dtype, rngs=rngs)
            in_channels = w
        stages = []
        for index, (blocks, (stride, dilation)) in enumerate(
            zip(config.stage_blocks, config.stage_strides_dilations())
        ):
            planes = w * 2**index
            layer = []
            for b in range(blocks):
                block_dilation = dilation
                if index == 3:
                    block_dilation = dilation * config.multi_grid[b % len(config.multi_grid)]
                layer.append(
                    Bottleneck(
                        in_channels,
                        planes,
                        stride=stride if b == 0 else 1,
                        dilation=block_dilation,
                        dilated_convs=config.dilated_convs,
                        dtype=dtype,
                        rngs=rngs,
                    )
                )
                in_channels = planes * EXPANSION
            stages.append(nnx.List(layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def stem(self, x: jax.Array) -> jax.Array:
        """Stem convs and the max-pool: (B, H, W, 3) -> (B, ~H/4, ~W/4, C)."""
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.config.stem == "deep":
            x = jax.nn.relu(self.bn2(self.conv2(x)))
            x = jax.nn.relu(self.bn3(self.conv3(x)))
            return max_pool2d(x, 3, 2, 1, ceil_mode=True)
        return max_pool2d(x, 3, 2, 1, ceil_mode=False)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        check_nhwc(x, 3, "ResNet")
        x = self.stem(x)
        for block in self.layer1:
            x = block(x)
        for block in self.layer2:
            x = block(x)
        for block in self.layer3:
            x = block(x)
        c3 = x
        for block in self.layer4:
            x = block(x)
        return c3, x
