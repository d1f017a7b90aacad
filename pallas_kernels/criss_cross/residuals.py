"""Names of what the fused ops keep for their backward, for `jax.checkpoint` policies.

The Triton and Mosaic ops save q, k, v (the Mosaic float32 op: v's float16
pair), their output and a per-pixel log-sum-exp. Under `jax.checkpoint(f, policy=keep_attention_residuals())`
the output and the log-sum-exp are kept, and everything else in f (for the
CCNet layer: the 1x1 projections that make q, k and v) is recomputed in the
backward, while the attention kernels themselves run only once.
"""

from __future__ import annotations

import jax
from jax.ad_checkpoint import checkpoint_name

OUTPUT = "criss_cross_output"
LOG_SUM_EXP = "criss_cross_lse"


def name_residuals(out: jax.Array, lse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """out and lse tagged with the names `keep_attention_residuals` keeps."""
    return checkpoint_name(out, OUTPUT), checkpoint_name(lse, LOG_SUM_EXP)


def keep_attention_residuals():
    """A `jax.checkpoint` policy that saves the fused op's output and log-sum-exp, nothing else."""
    return jax.checkpoint_policies.save_only_these_names(OUTPUT, LOG_SUM_EXP)
