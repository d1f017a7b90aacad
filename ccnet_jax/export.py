"""A trained CCNet as a portable StableHLO artefact (`jax.export`), runnable without this package.

The exported function takes uint8 RGB images (B, H, W, 3) and returns
(class ids int32 (B, H, W), logits float32 (B, H, W, C)) at the input size.
The normalisation, the network with its weights (as constants), the
inference mode (whole image, sliding window, scales, flip) and the upsampling
are all inside. With the XLA attention the module runs on CPU, CUDA and TPU;
for CUDA alone the fused Triton kernel can be exported instead (its custom
call ties the artefact to a jaxlib that knows it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ccnet_jax.data.transforms import Normalization
from ccnet_jax.evaluation.inference import InferenceConfig, predict_logits

PORTABLE_PLATFORMS = ("cpu", "cuda", "tpu")
_TRITON_CALL = "__gpu$xla.gpu.triton"
# What the CUDA export is lowered against when this machine has no GPU: the
# Triton kernels are compiled for the real card when the artefact is loaded.
_ABSTRACT_GPU = "NVIDIA H100 80GB HBM3"


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """What to export: input size, batch (None: any batch), the platforms, and the inference."""

    height: int
    width: int
    batch: int | None
    platforms: tuple[str, ...]
    inference: InferenceConfig
    normalization: Normalization

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"export: --height and --width must be >= 1, got {self.height}x{self.width}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"export: --batch must be >= 1 or 'dynamic', got {self.batch}")
        unknown = set(self.platforms) - set(PORTABLE_PLATFORMS)
        if not self.platforms or unknown:
            raise ValueError(f"export: platforms must be among {PORTABLE_PLATFORMS}, got {self.platforms}")

    @property
    def fused(self) -> bool:
        """The CUDA-only export carries the fused attention kernel."""
        return self.platforms == ("cuda",)


def serving_function(model_fn, params: Any, batch_stats: Any, spec: ExportSpec):
    """uint8 (B, H, W, 3) RGB -> (class ids, logits) with the weights closed over as constants."""

    def serve(images: jax.Array) -> tuple[jax.Array, jax.Array]:
        model = model_fn(params, batch_stats)
        pixels = spec.normalization(images)
        logits = predict_logits(lambda x: model(x)[0], pixels, spec.inference).astype(jnp.float32)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits

    return serve


def export_segmenter(model_fn, params: Any, batch_stats: Any, spec: ExportSpec) -> jax.export.Exported:
    """`jax.export` of `serving_function`; model_fn(params, batch_stats) builds the eval-mode CCNet
    whose attention implementation matches the platforms (xla for portable, triton for cuda)."""
    if spec.batch is None:
        if spec.fused:
            raise ValueError("export: a dynamic batch needs the portable export (the fused CUDA kernels are "
                             "compiled for one batch size); pass --batch N with --platform cuda")
        (batch,) = jax.export.symbolic_shape("b")
    else:
        batch = spec.batch
    images = jax.ShapeDtypeStruct((batch, spec.height, spec.width, 3), jnp.uint8)
    serve = jax.jit(serving_function(model_fn, params, batch_stats, spec))
    checks: Sequence = [jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)] if spec.fused else []
    if spec.fused and jax.default_backend() != "gpu":
        device = jax.sharding.AbstractDevice(device_kind=_ABSTRACT_GPU, num_cores=132, platform="gpu")
        mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
        with jax.sharding.use_abstract_mesh(mesh):
            return jax.export.export(serve, platforms=spec.platforms, disabled_checks=checks)(images)
    return jax.export.export(serve, platforms=spec.platforms, disabled_checks=checks)(images)
