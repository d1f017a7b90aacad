"""Test set-up: four host devices so that sharding tests have a mesh on CPU, and the embedded
dataset for the tests that train or evaluate."""

import os

import pytest

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The embedded long_range dataset (its tiny config), prepared once per test module that asks."""
    from ccnet_jax.data import prepare

    path = tmp_path_factory.mktemp("data")
    prepare("long_range", path, None, "tiny")
    return path
