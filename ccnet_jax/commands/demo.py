"""`ccnet demo`: the embedded example, CPU only, no download, 2 to 5 minutes on 2 cores.

Prepares the generated long_range dataset, trains a small CCNet (R = 2),
evaluates it, writes prediction and attention pictures to WORKDIR/pictures,
and ends with the per-class table and `mIoU: 0.xxxx`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccnet_jax.commands import options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train and evaluate on the embedded dataset (CPU, no download)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_config_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ccnet_jax import config as config_lib

    try:
        if args.config is None:
            args.config = str(config_lib.DEMO_CONFIG_FILE)
        config = options.load_config(args)
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
