"""`ccnet eval`: mIoU of a checkpoint on a split (whole image, sliding window, multi-scale, flip).

    ccnet eval --checkpoint RUN_DIR [--split validation] [--set eval.mode=sliding] [--output-dir DIR [--force]]

Prints the per-class IoU table and a last line `mIoU: 0.xxxx`; with
--output-dir DIR (new or empty, unless --force) also writes DIR/colour/NAME.png
(colour pictures) and, in the benchmark's own format, DIR/submission/:
NAME_labelIds.png for Cityscapes (give this folder to cityscapesScripts as
CITYSCAPES_RESULTS, or zip it for the test server), NAME.png with the ADE20K
class numbers 1..150 for ADE20K. A split without labels (every pixel the ignore
label, as Cityscapes test) has no mIoU: it is refused, or with --output-dir
only its predictions are written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccnet_jax.commands import options
from ccnet_jax.labels import IGNORE_LABEL
from ccnet_jax.preemption import EvaluationStopped


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a checkpoint (mIoU, per-class IoU)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_config_options(parser)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a training run's workdir (default: the config's workdir) or a `ccnet convert` folder")
    parser.add_argument("--split", default=None, help="split to evaluate (default: data.eval_split)")
    parser.add_argument("--output-dir", type=Path, default=None, help="write prediction PNGs here")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --output-dir, replacing "
                        "the pictures of the same names")
    options.add_distributed_options(parser)
    parser.set_defaults(func=run)


def resolve_config(args: argparse.Namespace):
    """The config: --config; else the one the run in --checkpoint saved, or one made from a
    `ccnet convert` folder's model; plus --set overrides."""
    from ccnet_jax.commands.restore import converted_config, is_converted, run_config

    base = None
    if args.config is None and args.checkpoint is not None:
        saved = run_config(args.checkpoint)
        if saved is not None:
            base = saved.to_dict()
        elif is_converted(args.checkpoint):
            base = converted_config(args.checkpoint)
    return options.load_config(args, base)


def checkpoint_path(args: argparse.Namespace, config) -> Path:
    """--checkpoint, else the config's workdir, checked before anything slow: a wrong path would
    otherwise first generate a dataset or build a model and then fail on something else."""
    checkpoint = args.checkpoint or Path(config.workdir)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist; pass a training run's workdir "
                                "or a `ccnet convert` output folder with --checkpoint")
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"checkpoint {checkpoint} is a file, not a folder; pass a training run's workdir, "
                                "or turn PyTorch weights into a folder first: ccnet convert FILE FOLDER")
    return checkpoint


def check_split(config, split: str) -> None:
    """Refuses a split the dataset does not have, before anything slow (preparing data, loading weights)."""
    from ccnet_jax.data import dataset_spec

    splits = dataset_spec(config.data.name).splits
    if split not in splits:
        raise ValueError(f"{config.data.name} has no split {split!r}; pass --split with one of {', '.join(splits)}")


def no_labels(config, split: str) -> str:
    """What is said of a split whose evaluation counted no pixel."""
    return (f"split {split!r} of {config.data.name} has no labels: every label pixel of the evaluated images is "
            f"the ignore label {IGNORE_LABEL}")


def predictions_instead(args: argparse.Namespace, checkpoint: Path, split: str) -> str:
    """The commands that write a split's predictions, for a split without labels."""
    same = [flag for flag, value in (("--config", args.config), ("--set", args.overrides),
                                     ("--data-dir", args.data_dir)) if value]
    with_same = f", with the same {', '.join(same)}" if same else ""
    return (f"For pictures of its first N images' predictions run `ccnet predict --checkpoint {checkpoint} "
            f"--split {split} --output-dir DIR --count N`{with_same}; to write every image's prediction (for "
            "Cityscapes the labelIds PNGs of its test server, in DIR/submission) pass --output-dir DIR to "
            "`ccnet eval`")


def check_output_dir(output_dir: Path, force: bool, dataset: str) -> None:
    """Refuses --output-dir before anything slow: a non-empty folder without --force, or one whose
    colour/ or submission/ is a file (creating it would fail only after the model is loaded)."""
    from ccnet_jax.evaluation.writers import eval_output_folders

    options.check_output_folder(output_dir, force, "--output-dir",
                                "to write into it (pictures of the same names are replaced)")
    for folder in eval_output_folders(output_dir, dataset):
        if folder is not None and folder.exists() and not folder.is_dir():
            raise FileExistsError(f"--output-dir {output_dir} holds a file {folder.name} where the predictions' "
                                  f"folder {folder.name}/ goes; move the file away or choose a new folder")


def written_where(output_dir: Path, dataset: str) -> str:
    """Where the predictions went, and which folder holds the benchmark's format."""
    from ccnet_jax.evaluation.writers import eval_output_folders

    colour, submission = eval_output_folders(output_dir, dataset)
    if submission is None:
        return str(colour)
    return f"{colour} (colour pictures) and {submission} (the {dataset} benchmark's format)"


def run(args: argparse.Namespace) -> int:
    try:
        options.start_distributed(args)
        config = resolve_config(args)
        checkpoint = checkpoint_path(args, config)
        split = args.split or config.data.eval_split
        check_split(config, split)
        if args.output_dir is not None:
            check_output_dir(args.output_dir, args.force, config.data.name)
        import jax

        from ccnet_jax.commands.restore import load_weights
        from ccnet_jax.data import dataset_spec
        from ccnet_jax.evaluation.evaluate import NoLabelsError, evaluate, local_rows, make_predict_fn
        from ccnet_jax.evaluation.metrics import format_table, mean_iou
        from ccnet_jax.evaluation.writers import EvalOutputs, palette
        from ccnet_jax.preemption import Preemption
        from ccnet_jax.train import inputs
        from ccnet_jax.train.step import make_mesh

        inputs.check_classes(config)  # before generating a dataset the model cannot be evaluated on
        mesh = make_mesh()
        # The weights first: a folder without a checkpoint (a typo'd or empty one, whose default config
        # names the full long_range dataset) is reported before that dataset is generated for nothing.
        parts, state = load_weights(config, checkpoint, mesh)
        options.ensure_generated_data(config)
        predict = make_predict_fn(parts, config.eval, config.model.num_classes, mesh)
        on_batch = None
        if args.output_dir is not None:
            outputs = EvalOutputs(args.output_dir, config.data.name, palette(config.data.name))
            outputs.make_folders()

            def on_batch(batch, predictions):
                valid, heights, widths = (local_rows(batch[key]) for key in ("valid", "label_height", "label_width"))
                for row, name in enumerate(batch["file_name"]):
                    if valid[row]:
                        outputs.write(name, predictions[row][: heights[row], : widths[row]])  # the label's size

        with inputs.eval_iterator(config, mesh, split) as batches, Preemption() as preemption:
            try:
                confusion = evaluate(predict, state.params, state.batch_stats, batches, config.model.num_classes,
                                     on_batch=on_batch, total=len(batches), stop=preemption.now)
            except NoLabelsError as err:
                if args.output_dir is None:
                    raise ValueError(f"{no_labels(config, split)}, so there is no mIoU. "
                                     f"{predictions_instead(args, checkpoint, split)}") from err
                confusion = None  # the predictions, written by on_batch, are what was asked for
    except options.USER_ERRORS as err:
        return options.fail(err)
    except EvaluationStopped as stopped:
        print(f"{preemption.reason}: {stopped}", file=sys.stderr)
        return 130 if preemption.reason == "Ctrl-C" else 143
    if jax.process_index() == 0:
        if confusion is None:
            print(f"note: {no_labels(config, split)}; no mIoU", file=sys.stderr)
        else:
            dataset = config.data.name + (f"/{config.data.builder_config}" if config.data.builder_config else "")
            print(f"scored: {dataset}, split {split!r}", file=sys.stderr)
            print(format_table(confusion, dataset_spec(config.data.name).class_names))
            print(f"mIoU: {mean_iou(confusion):.4f}")
        if args.output_dir is not None:
            print(f"predictions written to {written_where(args.output_dir, config.data.name)}", file=sys.stderr)
    return 0
