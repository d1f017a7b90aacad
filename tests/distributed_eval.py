"""Evaluation of mixed-size images, in one process or as one of several (jax.distributed).

    python tests/distributed_eval.py OUT.npy [COORDINATOR NUM_PROCESSES PROCESS_ID [sigterm]]

Process 0 writes the confusion matrix to OUT.npy. Each process pads its
batches to its own largest image first; the processes must agree on one size.
With `sigterm`, the last process sends itself SIGTERM after the first batch:
every process must stop after that same batch, and prints where it stopped.
"""

import os
import signal
import sys
import time

import jax

if len(sys.argv) > 2:
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=int(sys.argv[3]),
                               process_id=int(sys.argv[4]))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from ccnet_jax.data.pipeline import PipelineConfig, make_eval_iterator  # noqa: E402
from ccnet_jax.data.transforms import IMAGENET_RGB, EvalConfig  # noqa: E402
from ccnet_jax.evaluation.evaluate import evaluate, make_predict_fn  # noqa: E402
from ccnet_jax.evaluation.inference import InferenceConfig  # noqa: E402
from ccnet_jax.preemption import EvaluationStopped, Preemption  # noqa: E402
from ccnet_jax.train.step import make_mesh  # noqa: E402
from tests.test_eval_sizes import CLASSES, PointwiseParts, mixed_size_source  # noqa: E402


def main(out: str, sigterm: bool) -> None:
    mesh = make_mesh()
    params = jnp.asarray(np.random.default_rng(1).normal(size=(3, CLASSES)), jnp.float32)
    predict = make_predict_fn(PointwiseParts(), InferenceConfig(), CLASSES, mesh)
    eval_config = EvalConfig(resize=(20, 10), normalization=IMAGENET_RGB)
    shapes = []

    def on_batch(batch, _):
        shapes.append(batch["image"].shape + batch["label"].shape)
        if sigterm and len(shapes) == 1 and jax.process_index() == jax.process_count() - 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the notice reaches the coordination service

    with make_eval_iterator(mixed_size_source(), PipelineConfig(global_batch_size=4), eval_config, mesh) as batches:
        with Preemption() as preemption:
            try:
                confusion = evaluate(predict, params, None, batches, CLASSES, on_batch=on_batch,
                                     total=len(batches), stop=preemption.now)
            except EvaluationStopped as stopped:
                print(f"process {jax.process_index()}: {stopped}", flush=True)
                return
    # A global array is one shape on every process (jax does not check it on CPU).
    everyone = multihost_utils.process_allgather(np.array(shapes))
    assert np.all(everyone == everyone[:1]), everyone
    if jax.process_index() == 0:
        np.save(out, confusion)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[-1] == "sigterm")
