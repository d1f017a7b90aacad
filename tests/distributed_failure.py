"""One of two processes (jax.distributed) fails at its second batch; every process must stop there.

    python tests/distributed_failure.py COORDINATOR PROCESS_ID {eval-read,eval-write,train-read}

eval-read: process 1's share of the evaluation holds a damaged example in its second batch;
eval-write: process 1's on_batch (a picture writer) finds its disk full at the second batch;
train-read: process 1's share of the training data holds a damaged example in its second batch,
read before a step whose result every process waits for.
Each process prints "batch N" for each batch it finished.
"""

import errno
import sys

import jax

jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ccnet_jax.data.pipeline import PipelineConfig, make_eval_iterator, make_train_iterator  # noqa: E402
from ccnet_jax.data.transforms import IMAGENET_RGB, EvalConfig, Normalization, TrainAugmentConfig  # noqa: E402
from ccnet_jax.evaluation.evaluate import evaluate, make_predict_fn  # noqa: E402
from ccnet_jax.evaluation.inference import InferenceConfig  # noqa: E402
from ccnet_jax.train.step import make_mesh  # noqa: E402
from tests.test_eval_sizes import CLASSES, PointwiseParts  # noqa: E402

EXAMPLES = 16  # 4 batches of 2 per process; process 1 reads examples 8-15
PIPELINE = PipelineConfig(global_batch_size=4)
IDENTITY = Normalization("rgb", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # a training pixel is its example's index
AUGMENT = TrainAugmentConfig(crop_size=(8, 8), scales=(1.0,), flip_prob=0.0, normalization=IDENTITY)


class Source:
    """8x8 examples whose pixels are their index; reading `damaged` raises as a truncated file would."""

    def __init__(self, damaged: int | None = None):
        self.damaged = damaged

    def __len__(self) -> int:
        return EXAMPLES

    def __getitem__(self, index: int) -> dict:
        if index == self.damaged:
            raise OSError(f"image file {index}.png is truncated")
        return {"image": np.full((8, 8, 3), index, np.uint8), "label": np.full((8, 8), index % CLASSES, np.uint8),
                "file_name": f"{index}.png"}


def second_training_batch_example() -> int:
    """An example of this process's second training batch (its share, shuffled by the seed)."""
    with make_train_iterator(Source(), PIPELINE, AUGMENT) as batches:  # no mesh: this process's numpy batches
        next(batches)
        return int(next(batches)["image"][0, 0, 0, 0])


def evaluation(mode: str, mesh) -> None:
    predict = make_predict_fn(PointwiseParts(), InferenceConfig(), CLASSES, mesh)
    params = jnp.ones((3, CLASSES), jnp.float32)
    count = 0

    def on_batch(batch, predictions) -> None:
        nonlocal count
        count += 1
        if mode == "eval-write" and count == 2 and jax.process_index() == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        print(f"batch {count}", flush=True)

    damaged = 10 if mode == "eval-read" else None  # the first of process 1's second batch
    with make_eval_iterator(Source(damaged), PIPELINE, EvalConfig(normalization=IMAGENET_RGB), mesh) as batches:
        evaluate(predict, params, None, batches, CLASSES, on_batch=on_batch, total=len(batches))


def training(mesh) -> None:
    damaged = second_training_batch_example() if jax.process_index() == 1 else None
    step = jax.jit(lambda image: image.sum())  # sums over every process's rows, as a gradient does
    with make_train_iterator(Source(damaged), PIPELINE, AUGMENT, mesh) as batches:
        for count in range(1, 5):
            float(step(next(batches)["image"]))  # waits for the step, as logging its loss does
            print(f"batch {count}", flush=True)


if __name__ == "__main__":
    if sys.argv[3] == "train-read":
        training(make_mesh())
    else:
        evaluation(sys.argv[3], make_mesh())
