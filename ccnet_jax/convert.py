"""PyTorch <-> Flax weight mapping for CCNet and its ResNet backbones (numpy only, no torch).

PyTorch names (the authors' CCNet, MIT CSAIL / torchvision ResNets):
`conv1/bn1[/conv2/bn2/conv3/bn3]`, `layer{1..4}.{i}.conv{1,2,3}|bn{1,2,3}|downsample.{0,1}`,
`head.conva.{0,1}`, `head.cca.{query,key,value}_conv`, `head.cca.gamma`,
`head.convb.{0,1}`, `head.bottleneck.{0,1,3}`, `dsn.{0,1,3}`, `fc` (ImageNet only).
Conv weights are (out, in, kh, kw) there and (kh, kw, in, out) here; BatchNorm
`weight, bias, running_mean, running_var` are `scale, bias, mean, var`;
`num_batches_tracked` has no counterpart and is skipped. `gamma` is (1,) there
and a scalar here.

The authors' BatchNorm is InPlaceABN(Sync), which scales by |weight| + eps, not
by weight (it keeps the normalisation invertible). Their checkpoints, and the
ImageNet weights as their network uses them, therefore load with
`inplace_abn=True`: the scale here is |weight| + 1e-5, so a negative weight
keeps the sign the authors' network gives it.

Weights files are read without torch (`read_state_dict`): `torch.save` files in
the zip or the legacy format through `ccnet_jax.torch_checkpoint`, which never
runs code from the file; `.safetensors`; and `.npz` of PyTorch-named arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import ml_dtypes
import numpy as np
from flax import nnx

from ccnet_jax.models.layers import BN_EPSILON

Format = Literal["authors", "imagenet-deep", "torchvision"]


@dataclasses.dataclass(frozen=True)
class CheckpointFormat:
    """How a family of PyTorch checkpoints maps onto the models here.

    model: which model the names describe ("ccnet" or the "resnet" backbone).
    stem: the ResNet stem they were trained with.
    ignore_prefixes: names that are expected and dropped (ImageNet's `fc`).
    inplace_abn: whether the weights are used as the authors' network uses them,
      through InPlaceABN (see the module docstring).
    """

    model: Literal["ccnet", "resnet"]
    stem: Literal["deep", "torchvision"]
    ignore_prefixes: tuple[str, ...] = ()
    inplace_abn: bool = False  # BatchNorm scale = |weight| + eps, as the authors' InPlaceABN applies it


FORMATS: dict[str, CheckpointFormat] = {
    "authors": CheckpointFormat("ccnet", "deep", inplace_abn=True),
    # The ImageNet ResNet the authors start from, loaded into their InPlaceABN network.
    "imagenet-deep": CheckpointFormat("resnet", "deep", ("fc.",), inplace_abn=True),
    "torchvision": CheckpointFormat("resnet", "torchvision", ("fc.",)),
}

# Module paths whose PyTorch names differ in more than the Sequential indices.
_PREFIX_RENAMES: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("backbone",), ()),  # the authors' CCNet *is* the ResNet, with head and dsn added
    (("aux", "conv_bn", "conv"), ("dsn", "0")),
    (("aux", "conv_bn", "bn"), ("dsn", "1")),
    (("aux", "classifier"), ("dsn", "3")),  # dsn.2 is the Dropout2d
    (("head", "classifier"), ("head", "bottleneck", "3")),
)
# ConvBN is nn.Sequential(conv, bn) in PyTorch.
_SEQUENTIAL_INDEX = {"conv": "0", "bn": "1"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var", "gamma": "gamma"}
_SKIPPED_SUFFIXES = (".num_batches_tracked",)


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model (strict loading)."""


@dataclasses.dataclass
class LoadReport:
    """What a load did. Names are PyTorch names.

    loaded: entries copied into the model.
    missing: model entries the checkpoint lacks (left as they were).
    unexpected: checkpoint entries nothing in the model matches.
    mismatched: (name, checkpoint shape, expected PyTorch shape).
    ignored: entries dropped on purpose (num_batches_tracked, `ignore_prefixes`).
    stripped_prefix: "module." when a DataParallel prefix was removed.
    """

    loaded: list[str] = dataclasses.field(default_factory=list)
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    ignored: list[str] = dataclasses.field(default_factory=list)
    stripped_prefix: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, limit: int = 20) -> str:
        def listing(title: str, items: Sequence) -> str:
            shown = "\n".join(f"    {item}" for item in items[:limit])
            more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
            return f"  {title} ({len(items)}):\n{shown}{more}"

        lines = [f"  loaded: {len(self.loaded)}, ignored: {len(self.ignored)}"]
        if self.stripped_prefix:
            lines.append(f"  stripped prefix {self.stripped_prefix!r} from every name")
        if self.missing:
            lines.append(listing("missing from the checkpoint", self.missing))
        if self.unexpected:
            lines.append(listing("unexpected in the checkpoint", self.unexpected))
        if self.mismatched:
            rows = [f"{n}: checkpoint {tuple(a)} vs model {tuple(b)}" for n, a, b in self.mismatched]
            lines.append(listing("shape mismatches", rows))
        return "\n".join(lines)


def _variables(model: nnx.Module) -> list[tuple[tuple, nnx.Variable]]:
    state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
    return list(nnx.to_flat_state(state))


def torch_name(path: Sequence[str | int]) -> str:
    """The PyTorch state-dict name of the NNX variable at `path`.

    `path` is a key path of `nnx.state(model)`, e.g. ('backbone', 'layer3', 0,
    'downsample', 'conv', 'kernel') -> 'layer3.0.downsample.0.weight'.
    """
    modules = tuple(str(p) for p in path[:-1])
    leaf = str(path[-1])
    for prefix, replacement in _PREFIX_RENAMES:
        if modules[: len(prefix)] == prefix:
            modules = replacement + modules[len(prefix) :]
            break
    modules = tuple(_SEQUENTIAL_INDEX.get(m, m) for m in modules)
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"torch_name: no PyTorch counterpart for variable {leaf!r} at {path}.")
    return ".".join((*modules, _LEAF_NAMES[leaf]))


def _to_torch(leaf: str, value: np.ndarray, inplace_abn: bool) -> np.ndarray:
    if leaf == "kernel":
        return np.transpose(value, (3, 2, 0, 1))
    if leaf == "gamma":
        return value.reshape(1)
    if leaf == "scale" and inplace_abn:
        return value - np.asarray(BN_EPSILON, value.dtype)
    return value


def _from_torch(leaf: str, value: np.ndarray, shape: tuple[int, ...], inplace_abn: bool) -> np.ndarray:
    if leaf == "kernel":
        return np.transpose(value, (2, 3, 1, 0))
    if leaf == "scale" and inplace_abn:
        return inplace_abn_scale(value).reshape(shape)
    return value.reshape(shape)


def inplace_abn_scale(weight: np.ndarray) -> np.ndarray:
    """The scale InPlaceABN applies for a BatchNorm `weight`: |weight| + eps, in the weight's dtype."""
    weight = np.asarray(weight)
    return np.abs(weight) + np.asarray(BN_EPSILON, weight.dtype)


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel":
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    if leaf == "gamma":
        return (1,)
    return tuple(shape)


def torch_state_dict(
    model: nnx.Module, *, num_batches_tracked: bool = True, inplace_abn: bool = False
) -> dict[str, np.ndarray]:
    """Export the model's parameters and BN statistics under PyTorch names, PyTorch layouts.

    With `num_batches_tracked` each BN also gets that int64 scalar (0: Flax
    does not count batches; PyTorch only reads it when momentum is None), so
    the dict loads into the PyTorch network with strict=True. BatchNorm weights
    are the scales, for `nn.BatchNorm2d`; with `inplace_abn` they are scale - eps,
    for the authors' InPlaceABN network, which cannot apply a scale below eps
    (ValueError naming the layer).
    """
    out: dict[str, np.ndarray] = {}
    for path, variable in _variables(model):
        name = torch_name(path)
        value = np.asarray(variable[...])
        if inplace_abn and str(path[-1]) == "scale" and (value < BN_EPSILON).any():
            raise ValueError(f"{name}: the authors' InPlaceABN scales by |weight| + {BN_EPSILON}, so it cannot "
                             f"apply this BatchNorm's scale {float(value.min()):.3g}; export for nn.BatchNorm2d "
                             "(inplace_abn=False)")
        out[name] = _to_torch(str(path[-1]), value, inplace_abn)
        if num_batches_tracked and str(path[-1]) == "mean":
            out[name.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.zeros((), np.int64)
    return out


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} from a weights file, floating arrays as float32, names as saved.

    `.npz` (PyTorch-named arrays) and `.safetensors` are read as they are; any
    other file is taken as a `torch.save` file (`.pth`, `.pt`, `.bin`,
    `.pth.tar`; zip or legacy format) and read by the safe reader. Its state
    dict may be the saved object itself, sit under one of `STATE_DICT_KEYS`
    (nested too), or be the one dict of tensors beside other entries (an
    optimizer, an epoch); entries of the state dict that are not tensors are
    left out.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"{path} is a directory; give the weights file in it (.pth, .pt, .bin, .safetensors or .npz)."
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: _from_npz(path, k, data[k]) for k in data.files}
    elif path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        arrays = load_file(path)
    else:
        from ccnet_jax.torch_checkpoint import read_torch_checkpoint

        obj = _find_state_dict(read_torch_checkpoint(path), path)
        arrays = {name: value for name, value in obj.items() if isinstance(value, np.ndarray)}
    return {
        name: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) or value.dtype.kind == "V"
        else value
        for name, value in arrays.items()
    }


# Where training scripts put the model's state dict in a checkpoint that also holds other things.
STATE_DICT_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network")


def _holds_tensors(obj) -> bool:
    return isinstance(obj, dict) and any(isinstance(v, np.ndarray) for v in obj.values())


def _find_state_dict(obj, path: Path) -> dict:
    while isinstance(obj, dict):
        key = next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}.")
    if _holds_tensors(obj):
        return obj
    candidates = [k for k, v in obj.items() if _holds_tensors(v)]
    if len(candidates) == 1:
        return obj[candidates[0]]
    found = (f"several entries hold tensors ({', '.join(map(repr, candidates))})" if candidates
             else f"no entry holds tensors (its keys: {', '.join(map(repr, list(obj)[:10]))})")
    raise ValueError(
        f"{path}: cannot tell where the state dict (name -> tensor) is: {found}. Pick it in Python with "
        "ccnet_jax.torch_checkpoint.read_torch_checkpoint and save it with numpy.savez as a .npz."
    )


def _from_npz(path: Path, name: str, value: np.ndarray) -> np.ndarray:
    # numpy stores ml_dtypes' bfloat16 (what np.asarray makes of JAX's bfloat16) as 2-byte void.
    if value.dtype == np.dtype("V2"):
        return value.view(ml_dtypes.bfloat16)
    if value.dtype.kind == "V":
        raise ValueError(f"{path}: array {name!r} has the non-numeric dtype {value.dtype}.")
    return value


def _strip_data_parallel(state_dict: Mapping[str, object]) -> tuple[dict, str | None]:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}, "module."
    return dict(state_dict), None


def load_torch_state_dict(
    model: nnx.Module,
    state_dict: Mapping[str, np.ndarray],
    *,
    strict: bool = True,
    ignore_prefixes: Sequence[str] = (),
    inplace_abn: bool = False,
) -> LoadReport:
    """Copy PyTorch-named arrays into `model` in place.

    Args:
      model: a CCNet (authors' names) or a ResNet (backbone names).
      state_dict: {PyTorch name: array-like}, e.g. `{k: v.numpy() for k, v
        in torch.load(...).items()}`; a "module." prefix on every name
        (DataParallel) is removed.
      strict: raise `WeightLoadError` (and change nothing) on any missing or
        unexpected name or shape mismatch; with False, load what matches and
        report the rest, as the authors load ImageNet weights.
      ignore_prefixes: names expected in the checkpoint and dropped, such as
        ("fc.",) for ImageNet classifiers.
      inplace_abn: BatchNorm weights are as the authors' InPlaceABN uses them:
        the scale becomes |weight| + eps (the formats "authors" and
        "imagenet-deep"); False copies them, for `nn.BatchNorm2d` networks.

    Returns:
      A `LoadReport`.
    """
    state_dict, stripped = _strip_data_parallel(state_dict)
    report = LoadReport(stripped_prefix=stripped)
    used: set[str] = set()
    updates: list[tuple[nnx.Variable, np.ndarray]] = []
    for path, variable in _variables(model):
        leaf = str(path[-1])
        name = torch_name(path)
        if name not in state_dict:
            report.missing.append(name)
            continue
        used.add(name)
        value = np.asarray(state_dict[name])
        expected = _torch_shape(leaf, tuple(variable.shape))
        if tuple(value.shape) != expected:
            report.mismatched.append((name, tuple(value.shape), expected))
            continue
        updates.append((variable, _from_torch(leaf, value, tuple(variable.shape), inplace_abn).astype(variable.dtype)))
        report.loaded.append(name)
    for name in state_dict:
        if name in used:
            continue
        if name.endswith(_SKIPPED_SUFFIXES) or any(name.startswith(p) for p in ignore_prefixes):
            report.ignored.append(name)
        else:
            report.unexpected.append(name)
    if strict and not report.ok:
        raise WeightLoadError(
            "the checkpoint does not match the model; nothing was loaded.\n"
            f"{report.summary()}\n"
            "Check the format/depth/stem/num_classes, or load with strict=False "
            "(--non-strict) to take what matches."
        )
    for variable, value in updates:
        variable.set_value(np.asarray(value))
    return report


def _strip(name: str) -> str:
    return name[len("module.") :] if name.startswith("module.") else name


def guess_format(state_dict: Mapping[str, object]) -> Format | None:
    """The `FORMATS` entry the names look like: "authors" with a CCNet head, else by the stem
    (conv2/conv3 for the deep stem, a lone conv1 for torchvision's); None when it is no ResNet."""
    names = {_strip(n) for n in state_dict}
    if any(n.startswith(("head.", "dsn.")) for n in names):
        return "authors"
    if "conv1.weight" not in names:
        return None
    return "imagenet-deep" if "conv2.weight" in names else "torchvision"


def infer_blocks(state_dict: dict[str, np.ndarray]) -> tuple[int, int, int, int]:
    """Bottleneck blocks per stage (layer1..layer4), counted from the names."""
    counts = []
    for stage in range(1, 5):
        prefix = f"layer{stage}."
        indices = {int(_strip(n).split(".")[1]) for n in state_dict if _strip(n).startswith(prefix)}
        if not indices:
            raise ValueError(f"no {prefix}* weights in the checkpoint: is it a ResNet/CCNet state dict? "
                             "Check --format.")
        counts.append(max(indices) + 1)
    return tuple(counts)


def infer_depth(state_dict: dict[str, np.ndarray]) -> tuple[int, tuple[int, int, int, int] | None]:
    """(depth, blocks): a published depth when the block counts are one, else blocks as counted
    (depth then only names the family, 101)."""
    from ccnet_jax.models.resnet import BLOCKS_BY_DEPTH

    blocks = infer_blocks(state_dict)
    for depth, standard in BLOCKS_BY_DEPTH.items():
        if blocks == tuple(standard):
            return depth, None
    return 101, blocks


def infer_width(state_dict: dict[str, np.ndarray]) -> int:
    """The network width (64 for every published ResNet) from conv1's output channels."""
    for name, value in state_dict.items():
        if _strip(name) == "conv1.weight":
            return int(value.shape[0])
    raise ValueError("no conv1.weight in the checkpoint: is it a ResNet/CCNet state dict? Check --format.")


def infer_num_classes(state_dict: dict[str, np.ndarray]) -> int:
    """Classes from the authors' classifier `head.bottleneck.3.weight`."""
    for name, value in state_dict.items():
        if _strip(name) == "head.bottleneck.3.weight":
            return int(value.shape[0])
    raise ValueError("cannot infer the number of classes: no head.bottleneck.3.weight. Pass --num-classes.")
