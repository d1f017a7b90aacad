"""`ccnet demo`: the embedded example, CPU only, no download, about 5 minutes on 2 cores.

Prepares the generated long_range dataset, trains a small CCNet (R = 2),
evaluates it, writes prediction and attention pictures to WORKDIR/pictures,
and ends with the per-class table and `mIoU: 0.xxxx`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccnet_jax.commands import options

# The same values as experiments/configs/long_range_demo.json, so an installed package needs no repository files.
DEMO_CONFIG = {
    "model": {"num_classes": 10, "width": 8, "blocks": [1, 1, 1, 1], "recurrence": 2, "implementation": "xla"},
    "data": {"name": "long_range", "data_dir": "data", "crop_size": [97, 129], "scales": [1.0], "flip_prob": 0.5},
    "train": {"batch_size": 8, "optimizer": "adamw", "steps": 800, "learning_rate": 0.003, "weight_decay": 0.0001,
              "log_every": 50, "checkpoint_every": 400, "keep": 1},
    "eval": {"mode": "whole", "batch_size": 8, "max_images": 200},
    "workdir": "runs/long_range_demo",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train and evaluate on the embedded dataset (CPU, ~5 min)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_config_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ccnet_jax import config as config_lib

    try:
        values = {section: dict(v) if isinstance(v, dict) else v for section, v in DEMO_CONFIG.items()}
        if args.config is not None:
            values = config_lib.load(args.config).to_dict()
        extra = list(args.overrides)
        extra += [f"workdir={args.workdir}"] if args.workdir else []
        extra += [f"data.data_dir={args.data_dir}"] if args.data_dir else []
        for text in extra:
            section, field, value = config_lib.parse_override(text)
            if section:
                values.setdefault(section, {})[field] = value
            else:
                values[field] = value
        config = config_lib.from_dict(values)
        options.ensure_generated_data(config)
        from ccnet_jax.commands.predict import predict_pictures
        from ccnet_jax.data import dataset_spec
        from ccnet_jax.evaluation.metrics import format_table, mean_iou
        from ccnet_jax.train.loop import enable_compilation_cache, train

        enable_compilation_cache(Path(config.workdir) / "jax_cache")
        result = train(config)
        if result.interrupted:
            print(f"stopped at step {result.step}; run the same command again to resume")
            return 143
        pictures = Path(config.workdir) / "pictures"
        predict_pictures(config, Path(config.workdir), pictures, None, 4, None)
        print(f"prediction and attention pictures: {pictures}", file=sys.stderr)
    except options.USER_ERRORS as err:
        return options.fail(err)
    print(format_table(result.confusion, dataset_spec(config.data.name).class_names))
    print(f"mIoU: {mean_iou(result.confusion):.4f}")
    return 0
