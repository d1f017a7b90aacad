"""CCNet: dilated ResNet + RCCA head + auxiliary head (the authors' network), NHWC."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from ccnet_jax.json_fields import dataclass_from_json
from ccnet_jax.models.atrous import DilatedConvs
from ccnet_jax.models.aux_head import AuxHead
from ccnet_jax.models.criss_cross import AttentionOp, Remat, check_implementation, check_remat
from ccnet_jax.models.layers import check_count, check_nhwc, check_rate
from ccnet_jax.models.rcca_head import Attention, RCCAHead, check_attention
from ccnet_jax.models.resnet import ResNet, ResNetConfig, Stem
from pallas_kernels import CrissCrossConfig, MosaicConfig, XlaConfig
from pallas_kernels.criss_cross.implementations import Implementation, check_interpret


@dataclasses.dataclass(frozen=True)
class CCNetConfig:
    """Everything that defines a CCNet's weights and computation (JSON-serialisable).

    The defaults are the authors' Cityscapes model: ResNet-101 with the
    deep stem, output stride 8, R = 2, 19 classes. `width` scales every
    channel count (64 is the published network; tests use less): the head
    sees 32*width channels (2048) and works at 8*width (512).
    `implementation` and `interpret` select the CCA op (see
    `pallas_kernels.criss_cross_attention`); `remat_attention` is what the
    attention layer recomputes in the backward to save memory in training:
    "none", "projections" (its q/k/v projections) or "all" (the attention's
    forward too; see `CrissCrossAttention`). `dilated_convs` is how the
    backbone computes its dilated convs (see `ResNetConfig`).
    """

    num_classes: int = 19
    depth: int = 101
    recurrence: int = 2
    stem: Stem = "deep"
    output_stride: int = 8
    multi_grid: tuple[int, ...] = (1, 1, 1)
    width: int = 64
    blocks: tuple[int, int, int, int] | None = None
    attention: Attention = "cca"
    dropout: float = 0.1
    implementation: Implementation = None
    interpret: bool = False
    remat_attention: Remat = "none"
    dilated_convs: DilatedConvs = "auto"

    def __post_init__(self):
        # Checked here rather than when a model is built from it (or, for the implementation, at
        # its first call): a config is often made long before, or far from, its model.
        check_count(self.num_classes, "num_classes", "CCNetConfig")
        check_count(self.recurrence, "recurrence", "CCNetConfig", minimum=0)
        check_attention(self.attention, "CCNetConfig")
        check_rate(self.dropout, "dropout", "CCNetConfig")
        check_implementation(self.implementation, "CCNetConfig")
        check_interpret(self.interpret, "CCNetConfig")
        check_remat(self.remat_attention, "CCNetConfig: remat_attention")
        self.backbone  # validates the backbone fields early

    @property
    def backbone(self) -> ResNetConfig:
        return ResNetConfig(
            depth=self.depth,
            stem=self.stem,
            output_stride=self.output_stride,
            multi_grid=tuple(self.multi_grid),
            width=self.width,
            blocks=None if self.blocks is None else tuple(self.blocks),
            dilated_convs=self.dilated_convs,
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "CCNetConfig":
        """Inverse of `to_dict` (JSON turns tuples into lists; they are turned back).

        Configs saved before remat had levels hold a boolean `remat_attention`: true meant
        recomputing the projections."""
        legacy = values.get("remat_attention") if isinstance(values, dict) else None
        if isinstance(legacy, bool):
            values = {**values, "remat_attention": "projections" if legacy else "none"}
        return dataclass_from_json(cls, values, "model")


class CCNet(nnx.Module):
    """The CCNet segmentation network.

    `model(images)` takes (B, H, W, 3) float images, already normalised (the
    authors feed BGR minus the Caffe mean, no std division), and returns
    `(main_logits, aux_logits)`, both (B, h, w, num_classes) at the output
    stride (769 -> 97, 97 -> 13 at stride 8); upsampling to the label size
    is the loss's business. Train/eval in the NNX way: `model.train()`
    (batch statistics, dropout on; the state after construction) and
    `model.eval()` (running statistics, no dropout).

    Pass either the individual arguments (defaults: depth 101, R = 2, the deep
    stem, output stride 8) or `config=CCNetConfig(...)`; an argument given
    beside a config that says otherwise is refused.
    `mesh` makes the CCA op run under shard_map over `batch_axis` (needed
    for the Pallas kernel when the batch is sharded); `kernel_config`
    configures the op (the kernels' tiling or launch, or xla's float32
    products); `dtype` is the computation dtype (e.g. jnp.bfloat16), the
    parameters and BN statistics stay float32.
    """

    def __init__(
        self,
        num_classes: int | None = None,
        depth: int | None = None,
        recurrence: int | None = None,
        stem: Stem | None = None,
        output_stride: int | None = None,
        *,
        config: CCNetConfig | None = None,
        kernel_config: CrissCrossConfig | MosaicConfig | XlaConfig | None = None,
        mesh: Mesh | None = None,
        batch_axis: str | tuple[str, ...] = "data",
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        given = {name: value for name, value in (("num_classes", num_classes), ("depth", depth),
                                                 ("recurrence", recurrence), ("stem", stem),
                                                 ("output_stride", output_stride)) if value is not None}
        if config is None:
            if num_classes is None:
                raise ValueError("CCNet: pass num_classes (e.g. CCNet(19, rngs=...)) or config=CCNetConfig(...).")
            config = CCNetConfig(**given)
        conflicts = [f"{name}={value!r} (config has {getattr(config, name)!r})" for name, value in given.items()
                     if value != getattr(config, name)]
        if conflicts:
            raise ValueError(f"CCNet: {', '.join(conflicts)}; pass these in config=CCNetConfig(...) alone.")
        self.config = config
        self.backbone = ResNet(config.backbone, dtype=dtype, rngs=rngs)
        c3 = config.backbone.layer3_channels
        c4 = config.backbone.layer4_channels
        self.head = RCCAHead(
            c4,
            c4 // 4,
            config.num_classes,
            recurrence=config.recurrence,
            attention=config.attention,
            dropout=config.dropout,
            attention_fn=AttentionOp(config.implementation, config.interpret, kernel_config, mesh, batch_axis),
            remat_attention=config.remat_attention,
            dtype=dtype,
            rngs=rngs,
        )
        self.aux = AuxHead(c3, c4 // 4, config.num_classes, dropout=config.dropout, dtype=dtype, rngs=rngs)

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        check_nhwc(images, 3, "CCNet")
        c3, c4 = self.backbone(images)
        return self.head(c4), self.aux(c3)
