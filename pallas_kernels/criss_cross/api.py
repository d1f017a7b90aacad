"""Public entry point of the criss-cross attention op: validation and dispatch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pallas_kernels.criss_cross.config import CrissCrossConfig, MosaicConfig, XlaConfig, default_config
from pallas_kernels.criss_cross.gpu_targets import HOPPER
from pallas_kernels.criss_cross.implementations import Implementation, check_interpret, choose, lowering_target
from pallas_kernels.criss_cross.reference import criss_cross_attention_reference

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def _a(name: str) -> str:
    """`name` with its indefinite article, as read aloud ("an XlaConfig")."""
    return f"{'an' if name[0] in 'AEIOX' else 'a'} {name}"


def _as_arrays(*xs) -> tuple[jax.Array, ...]:
    """NumPy inputs as jax Arrays (they know no device to pick an implementation for); jax Arrays
    and tracers as they are, so that the residuals kept for the backward are the caller's arrays."""
    return tuple(x if isinstance(x, jax.Array) else jnp.asarray(x) for x in xs)


def _validate(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(
                f"criss_cross_attention: {name} must be NHWC of rank 4 (B, H, W, C); "
                f"got shape {tuple(x.shape)} (rank {x.ndim})."
            )
        if x.dtype not in SUPPORTED_DTYPES:
            # float64 arrives with jax_enable_x64 (or from NumPy under it): the op computes in float32 anyway.
            fix = "cast it to float32" if jnp.issubdtype(x.dtype, jnp.floating) else "cast it to a float type"
            raise ValueError(
                f"criss_cross_attention: {name} has dtype {x.dtype}; supported are "
                f"float32, bfloat16 and float16 ({fix})."
            )
        if any(d < 1 for d in x.shape):
            raise ValueError(
                f"criss_cross_attention: {name} has an empty dimension, shape {tuple(x.shape)}; "
                "B, H, W and C must all be >= 1."
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            "criss_cross_attention: q, k and v must share one dtype; got "
            f"q {q.dtype}, k {k.dtype}, v {v.dtype}."
        )
    if q.shape != k.shape:
        raise ValueError(
            "criss_cross_attention: q and k must have the same shape (B, H, W, Cqk); got "
            f"q {tuple(q.shape)} and k {tuple(k.shape)}."
        )
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            "criss_cross_attention: v must share q's (B, H, W); got "
            f"q {tuple(q.shape)} and v {tuple(v.shape)}."
        )


def criss_cross_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: Implementation = None,
    interpret: bool = False,
    config: CrissCrossConfig | MosaicConfig | XlaConfig | None = None,
) -> jax.Array:
    """Criss-cross attention (CCNet), NHWC.

    Args:
      q, k: (B, H, W, Cqk) queries and keys; v: (B, H, W, Cv) values. One
        float dtype for all three (float32, bfloat16 or float16).
      implementation: "xla" (plain jnp, always available), "triton" (the
        fused Pallas kernels through Triton: CUDA GPUs from Ampere on, every
        dtype),
        "mosaic" (the Mosaic GPU kernels: Hopper GPUs, 16-bit inputs with H
        and W <= 256, Cqk <= 128; float32 where its float16-pair forward
        fits in shared memory, e.g. H and W <= 128 at Cqk 64, backward on
        pairs too), "pallas" (mosaic
        where it can serve 16-bit inputs on a Hopper GPU, else triton), or
        None: for bfloat16/float16 on CUDA
        GPUs from Ampere on what "pallas" picks, xla for float32, on older
        GPUs and on other backends, triton with interpret=True.
        `pallas_kernels.criss_cross.implementations` says why; an explicit
        choice that cannot serve the input raises a ValueError naming one
        that can.
      interpret: run the kernels in their interpreter on the CPU (the Pallas
        interpreter for triton, the Mosaic GPU interpreter for mosaic).
      config: a CrissCrossConfig (tiling of the Triton kernels; None picks
        `default_config` for the GPU's generation, Hopper's in the
        interpreter), a MosaicConfig (launch shape of the Mosaic
        forward) or an XlaConfig (float32 products of the xla
        implementation), matching the kernels that run. Where xla runs, a
        kernel config is left unused; where None picks kernels, an XlaConfig
        is.

    Returns:
      (B, H, W, Cv) in v's dtype: for each pixel, the softmax over its column
      (itself excluded) and its row of <q, k> energies, applied to v. No
      energy scaling; gamma and the residual are the module's business.
      Differentiable in q, k and v; through the kernels once and in reverse
      mode only (forward mode and second derivatives raise a
      NotImplementedError, or JAX's TypeError about a custom_vjp function,
      which `jax.linearize` and `jax.hessian` meet only when their results
      are applied: use implementation="xla" for them). Inputs whose batch is
      sharded over Explicit mesh axes (`jax.make_mesh`'s default) run the
      kernels per shard, as `sharded_criss_cross_attention` does; sharding
      H, W or the channels is refused.
    """
    q, k, v = _as_arrays(q, k, v)
    _validate(q, k, v)
    check_interpret(interpret, "criss_cross_attention")
    if config is not None and not isinstance(config, (CrissCrossConfig, MosaicConfig, XlaConfig)):
        raise ValueError(
            "criss_cross_attention: config must be a CrissCrossConfig, a MosaicConfig or an XlaConfig, "
            f"got {type(config)}."
        )
    target = lowering_target(q)
    _, h, w, cqk = q.shape
    requested = implementation
    implementation = choose(implementation, dtype=q.dtype, h=h, w=w, cqk=cqk, target=target, interpret=interpret)
    if implementation == "xla":
        # A kernel config is left unused here, as where None picks xla for float32 or off the GPU.
        products = config if isinstance(config, XlaConfig) else XlaConfig()
        return criss_cross_attention_reference(q, k, v, precision=products.precision(q.dtype))
    if isinstance(config, XlaConfig) and requested is None:
        config = None  # None chose kernels (16-bit inputs on a GPU): xla's products do not apply
    sharded = _explicit_batch_sharding(q, k, v)
    if sharded is not None:
        # A pallas_call is not partitioned: on an Explicit mesh its refs would be sliced along the
        # sharded batch, which Pallas refuses deep inside the kernels.
        mesh, batch_axis = sharded
        return sharded_criss_cross_attention(q, k, v, mesh=mesh, batch_axis=batch_axis,
                                             implementation=implementation, interpret=interpret, config=config)
    wanted = MosaicConfig if implementation == "mosaic" else CrissCrossConfig
    if config is not None and not isinstance(config, wanted):
        raise ValueError(
            f"criss_cross_attention: the {implementation} kernels run here, which take a {wanted.__name__}, "
            f"but config is {_a(type(config).__name__)}."
        )
    if implementation == "mosaic":
        from pallas_kernels.criss_cross.mosaic_op import criss_cross_attention_mosaic

        config = config or MosaicConfig()
        return _run_kernels(
            "mosaic", lambda q, k, v: criss_cross_attention_mosaic(q, k, v, config, interpret), q, k, v
        )
    if not interpret and not target.on_cuda:
        raise ValueError(
            f"criss_cross_attention: implementation={requested!r} compiles through Triton and needs a "
            f"CUDA GPU, but the inputs live on {jax.default_backend()!r}. Pass interpret=True to "
            "run the kernels in the Pallas interpreter, or implementation='xla'."
        )
    from pallas_kernels.criss_cross.pallas_op import criss_cross_attention_pallas

    if config is None:
        # In the Pallas interpreter, the tiling an H100 would run, whatever the machine.
        arch = target.arch if target.on_cuda and not interpret else HOPPER
        config = default_config(h, w, cqk, v.shape[-1], q.dtype.itemsize, arch)
    return _run_kernels("triton", lambda q, k, v: criss_cross_attention_pallas(q, k, v, config, interpret), q, k, v)


def _run_kernels(name: str, kernels, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`kernels(q, k, v)`, with an error that says why where a transformation around the op cannot
    reach into the kernels: Pallas has no JVP of a kernel, so differentiating the op's custom VJP
    (a second derivative) fails deep inside Pallas (a bare AssertionError for Triton, a missing
    rule for Mosaic), and forward mode meets the custom VJP itself."""
    try:
        return kernels(q, k, v)
    except (AssertionError, NotImplementedError, TypeError) as error:
        # Concrete inputs: nothing transforms the call, and an eager run's own failure stands as it is.
        traced = any(isinstance(x, jax.core.Tracer) for x in (q, k, v))
        if not traced or not _traces_alone(kernels, q, k, v):
            raise
        raise NotImplementedError(
            f"criss_cross_attention: the {name} kernels trace on their own but not under the transformations "
            "around this call. They take jit, vmap, jax.checkpoint, scan, shard_map and one reverse-mode "
            "derivative (jax.grad, jax.vjp), not forward mode (jax.jvp, jax.jacfwd, jax.linearize) or a second "
            "derivative (grad of grad, jax.hessian), which would differentiate the kernels themselves. Use "
            "implementation='xla' there."
        ) from error


def _traces_alone(kernels, q: jax.Array, k: jax.Array, v: jax.Array) -> bool:
    """Whether the kernels trace on plain abstract inputs, i.e. whether a failure came from a
    transformation around them rather than from the kernels."""
    try:
        jax.eval_shape(kernels, *(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)))
    except Exception:
        return False
    return True


def _explicit_batch_sharding(q: jax.Array, k: jax.Array, v: jax.Array):
    """(mesh, batch axes) where the inputs' batch is sharded over Explicit mesh axes, else None; a
    ValueError where H, W or the channels are: a strip's kernels need whole rows and columns."""
    batch, mesh = None, None
    for name, x in (("q", q), ("k", k), ("v", v)):
        sharding = jax.typeof(x).sharding
        spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
        for axis, entry in zip("HWC", spec[1:]):
            if entry is not None:
                raise ValueError(
                    f"criss_cross_attention: {name}'s {axis} axis is sharded over mesh axes {entry!r}; the kernels "
                    "attend over whole rows and columns of every channel, so shard the batch only "
                    f"(e.g. jax.sharding.reshard({name}, P('data'))), or use implementation='xla'."
                )
        if spec[0] is not None and batch is None:
            batch = spec[0]
            # A concrete array's own mesh (with devices), else the traced one's abstract mesh.
            mesh = x.sharding.mesh if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) else sharding.mesh
    return None if batch is None else (mesh, batch)


def check_batch_axes(mesh: Mesh, batch_axis: str | tuple[str, ...], where: str) -> tuple[str, ...]:
    """`batch_axis` as a tuple of axis names; a ValueError naming `where` unless `mesh` has each."""
    axes = (batch_axis,) if isinstance(batch_axis, str) else tuple(batch_axis)
    for axis in axes:
        if axis not in mesh.shape:
            raise ValueError(f"{where}: mesh has axes {tuple(mesh.shape)}, no {axis!r}.")
    return axes


def sharded_criss_cross_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mesh: Mesh,
    batch_axis: str | tuple[str, ...] = "data",
    **kwargs,
) -> jax.Array:
    """`criss_cross_attention` on a batch sharded over `mesh`'s `batch_axis`.

    A pallas_call is not partitioned by XLA, so inside a sharded jit the op
    runs per shard under shard_map: each device attends over its own images,
    which is exact since attention never crosses images. On a mesh whose
    batch axis is Explicit (`jax.make_mesh`'s default) the inputs are first
    resharded over it, as shard_map does itself over Auto axes. Keyword
    arguments go to `criss_cross_attention`.
    """
    # Checked whole, before sharding: per shard, a mismatched batch would read as the shards' shapes.
    q, k, v = _as_arrays(q, k, v)
    _validate(q, k, v)
    spec = PartitionSpec(batch_axis)
    axes = check_batch_axes(mesh, batch_axis, "sharded_criss_cross_attention")
    shards = 1
    for axis in axes:
        shards *= mesh.shape[axis]
    if q.shape[0] % shards:
        raise ValueError(
            f"sharded_criss_cross_attention: batch {q.shape[0]} does not divide over the "
            f"{shards} devices of mesh axis {batch_axis!r}."
        )

    explicit = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == AxisType.Explicit}
    if explicit.intersection(axes):
        # shard_map over Explicit axes (jax.make_mesh's default) refuses inputs that are not already
        # sharded as in_specs say, such as a single-device array; over Auto axes it moves them itself.
        sharding = NamedSharding(mesh, spec)
        q, k, v = (jax.sharding.reshard(x, sharding) for x in (q, k, v))

    def per_shard(q, k, v):
        return criss_cross_attention(q, k, v, **kwargs)

    return jax.shard_map(
        per_shard, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
    )(q, k, v)
