"""experiments/gpu_wheels.py's choice of wheels for the GPU machines (fetching them needs pip's
index; `gpu_check.sh demo` installs them there)."""

import pytest

from tests.experiment_scripts import load_experiment


@pytest.fixture(scope="module")
def wheels():
    return load_experiment("gpu_wheels")


def test_the_closure_follows_the_train_extra_and_nothing_else(wheels):
    needed = wheels.closure()
    # train pulls in model and data, and what they need in turn.
    assert {"jax", "flax", "optax", "orbax-checkpoint", "tensorflow-datasets", "grain", "array-record",
            "tensorboardx", "etils"} <= set(needed)
    # The test extra, and what tfds declares only below Python 3.9, stay out.
    assert not {"pytest", "triton", "ruff"} & set(needed)
    assert all(version[0].isdigit() for version in needed.values())


def test_the_gpu_machines_get_the_data_stack_and_not_what_their_image_holds(wheels):
    missing = wheels.missing_on_gpu()
    assert {"tensorflow-datasets", "grain", "array-record"} <= set(missing)
    assert not {"jax", "jaxlib", "flax", "numpy", "pillow", "protobuf", "ccnet-jax"} & set(missing)


def test_names_are_compared_in_canonical_form(wheels):
    assert wheels.canonical("Orbax_Checkpoint") == wheels.canonical("orbax.checkpoint") == "orbax-checkpoint"
    assert all(name == wheels.canonical(name) for name in wheels.GPU_IMAGE)
