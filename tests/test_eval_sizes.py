"""Evaluation of images of different sizes on 4 devices: scored at each label's own resolution.

Batches mix sizes (so images and labels are padded), images may be resized
(ADE20K's `eval_resize`) and padded to a fixed `pad_to`. A pointwise model
(a 1x1 linear map, no receptive field) makes padding invisible to the
logits, so the batched result must equal each image evaluated on its own,
with a float64 scipy resize of its logits onto its label.
"""

import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from ccnet_jax.data.pipeline import PipelineConfig, make_eval_iterator
from ccnet_jax.data.transforms import IMAGENET_RGB, EvalConfig, EvalTransform
from ccnet_jax.evaluation.evaluate import evaluate, make_predict_fn
from ccnet_jax.evaluation.inference import InferenceConfig
from ccnet_jax.train.step import make_mesh
from tests.train_helpers import REPO, env

CLASSES = 4
SIZES = [(9, 13), (17, 9), (12, 12), (7, 20), (16, 5)]  # 5 images on 4 devices: one padding row too


class PointwiseParts:
    """Stands in for ModelParts: logits = image @ params, pixel by pixel."""

    def model(self, params, batch_stats, *, train):
        return lambda x: (jnp.einsum("bhwc,ck->bhwk", x, params, precision=jax.lax.Precision.HIGHEST), None)


def mixed_size_source() -> list[dict]:
    """Five examples of different sizes, random pixels and labels (a fifth ignored)."""
    rng = np.random.default_rng(7)
    examples = []
    for i, (h, w) in enumerate(SIZES):
        label = rng.integers(0, CLASSES, (h, w)).astype(np.uint8)
        label[rng.random((h, w)) < 0.2] = 255
        examples.append({"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": label,
                         "file_name": f"{i}.png"})
    return examples


def _aligned_resize(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float64 bilinear resize with aligned corners, by scipy's map_coordinates."""
    h, w, c = logits.shape
    rows = np.arange(size[0]) * ((h - 1) / (size[0] - 1) if size[0] > 1 else 0.0)
    cols = np.arange(size[1]) * ((w - 1) / (size[1] - 1) if size[1] > 1 else 0.0)
    grid = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([ndimage.map_coordinates(logits[..., k], grid, order=1) for k in range(c)], axis=-1)


@pytest.mark.parametrize("inference", [
    InferenceConfig(),
    InferenceConfig(mode="sliding", crop_size=(8, 8), stride=(6, 6), flip=True),
])
@pytest.mark.parametrize("resize, pad_to", [(None, None), ((20, 10), None), ((20, 10), (24, 24)), (None, (24, 24))])
def test_mixed_sizes_are_scored_at_label_resolution(inference, resize, pad_to):
    assert jax.device_count() == 4
    mesh = make_mesh()
    params = jnp.asarray(np.random.default_rng(1).normal(size=(3, CLASSES)), jnp.float32)
    predict = make_predict_fn(PointwiseParts(), inference, CLASSES, mesh)
    source = mixed_size_source()
    eval_config = EvalConfig(resize=resize, pad_to=pad_to, normalization=IMAGENET_RGB)

    seen = {}
    with make_eval_iterator(source, PipelineConfig(global_batch_size=4), eval_config, mesh) as batches:
        def keep(batch, predictions):
            for row, index in enumerate(np.asarray(batch["index"])):
                if index >= 0:
                    h, w = int(batch["label_height"][row]), int(batch["label_width"][row])
                    seen[int(index)] = predictions[row][:h, :w]
                    label = np.asarray(batch["label"])[row]
                    assert np.all(label[h:] == 255) and np.all(label[:, w:] == 255)

        confusion = evaluate(predict, params, None, batches, CLASSES, on_batch=keep)

    expected = np.zeros((CLASSES, CLASSES), np.int64)
    for index, example in enumerate(source):
        alone = EvalTransform(EvalConfig(resize=resize, normalization=IMAGENET_RGB)).map(example)
        logits = _aligned_resize(alone["image"].astype(np.float64) @ np.asarray(params, np.float64),
                                 example["label"].shape)
        top2 = np.sort(logits, axis=-1)[..., -2:]
        decided = top2[..., 1] - top2[..., 0] > 1e-3
        reference = logits.argmax(-1)
        assert seen[index].shape == example["label"].shape
        np.testing.assert_array_equal(seen[index][decided], reference[decided])
        labelled = example["label"] != 255
        np.add.at(expected, (example["label"][labelled], seen[index][labelled]), 1)
    assert sorted(seen) == list(range(len(SIZES)))
    np.testing.assert_array_equal(confusion, expected)
    assert confusion.sum() == sum(int((e["label"] != 255).sum()) for e in mixed_size_source())


SCRIPT = str(REPO / "tests" / "distributed_eval.py")


def _two_processes(out, *extra: str) -> list[tuple[int, str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    processes = [subprocess.Popen([sys.executable, SCRIPT, str(out), coordinator, "2", str(i), *extra], env=env(2),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [process.communicate(timeout=300) for process in processes]
    return [(process.returncode, out, err) for process, (out, err) in zip(processes, outputs)]


@pytest.mark.slow
def test_processes_with_different_largest_images_agree_on_one_size(tmp_path):
    # Two processes of two devices: process 0's second batch mixes sizes (padded to 64x64), process 1's
    # holds two padding copies of one image (not padded); both must use one size.
    single = tmp_path / "one.npy"
    subprocess.run([sys.executable, SCRIPT, str(single)], env=env(4), check=True, timeout=300, capture_output=True)
    double = tmp_path / "two.npy"
    for returncode, _, err in _two_processes(double):
        assert returncode == 0, err[-3000:]
    one, two = np.load(single), np.load(double)
    assert one.sum() == sum(int((e["label"] != 255).sum()) for e in mixed_size_source())
    np.testing.assert_array_equal(two, one)


@pytest.mark.slow
def test_sigterm_on_one_process_stops_every_process_after_the_same_batch(tmp_path):
    results = _two_processes(tmp_path / "unused.npy", "sigterm")
    for index, (returncode, out, err) in enumerate(results):
        assert returncode == 0, err[-3000:]
        assert f"process {index}: evaluation stopped after batch 1/2" in out, out + err[-2000:]


def test_sigterm_stops_a_single_process_evaluation_after_the_current_batch():
    import os
    import signal

    from ccnet_jax.preemption import EvaluationStopped, Preemption

    predict = make_predict_fn(PointwiseParts(), InferenceConfig(), CLASSES, make_mesh())
    params = jnp.ones((3, CLASSES), jnp.float32)
    seen = []
    before = signal.getsignal(signal.SIGTERM)
    with make_eval_iterator(mixed_size_source(), PipelineConfig(global_batch_size=4), EvalConfig(),
                            make_mesh()) as batches, Preemption() as preemption:
        def on_batch(batch, _):
            seen.append(batch)
            os.kill(os.getpid(), signal.SIGTERM)  # handled: the process goes on

        with pytest.raises(EvaluationStopped, match="after batch 1/2"):
            evaluate(predict, params, None, batches, CLASSES, on_batch=on_batch, total=len(batches),
                     stop=preemption.now)
    assert len(seen) == 1
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is gone with the context


def test_ctrl_c_asks_for_a_stop_like_sigterm_and_a_second_one_stops_at_once(capsys):
    # Ctrl-C raised KeyboardInterrupt wherever the run was: the steps since the last checkpoint were lost.
    import os
    import signal

    from ccnet_jax.preemption import Preemption

    before = signal.getsignal(signal.SIGINT)
    with Preemption() as preemption:
        assert not preemption.now() and preemption.reason == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # handled: the process goes on
        assert preemption.now() and preemption.at_step(3) and preemption.reason == "Ctrl-C"
        assert "press Ctrl-C again to stop at once" in capsys.readouterr().err
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
