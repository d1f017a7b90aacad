"""PyTorch checkpoint files read into numpy arrays, without torch and without running their code.

A `.pth` file is a pickle, and unpickling may call any function the file
names. This reader never does. Its unpickler rebuilds only what a weights
file holds: tensors, their storages, (ordered) dicts, lists, tuples and plain
values. Any other global the file asks for, such as a function behind a
`__reduce__`, stops the read with an `UnsafeCheckpointError` naming it.
Nothing from the file is ever executed.

Two on-disk formats:
- zip (torch >= 1.6): `<name>/data.pkl` is the pickle; each storage is a raw
  file `<name>/data/<key>`; `<name>/byteorder` says little or big endian.
- legacy (torch < 1.6, e.g. the authors' CCNet and MIT CSAIL's ImageNet
  ResNets): a magic-number pickle, a protocol-version pickle and a sys-info
  pickle, then the object's pickle and the pickled list of storage keys,
  then each storage as an 8-byte element count followed by its raw bytes,
  little-endian whatever the machine that saved it.
In both, a tensor is `torch._utils._rebuild_tensor_v2(storage, offset, size,
stride, ...)` over a storage named by a persistent id ('storage', type, key,
location, numel[, view]). Strides and offsets are honoured, so views and
non-contiguous tensors come out as saved.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_TENSOR_ELEMENTS = 2**32
LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks for something a weights file never needs (and that this reader never runs)."""


class CheckpointFormatError(ValueError):
    """The file is not a PyTorch checkpoint this reader understands, or it is damaged."""


class _StorageType(NamedTuple):
    """What `torch.FloatStorage` and its kin stand for in a pickle: an element type, nothing callable.

    A tuple, so that a pickle's BUILD instruction cannot change it.
    """

    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _Storage:
    """A storage's elements, as a flat numpy array."""

    data: np.ndarray


def _rebuild_tensor(storage: _Storage, offset: int, size, stride, *unused) -> np.ndarray:
    """The array torch's `_rebuild_tensor(_v2)` would make: `size` elements at `stride` from `offset`."""
    if not isinstance(storage, _Storage):
        raise CheckpointFormatError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise CheckpointFormatError(f"a tensor has size {size}, stride {stride} and offset {offset}")
    if int(np.prod(size, dtype=np.float64)) > MAX_TENSOR_ELEMENTS:
        # Stride 0 (an expanded tensor) lets a tiny storage claim any size; refuse to materialise a giant.
        raise CheckpointFormatError(f"a tensor of size {size} has more than {MAX_TENSOR_ELEMENTS} elements")
    if 0 in size:
        return np.zeros(size, storage.data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.data.size:
        raise CheckpointFormatError(
            f"a tensor of size {size}, stride {stride} and offset {offset} reaches element {last} of a "
            f"storage of {storage.data.size}: the file is damaged"
        )
    itemsize = storage.data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.data[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data: np.ndarray, requires_grad, backward_hooks, *unused) -> np.ndarray:
    return data


@dataclasses.dataclass(frozen=True)
class _PendingTensor:
    """A legacy-format tensor whose storage bytes come after the object's pickle."""

    storage: _Storage
    args: tuple


def _defer_tensor(storage: _Storage, *args) -> _PendingTensor:
    return _PendingTensor(storage, args)


_CONTAINERS: dict[tuple[str, str], Any] = {("collections", "OrderedDict"): collections.OrderedDict}
_TENSOR_BUILDERS = (("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"))
_PARAMETER_BUILDERS = (("torch._utils", "_rebuild_parameter"), ("torch.nn.parameter", "Parameter"))
_STORAGE_TYPES = {("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()}


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that knows tensors and plain containers, and refuses everything else.

    Each allowed global maps to a harmless stand-in: OrderedDict itself, a
    function that builds a numpy array from a storage (`rebuild`), and inert
    descriptions of the storage types (tuples). Nothing the file names is
    imported. The functions are made afresh for each unpickler, so that
    whatever a file's BUILD instructions set on them dies with its read.
    """

    def __init__(self, stream, source: str, storage: Callable[[tuple], _Storage] | None, rebuild=_rebuild_tensor):
        super().__init__(stream)
        self._source = source
        self._storage = storage

        def rebuild_tensor(*args):
            return rebuild(*args)

        def rebuild_parameter(*args):
            return _rebuild_parameter(*args)

        self._globals = {**_CONTAINERS, **_STORAGE_TYPES}
        self._globals.update(dict.fromkeys(_TENSOR_BUILDERS, rebuild_tensor))
        self._globals.update(dict.fromkeys(_PARAMETER_BUILDERS, rebuild_parameter))

    def find_class(self, module: str, name: str):
        allowed = self._globals.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load the global {module}.{name}: a weights file holds only "
                "tensors, storages, dicts, lists, tuples and plain values, and this reader runs nothing else"
            )
        return allowed

    def persistent_load(self, pid):
        if self._storage is None or not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointFormatError(f"{self._source}: unexpected persistent id {str(pid)[:40]!r}")
        return self._storage(pid)


def _storage_type(pid: tuple, source: str) -> _StorageType:
    kind = pid[1] if len(pid) > 1 else None
    if not isinstance(kind, _StorageType):
        raise CheckpointFormatError(f"{source}: a storage of unsupported type {kind!r} (only dense CPU tensors)")
    return kind


def _array(raw: bytes, dtype: np.dtype, big_endian: bool) -> np.ndarray:
    """The storage's elements, stored little- (or big-) endian, in this machine's byte order."""
    stored = dtype.newbyteorder(">" if big_endian else "<") if dtype.itemsize > 1 else dtype
    data = np.frombuffer(raw, stored)
    return data.astype(dtype) if data.dtype != dtype else data


def _read_zip(path: Path, source: str) -> Any:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointFormatError(f"{source}: a damaged or truncated zip checkpoint ({e})") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointFormatError(f"{source}: a zip file without one data.pkl (found {pickles})")
        root = pickles[0][: -len("data.pkl")]
        try:
            byteorder = archive.read(root + "byteorder").decode().strip() if root + "byteorder" in names else "little"
        except Exception as e:  # a damaged entry
            raise CheckpointFormatError(f"{source}: a damaged zip checkpoint ({e})") from None
        if byteorder not in ("little", "big"):
            raise CheckpointFormatError(f"{source}: unknown byte order {byteorder[:20]!r}")
        loaded: dict[str, _Storage] = {}

        def storage(pid: tuple) -> _Storage:
            kind, key = _storage_type(pid, source), str(pid[2])
            if key not in loaded:
                try:
                    raw = archive.read(f"{root}data/{key}")
                except KeyError:
                    raise CheckpointFormatError(f"{source}: storage {key} is missing from the archive") from None
                loaded[key] = _Storage(_array(raw, kind.dtype, byteorder == "big"))
            return loaded[key]

        try:
            return _WeightsUnpickler(io.BytesIO(archive.read(pickles[0])), source, storage).load()
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as e:  # damaged bytes make pickle and zipfile raise many kinds of errors
            raise CheckpointFormatError(f"{source}: a damaged or truncated zip checkpoint ({e})") from None


def _read_legacy(data: bytes, source: str) -> Any:
    stream = io.BytesIO(data)
    not_a_checkpoint = CheckpointFormatError(f"{source}: not a PyTorch checkpoint (neither zip nor legacy format)")
    try:
        magic = _WeightsUnpickler(stream, source, None).load()
    except UnsafeCheckpointError:
        raise
    except Exception:  # any byte soup: pickle raises many kinds of errors on it
        raise not_a_checkpoint from None
    if magic != LEGACY_MAGIC:
        raise not_a_checkpoint
    pending: dict[str, tuple[_StorageType, list]] = {}

    def storage(pid: tuple) -> _Storage:
        kind, key = _storage_type(pid, source), str(pid[2])
        view = pid[5] if len(pid) > 5 else None
        handle = _Storage(np.empty(0, kind.dtype))  # a placeholder until the bytes are read
        pending.setdefault(key, (kind, []))[1].append((handle, view))
        return handle

    try:
        protocol = _WeightsUnpickler(stream, source, None).load()
        if protocol != LEGACY_PROTOCOL:
            raise CheckpointFormatError(f"{source}: legacy checkpoint of unknown protocol {protocol}")
        # sys info: the saving machine's byte order, which torch ignores on load: it writes legacy
        # storages little-endian on every machine.
        _WeightsUnpickler(stream, source, None).load()
        obj = _WeightsUnpickler(stream, source, storage, rebuild=_defer_tensor).load()
        keys = _WeightsUnpickler(stream, source, None).load()
        arrays: dict[str, np.ndarray] = {}
        for key in map(str, keys):
            if key not in pending:
                raise CheckpointFormatError(f"{source}: storage {key} is listed but no tensor uses it")
            (count,) = struct.unpack("<q", _read_exactly(stream, 8, source))
            dtype = pending[key][0].dtype
            arrays[key] = _array(_read_exactly(stream, count * dtype.itemsize, source), dtype, big_endian=False)
        return _fill_storages(obj, pending, arrays, source)
    except (UnsafeCheckpointError, CheckpointFormatError):
        raise
    except Exception as e:  # damaged bytes make pickle raise many kinds of errors (a self-nesting list, too)
        raise CheckpointFormatError(f"{source}: a damaged or truncated legacy checkpoint ({e})") from None


def _read_exactly(stream: io.BytesIO, n: int, source: str) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise CheckpointFormatError(f"{source}: the file ends early: a truncated legacy checkpoint")
    return data


def _fill_storages(obj: Any, pending: dict, arrays: dict[str, np.ndarray], source: str) -> Any:
    """Rebuild the legacy object's tensors now that the storages' bytes are known."""
    filled: dict[int, _Storage] = {}
    for key, (_, handles) in pending.items():
        if key not in arrays:
            raise CheckpointFormatError(f"{source}: storage {key} has no data in the file")
        for handle, view in handles:
            data = arrays[key]
            if view is not None:
                _, start, length = view
                data = data[int(start) : int(start) + int(length)]
            filled[id(handle)] = _Storage(data)
    return _replace_tensors(obj, filled)


def _replace_tensors(obj: Any, filled: dict[int, _Storage]) -> Any:
    if isinstance(obj, _PendingTensor):
        return _rebuild_tensor(filled[id(obj.storage)], *obj.args)
    if isinstance(obj, dict):
        return type(obj)((k, _replace_tensors(v, filled)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_replace_tensors(v, filled) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_replace_tensors(v, filled) for v in obj)
    return obj


def read_torch_checkpoint(path: str | Path) -> Any:
    """The object saved by `torch.save` at `path`, with every tensor as a numpy array.

    Float tensors keep their dtype (bfloat16 as `ml_dtypes.bfloat16`). Raises
    UnsafeCheckpointError when the file names anything but tensors and plain
    containers, and CheckpointFormatError when it is not a PyTorch checkpoint
    or is damaged or truncated.
    """
    path = Path(path)
    source = str(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory, not a torch.save file; give the file in it.")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    if path.stat().st_size == 0:
        raise CheckpointFormatError(f"{source}: the file is empty (an interrupted download or copy?)")
    if zipfile.is_zipfile(path):
        return _read_zip(path, source)
    data = path.read_bytes()
    if data.startswith(b"PK\x03\x04"):
        raise CheckpointFormatError(f"{source}: a truncated or damaged zip checkpoint (no central directory)")
    return _read_legacy(data, source)
