"""`ccnet train --config FILE [--set section.field=value ...]`: train (resuming if possible) and evaluate.

Prints progress lines, then the per-class IoU table and a last line `mIoU: 0.xxxx`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ccnet_jax.commands import options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train CCNet (resumes from WORKDIR/checkpoints), then evaluate",
        description="Train CCNet with the settings of a config file; a run resumes from the latest complete "
        "checkpoint in WORKDIR/checkpoints. SIGTERM or Ctrl-C saves a checkpoint and stops (a second Ctrl-C "
        "stops at once).",
    )
    options.add_config_options(parser)
    parser.add_argument("--init-from", default=None,
                        help="a `ccnet convert` checkpoint to start from (overrides train.init_from)")
    parser.add_argument("--no-eval", action="store_true", help="skip the evaluation at the end")
    options.add_distributed_options(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        options.start_distributed(args)
        if args.init_from is not None:  # quoted: a path, never a JSON value
            args.overrides.append(f"train.init_from={json.dumps(args.init_from)}")
        config = options.load_config(args)
        import jax

        from ccnet_jax.data import dataset_spec
        from ccnet_jax.evaluation.metrics import format_table, mean_iou
        from ccnet_jax.train.inputs import check_classes
        from ccnet_jax.train.loop import enable_compilation_cache, train

        check_classes(config)  # before generating a dataset the model cannot be trained on
        options.ensure_generated_data(config)

        enable_compilation_cache(Path(config.workdir) / "jax_cache")
        result = train(config, evaluate_at_end=not args.no_eval)
    except options.USER_ERRORS as err:
        return options.fail(err)
    if result.interrupted:
        print(f"stopped at step {result.step}; run the same command again to resume")
        return 130 if result.stopped_by == "Ctrl-C" else 143
    # Every process holds the same confusion matrix; one table, as `ccnet eval` prints.
    if result.confusion is not None and jax.process_index() == 0:
        print(format_table(result.confusion, dataset_spec(config.data.name).class_names))
        print(f"mIoU: {mean_iou(result.confusion):.4f}")
    return 0
