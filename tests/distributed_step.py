"""One training step on a fixed global batch, in one process or as one of several (jax.distributed).

    python tests/distributed_step.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

Each process feeds its rows of the same global batch; process 0 writes the
loss and the updated parameters to OUT.npz.
"""

import sys

import jax

if len(sys.argv) > 2:
    jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=int(sys.argv[3]),
                               process_id=int(sys.argv[4]))

import numpy as np  # noqa: E402

from ccnet_jax.models import CCNetConfig  # noqa: E402
from ccnet_jax.train import losses, optim  # noqa: E402
from ccnet_jax.train import state as state_lib
from ccnet_jax.train import step as step_lib

BATCH = 4


def main(out: str) -> None:
    mesh = step_lib.make_mesh()
    config = CCNetConfig(num_classes=7, width=8, blocks=(1, 1, 1, 1), implementation="xla")
    model = state_lib.build_model(config, seed=0, mesh=mesh)
    tx = optim.make_optimizer(optim.OptimizerConfig(), 10)
    parts, state = state_lib.init_state(model, tx, seed=0, mesh=mesh)
    train_step = step_lib.make_train_step(parts, tx, losses.LossConfig(ohem=True, ohem_min_kept=500), mesh)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(BATCH, 32, 40, 3)).astype(np.float32) * 50
    labels = rng.integers(0, 7, (BATCH, 32, 40)).astype(np.uint8)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    per_process = BATCH // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    batch = {
        "image": jax.make_array_from_process_local_data(sharding, images[rows], images.shape),
        "label": jax.make_array_from_process_local_data(sharding, labels[rows], labels.shape),
    }
    state, metrics = train_step(state, batch)
    state, metrics = train_step(state, batch)
    params = [np.asarray(x.addressable_data(0)) for x in jax.tree.leaves(state.params)]
    if jax.process_index() == 0:
        np.savez(out, loss=np.asarray(metrics["loss"].addressable_data(0)), *params)


if __name__ == "__main__":
    main(sys.argv[1])
