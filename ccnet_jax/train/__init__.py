"""Training: losses, optimizer, the sharded train step, orbax checkpoints and the loop."""
