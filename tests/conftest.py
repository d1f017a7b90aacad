"""Test set-up: four host devices so that sharding tests have a mesh on CPU."""

import os

# Must be set before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
