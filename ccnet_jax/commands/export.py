"""`ccnet export`: a trained or converted CCNet as a StableHLO artefact that runs without this package.

    ccnet export --checkpoint RUN_OR_CONVERTED_DIR --output DIR [--height H --width W]
                 [--batch B|dynamic] [--platform portable|cuda] [--compute-dtype float32|bfloat16]

Writes DIR/ccnet.jax (the serialized `jax.export` module: uint8 RGB images
(B, H, W, 3) in, class ids int32 (B, H, W) and logits float32 (B, H, W, C)
out, normalisation and the config's inference mode inside), DIR/ccnet_export.json
(sizes, classes, colours) and DIR/predict_exported.py (a loader that needs
only jax, flatbuffers, numpy and Pillow). --platform portable (the default) uses the XLA
attention and runs on CPU, CUDA and TPU; cuda exports the fused Triton
kernel, for CUDA GPUs only. H and W default to data.crop_size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path

from ccnet_jax.commands import options

ARTEFACT = "ccnet.jax"
DESCRIPTION = "ccnet_export.json"
LOADER = "predict_exported.py"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("export", help="export a CCNet as StableHLO (runs without this package)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_config_options(parser)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a training run's workdir (default: the config's workdir) or a `ccnet convert` folder")
    parser.add_argument("--output", type=Path, required=True, help="folder to write the artefact to")
    parser.add_argument("--height", type=int, default=None, help="input height (default: data.crop_size)")
    parser.add_argument("--width", type=int, default=None, help="input width (default: data.crop_size)")
    parser.add_argument("--batch", default="1", help="images per call, or 'dynamic' for any (default 1)")
    parser.add_argument("--platform", choices=("portable", "cuda"), default="portable",
                        help="portable: XLA attention, CPU/CUDA/TPU; cuda: the fused kernel, CUDA only")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of the network (default: train.compute_dtype)")
    parser.add_argument("--force", action="store_true", help="replace an existing export in --output")
    parser.set_defaults(func=run)


def parse_batch(text: str) -> int | None:
    if text == "dynamic":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--batch must be a number or 'dynamic', got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        written = export(args)
    except options.USER_ERRORS as err:
        return options.fail(err)
    print(f"wrote {', '.join(str(p) for p in written)}", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> list[Path]:
    import functools

    import jax
    import numpy as np

    from ccnet_jax.commands.eval import checkpoint_path, resolve_config
    from ccnet_jax.commands.restore import load_weights
    from ccnet_jax.data import dataset_spec
    from ccnet_jax.evaluation.writers import palette_for
    from ccnet_jax.export import PORTABLE_PLATFORMS, ExportSpec, export_segmenter
    from ccnet_jax.models.parts import split_model
    from ccnet_jax.train import inputs
    from ccnet_jax.train.state import build_model, compute_dtype
    from ccnet_jax.train.step import make_mesh

    options.check_output_folder(args.output, args.force, "--output", "to replace its export")
    config = resolve_config(args)
    checkpoint = checkpoint_path(args, config)
    fused = args.platform == "cuda"
    # The artefact runs wherever it is loaded, so its dilated convs are the space-to-batch ones,
    # plain convs that every platform runs at full speed (cuDNN ran dilated ones 8x slower).
    config = dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, implementation="triton" if fused else "xla", interpret=False,
                                  dilated_convs="space_to_batch"),
        train=dataclasses.replace(config.train, compute_dtype=args.compute_dtype or config.train.compute_dtype),
    )
    # `is None`, not `or`: --height 0 is a mistake to report (ExportSpec does), not a request for the default.
    height = config.data.crop_size[0] if args.height is None else args.height
    width = config.data.crop_size[1] if args.width is None else args.width
    spec = ExportSpec(
        height=height, width=width, batch=parse_batch(args.batch),
        platforms=("cuda",) if fused else PORTABLE_PLATFORMS,
        inference=config.eval, normalization=inputs.NORMALIZATIONS[config.data.normalization],
    )
    mesh = make_mesh(devices=jax.local_devices()[:1])
    _, state = load_weights(config, checkpoint, mesh)
    params, batch_stats = jax.device_get((state.params, state.batch_stats))
    # The exported graph is one device's: the same network built without a mesh (no shard_map).
    single = build_model(config.model, seed=config.train.seed, dtype=compute_dtype(config.train.compute_dtype))
    parts, _, _ = split_model(single)
    exported = export_segmenter(functools.partial(parts.model, train=False), params, batch_stats, spec)
    serialized = exported.serialize()

    args.output.mkdir(parents=True, exist_ok=True)
    artefact = args.output / ARTEFACT
    artefact.write_bytes(serialized)
    try:
        class_names = list(dataset_spec(config.data.name).class_names)
    except ValueError:
        class_names = []
    if len(class_names) != config.model.num_classes:
        class_names = [f"class_{i}" for i in range(config.model.num_classes)]
    description = {
        "height": height, "width": width, "batch": spec.batch, "platforms": list(spec.platforms),
        "attention": config.model.implementation, "compute_dtype": config.train.compute_dtype,
        "num_classes": config.model.num_classes, "class_names": class_names,
        "colours": palette_for(config.data.name, config.model.num_classes).tolist(),
        "normalization": config.data.normalization, "inference": dataclasses.asdict(spec.inference),
        # Padding in the mean colour becomes zeros after the normalisation.
        "pad_rgb": [round(c) for c in spec.normalization.invert(np.zeros((1, 1, 3), np.float32))[0, 0]],
        "source": str(checkpoint),
        "inputs": "uint8 (B, H, W, 3) RGB", "outputs": "class ids int32 (B, H, W), logits float32 (B, H, W, C)",
    }
    (args.output / DESCRIPTION).write_text(json.dumps(description, indent=2))
    shutil.copyfile(Path(__file__).resolve().parents[1] / "exported_loader.py", args.output / LOADER)
    return [artefact, args.output / DESCRIPTION, args.output / LOADER]
