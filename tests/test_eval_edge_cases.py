"""Evaluation used at its edges: a class count that does not match the model, prediction and label maps of
different shapes, sliding windows with gaps, and the IoU table's alignment."""

import jax.numpy as jnp
import numpy as np
import pytest

from ccnet_jax.evaluation import inference, metrics
from ccnet_jax.evaluation.evaluate import make_predict_fn
from ccnet_jax.evaluation.inference import InferenceConfig
from ccnet_jax.train.step import make_mesh


class PointwiseParts:
    """Stands in for ModelParts: logits = image @ params, so the class count is params' last axis."""

    def model(self, params, batch_stats, *, train):
        return lambda x: (jnp.einsum("bhwc,ck->bhwk", x, params), None)


def _batch(classes_in_labels: int) -> dict:
    rng = np.random.default_rng(0)
    size = np.full(4, 6, np.int32)
    return {"image": rng.normal(size=(4, 6, 6, 3)).astype(np.float32),
            "label": rng.integers(0, classes_in_labels, (4, 6, 6)).astype(np.uint8),
            "height": size, "width": size, "label_height": size, "label_width": size}


def test_a_class_count_other_than_the_models_is_refused_not_miscounted():
    # A 6-class model scored as 3 classes would put predictions 3..5 into other true classes' rows.
    params = jnp.asarray(np.random.default_rng(1).normal(size=(3, 6)), jnp.float32)
    wrong = make_predict_fn(PointwiseParts(), InferenceConfig(), 3, make_mesh())
    with pytest.raises(ValueError, match="the model predicts 6 classes but num_classes is 3"):
        wrong(params, None, _batch(3))
    _, confusion = make_predict_fn(PointwiseParts(), InferenceConfig(), 6, make_mesh())(params, None, _batch(6))
    assert int(np.asarray(confusion).sum()) == 4 * 6 * 6


@pytest.mark.parametrize("prediction_shape, label_shape", [
    ((1, 97, 129), (1, 48, 64)),  # logits at the image's size, labels at their own
    ((8, 8), (2, 8, 8)),  # broadcasts: one prediction map would be scored against two labels
    ((2, 8, 8), (1, 8, 8)),
])
def test_prediction_and_label_maps_of_different_shapes_are_named(prediction_shape, label_shape):
    with pytest.raises(ValueError, match=r"predictions \(.*\) and labels \(.*\) must have one shape; resize"):
        metrics.confusion_matrix(jnp.zeros(prediction_shape, jnp.int32), jnp.zeros(label_shape, jnp.uint8), 3)


def test_the_pixel_accuracy_lines_up_with_the_iou_column():
    table = metrics.format_table(np.array([[3, 1], [0, 4]]), ["road", "sky"]).splitlines()
    header, *rows = table
    column_end = header.index("IoU") + len("IoU")
    for row, value in zip(rows, ["0.7500", "0.8000", "0.8750"]):
        assert row.index(value) + len(value) == column_end, table



def test_sliding_windows_further_apart_than_wide_are_refused_not_averaged_to_nan():
    images = jnp.ones((1, 20, 20, 3))
    with pytest.raises(ValueError, match=r"stride \(8, 8\) must not exceed crop \(4, 4\)"):
        inference.sliding_window_logits(lambda x: x, images, (4, 4), (8, 8))
