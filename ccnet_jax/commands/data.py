"""`ccnet data`: prepare the datasets and show what is prepared.

    ccnet data prepare NAME --data-dir DIR [--manual-dir DIR] [--config CONFIG]
    ccnet data info NAME --data-dir DIR [--config CONFIG]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccnet_jax.data import DATASETS, DataError, common, load_split, sources


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds the `data` command and its actions to the `ccnet` parser."""
    parser = subparsers.add_parser(
        "data",
        help="prepare datasets (cityscapes, ade20k, the embedded long_range)",
        description="Prepare datasets as TFDS ArrayRecord files (no TensorFlow needed).",
    )
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION", required=True)

    prepare = actions.add_parser(
        "prepare",
        help="build a dataset under --data-dir",
        description=(
            "Build NAME under DATA_DIR. cityscapes and ade20k read manual downloads (zips or their "
            "extracted folders) from --manual-dir (default DATA_DIR/downloads/manual); long_range is "
            "generated and needs nothing."
        ),
    )
    prepare.add_argument("name", choices=list(DATASETS))
    prepare.add_argument("--data-dir", type=Path, required=True, help="where prepared datasets live")
    prepare.add_argument("--manual-dir", type=Path, default=None, help="folder with the manual downloads")
    prepare.add_argument("--config", default=None, help="builder configuration (long_range: default, tiny, far_key)")
    prepare.set_defaults(func=run_prepare)

    info = actions.add_parser("info", help="show the splits of a prepared dataset")
    info.add_argument("name", choices=list(DATASETS))
    info.add_argument("--data-dir", type=Path, required=True)
    info.add_argument("--config", default=None)
    info.set_defaults(func=run_info)


def run_prepare(args: argparse.Namespace) -> int:
    """Prepares one dataset; returns 0, or 1 with the reason on stderr."""
    try:
        target = sources.prepared_dir(args.name, args.data_dir, args.config)
        if sources.is_prepared(args.name, args.data_dir, args.config):
            print(f"{args.name} is already prepared in {target}")
        else:
            for leftover in common.incomplete_leftovers(target):
                print(f"note: {leftover} is left from an interrupted preparation; it is ignored "
                      "and can be deleted", file=sys.stderr)
            print(f"preparing {args.name} in {target}", flush=True)
            sources.prepare(args.name, args.data_dir, args.manual_dir, args.config)
        return run_info(args)
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # e.g. --data-dir read-only, or under a file: the message names the path
        print(f"error: cannot read or write a file while preparing {args.name}: {err}", file=sys.stderr)
        return 1


def run_info(args: argparse.Namespace) -> int:
    """Prints the number of examples of every split; 1 if the dataset is not prepared."""
    try:
        spec = sources.dataset_spec(args.name)
        for split in spec.splits:
            examples = load_split(args.name, split, args.data_dir, config=args.config)
            print(f"{args.name}/{split}: {len(examples)} examples")
        print(f"{spec.num_classes} classes: {', '.join(spec.class_names)}")
        return 0
    except (DataError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
