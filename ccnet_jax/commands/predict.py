"""`ccnet predict`: segment your own images, or draw a dataset split's predictions and attention.

    ccnet predict --checkpoint RUN_OR_CONVERTED_DIR --images PATH [PATH ...] --output-dir DIR
                  [--attention Y,X] [--batch-size N]
    ccnet predict --checkpoint RUN_DIR --output-dir DIR [--count 4] [--pixel Y,X]

With --images (files, folders, globs; any size, in the config's inference
mode: whole image, sliding window, scales, flip) it writes for each image
NAME_colour.png, NAME_overlay.png, NAME_labelIds.png (Cityscapes label ids)
or NAME_trainIds.png (class ids) and, with --attention Y,X, NAME_attention.png
(that pixel's attention after one and two recurrences). A file that is not a
readable image is reported and skipped (the exit status is then 1); when no
file is one, the command stops before loading the model. A `ccnet convert` folder needs no
--config for 19 classes (Cityscapes) or 150 (ADE20K).

Without --images, for each of the first --count images of the split it writes
NAME_prediction.png (image | prediction | ground truth), for Cityscapes
NAME_labelIds.png, and NAME_attention.png. Runs on one device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ccnet_jax.commands import options


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="write prediction and attention-map pictures",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    options.add_config_options(parser)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="a training run's workdir (default: the config's workdir) or a `ccnet convert` folder")
    parser.add_argument("--images", nargs="+", default=None, metavar="PATH",
                        help="image files, folders or glob patterns to segment (instead of a dataset split)")
    parser.add_argument("--attention", default=None, metavar="Y,X",
                        help="with --images: also draw this image pixel's attention")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="with --images: images of one size per batch (default: eval.batch_size, at least 1)")
    parser.add_argument("--split", default=None, help="split to draw images from (default: data.eval_split)")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--force", action="store_true",
                        help="replace pictures of the same names in --output-dir (without it the command refuses: "
                        "with --images, when one would be replaced; for a dataset split, when the folder is not empty)")
    parser.add_argument("--count", type=int, default=4, help="number of images")
    parser.add_argument("--pixel", default=None,
                        help="Y,X image pixel whose attention is drawn (default: a block pixel for long_range, "
                        "else the centre)")
    parser.set_defaults(func=run)


def parse_pixel(text: str | None, option: str = "--pixel") -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError as err:
        raise ValueError(f"{option} must be Y,X (two integers), got {text!r}") from err
    return y, x


def run(args: argparse.Namespace) -> int:
    if args.images is not None:
        return run_on_files(args)
    if args.attention is not None or args.batch_size is not None:
        return options.fail(ValueError("--attention and --batch-size go with --images; for a dataset split "
                                       "use --pixel Y,X"))
    try:
        from ccnet_jax.commands.eval import check_split, checkpoint_path, resolve_config

        config = resolve_config(args)
        pixel = parse_pixel(args.pixel)
        if args.count < 1:
            raise ValueError(f"--count must be >= 1, got {args.count}")
        checkpoint = checkpoint_path(args, config)
        check_split(config, args.split or config.data.eval_split)
        options.check_output_folder(args.output_dir, args.force, "--output-dir",
                                    "to replace pictures of the same names")
        written = predict_pictures(config, checkpoint, args.output_dir, args.split, args.count, pixel)
    except options.USER_ERRORS as err:
        return options.fail(err)
    print(f"wrote {written} pictures to {args.output_dir}", file=sys.stderr)
    return 0


def run_on_files(args: argparse.Namespace) -> int:
    """`ccnet predict --images ...`: 0 if every image was written, 1 if any was skipped or none found."""
    if args.pixel is not None:
        return options.fail(ValueError("--pixel goes with a dataset split; with --images use --attention Y,X"))
    try:
        import functools

        import jax

        from ccnet_jax.commands.eval import checkpoint_path, resolve_config
        from ccnet_jax.commands.restore import load_weights
        from ccnet_jax.evaluation import attention
        from ccnet_jax.evaluation.image_files import IMAGE_SUFFIXES, collect_images
        from ccnet_jax.evaluation.predict_files import (
            FileOutputs,
            existing_pictures,
            is_output,
            make_segmenter,
            predict_files,
            read_headers,
        )
        from ccnet_jax.evaluation.writers import palette_for
        from ccnet_jax.train import inputs
        from ccnet_jax.train.step import make_mesh

        config = resolve_config(args)
        pixel = parse_pixel(args.attention, "--attention")
        # One device here, so eval.batch_size's 0 (one image per device) means 1.
        batch_size = args.batch_size if args.batch_size is not None else max(config.eval.batch_size, 1)
        if batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
        if pixel is not None and config.model.attention != "cca":
            raise ValueError(f"--attention needs a criss-cross model; this one has attention "
                             f"{config.model.attention!r}")
        files, problems = collect_images(args.images, exclude=lambda p: is_output(p, args.output_dir))
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        if not files:
            raise FileNotFoundError("no image files to segment; give files, folders or glob patterns to --images")
        checkpoint = checkpoint_path(args, config)
        options.check_folder_path(args.output_dir, "--output-dir")
        headers = read_headers(files)
        if not headers.sizes:
            # Loading the model would only end in "wrote 0 pictures".
            for problem in headers.problems:
                print(f"skipped {problem}", file=sys.stderr)
            raise ValueError(f"none of the {len(files)} file(s) given to --images is a readable image; "
                             f"give image files ({', '.join(IMAGE_SUFFIXES)})")
        outputs = FileOutputs(colours=palette_for(config.data.name, config.model.num_classes),
                              cityscapes_label_ids=config.data.name == "cityscapes", attention_pixel=pixel)
        existing = [] if args.force else existing_pictures(files, args.output_dir, outputs, headers)
        if existing:
            shown = ", ".join(path.name for path in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise FileExistsError(f"{len(existing)} picture(s) in --output-dir {args.output_dir} would be replaced "
                                  f"({shown}); choose another folder, or pass --force to replace them")
        mesh = make_mesh(devices=jax.local_devices()[:1])
        parts, state = load_weights(config, checkpoint, mesh)
        model_fn = functools.partial(parts.model, train=False)
        maps = attention.jitted_recurrence_maps(model_fn)
        report = predict_files(
            files, args.output_dir, segment=make_segmenter(model_fn, config.eval), maps=maps,
            params=state.params, batch_stats=state.batch_stats,
            normalization=inputs.NORMALIZATIONS[config.data.normalization], resize=config.data.eval_resize,
            outputs=outputs, batch_size=batch_size, headers=headers,
        )
    except options.USER_ERRORS as err:
        return options.fail(err)
    for note in report.skipped:
        print(f"skipped {note}", file=sys.stderr)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    print(f"wrote {len(report.written)} pictures of {report.images} images to {args.output_dir}", file=sys.stderr)
    return 1 if problems or report.skipped else 0


def predict_pictures(config, checkpoint: Path, output_dir: Path, split: str | None, count: int,
                     pixel: tuple[int, int] | None) -> int:
    """Writes the pictures of the first `count` images; returns the number of files written."""
    import dataclasses
    import functools

    import jax
    import numpy as np
    from PIL import Image

    from ccnet_jax.commands.restore import load_weights
    from ccnet_jax.data import long_range
    from ccnet_jax.evaluation import attention
    from ccnet_jax.evaluation.evaluate import make_predict_fn
    from ccnet_jax.evaluation.pictures import attention_picture, evaluated_image, prediction_picture
    from ccnet_jax.evaluation.writers import palette, stem, write_label_ids
    from ccnet_jax.train import inputs
    from ccnet_jax.train.step import make_mesh

    inputs.check_classes(config)  # before generating a dataset the model cannot be used on
    config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, batch_size=1, max_images=count))
    mesh = make_mesh(devices=jax.local_devices()[:1])
    # The weights before the data: a folder without a checkpoint is reported before a dataset is generated.
    parts, state = load_weights(config, checkpoint, mesh)
    options.ensure_generated_data(config)
    predict = make_predict_fn(parts, config.eval, config.model.num_classes, mesh)
    normalization = inputs.NORMALIZATIONS[config.data.normalization]
    colours = palette(config.data.name)
    prefer = long_range.TWO_STEP_CLASSES if config.data.name == "long_range" else ()

    maps = attention.jitted_recurrence_maps(functools.partial(parts.model, train=False))

    output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    with inputs.eval_iterator(config, mesh, split) as batches:
        for batch in batches:
            predictions, _ = predict(state.params, state.batch_stats, batch)
            item = evaluated_image(batch, np.asarray(predictions), 0, normalization)
            name = stem(item.name)
            Image.fromarray(prediction_picture(item, colours)).save(output_dir / f"{name}_prediction.png")
            written += 1
            if config.data.name == "cityscapes":
                write_label_ids(output_dir / f"{name}_labelIds.png", item.prediction)
                written += 1
            if config.model.attention == "cca":
                picture = attention_picture(maps, state.params, state.batch_stats, item, pixel, prefer)
                Image.fromarray(picture).save(output_dir / f"{name}_attention.png")
                written += 1
    return written
