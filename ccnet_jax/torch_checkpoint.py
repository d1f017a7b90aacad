"""PyTorch checkpoint files read into numpy arrays, without torch and without running their code.

A `.pth` file is a pickle, and unpickling may call any function the file
names. This reader never does. Its unpickler rebuilds only what a weights
file holds: tensors, their storages, (ordered) dicts, lists, tuples, plain
values, and the numpy numbers and arrays that training scripts save beside
them (`best_pred`, class weights). Any other global the file asks for, such as
a function behind a `__reduce__`, stops the read with an
`UnsafeCheckpointError` naming it. Nothing from the file is ever executed.

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

A numpy value is pickled as numpy's own calls, which are never made here: its
dtype `numpy.dtype(name, align, copy)` then BUILD (byte order); a scalar
`scalar(dtype, bytes)`; an array `_reconstruct(ndarray, (0,), b'b')` then BUILD
(1, shape, dtype, is_fortran, bytes), or, in protocol 5, `_frombuffer(bytes,
dtype, shape, order)`. Their module is `numpy.core.multiarray` (`.numeric`)
when numpy 1.x wrote the file, `numpy._core.*` when numpy 2 did. The reader
rebuilds numbers and booleans from their bytes with `np.frombuffer`; any other
dtype is refused, object arrays (whose elements are pickled objects) above
all. Protocol 2, torch's default, pickles bytes as `_codecs.encode(text,
'latin1')` (`bytes()` when empty), which is read as exactly that.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
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


# The numpy dtypes read, by the names numpy's pickle gives them ('f8'): numbers and booleans, whose values are
# their bytes. Long double is left out: its bytes differ from machine to machine.
_NUMPY_DTYPES = {
    f"{d.kind}{d.itemsize}": d
    for d in map(np.dtype, (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32,
                            np.uint64, np.float16, np.float32, np.float64, np.complex64, np.complex128))
}


class _NumpyDtype:
    """What `numpy.dtype(name, align, copy)` stands for in a pickle: a plain dtype, in the byte order BUILD gives."""

    def __init__(self, source: str, dtype: np.dtype):
        self.source, self.dtype = source, dtype

    def __setstate__(self, state) -> None:
        # numpy's state of a plain dtype: (3, byte order, no subarray, no names, no fields, size, alignment, flags).
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "=", "|")
                and state[2:5] == (None, None, None)):
            raise CheckpointFormatError(f"{self.source}: a numpy {self.dtype} dtype with the state {state!r:.80}")
        self.dtype = self.dtype.newbyteorder(state[1])


class _NumpyClass(NamedTuple):
    """What `numpy.ndarray` stands for in a pickle: a name, for `_reconstruct` to check.

    A tuple, so that a pickle's BUILD instruction cannot change it.
    """

    name: str


_NDARRAY = _NumpyClass("numpy.ndarray")


class _NumpyArray:
    """An array `_reconstruct` began: pickle's BUILD hands its state to `__setstate__`, which makes the array.

    BUILD leaves this object where the array goes, so `_replace_placeholders`
    puts the array there once the pickle is read.
    """

    # Unhashable, as an array is: none hides in a set or a dict's keys, where `_replace_placeholders` does not look.
    __hash__ = None

    def __init__(self, source: str):
        self.source = source
        self.array: np.ndarray | None = None

    def __setstate__(self, state) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1 and isinstance(state[3], bool)):
            raise CheckpointFormatError(f"{self.source}: a numpy array with the state {state!r:.80}")
        _, shape, dtype, fortran, data = state
        self.array = _numpy_array(self.source, data, _plain_dtype(self.source, dtype), shape, "F" if fortran else "C")

    def result(self) -> np.ndarray:
        if self.array is None:
            raise CheckpointFormatError(f"{self.source}: a numpy array without its data: the file is damaged")
        return self.array


def _numpy_dtype(source: str, name, align=False, copy=False) -> _NumpyDtype:
    """What `numpy.dtype(name, align, copy)` stands for when `name` is a plain dtype's; any other is refused."""
    dtype = _NUMPY_DTYPES.get(name) if isinstance(name, str) else None
    if dtype is not None:
        return _NumpyDtype(source, dtype)
    if isinstance(name, str) and name.startswith("O"):
        raise UnsafeCheckpointError(
            f"{source}: refused a numpy value of dtype object: its elements are pickled Python objects, which "
            "this reader never loads (it reads numpy numbers and booleans)"
        )
    raise CheckpointFormatError(f"{source}: a numpy value of dtype {name!r:.40}: only numbers and booleans are read")


def _plain_dtype(source: str, dtype) -> np.dtype:
    if not isinstance(dtype, _NumpyDtype):
        raise CheckpointFormatError(f"{source}: a numpy value whose dtype is a {type(dtype).__name__}")
    return dtype.dtype


def _numpy_scalar(source: str, dtype, data) -> np.generic:
    """What numpy's `scalar(dtype, data)` makes: the number whose bytes are `data`."""
    dtype = _plain_dtype(source, dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        got = f"{len(data)} bytes" if isinstance(data, bytes) else f"a {type(data).__name__}"
        raise CheckpointFormatError(f"{source}: a numpy {dtype} scalar of {got}: the file is damaged")
    return np.frombuffer(data, dtype)[0]


def _numpy_array(source: str, data, dtype: np.dtype, shape, order) -> np.ndarray:
    """The array of `shape` whose elements, in `order`, are `data`'s bytes, in this machine's byte order."""
    if not (isinstance(data, (bytes, bytearray)) and isinstance(shape, tuple)
            and all(type(n) is int and n >= 0 for n in shape) and order in ("C", "F")):
        raise CheckpointFormatError(f"{source}: a numpy array of shape {shape!r:.40} over a {type(data).__name__}")
    if math.prod(shape) * dtype.itemsize != len(data):
        raise CheckpointFormatError(
            f"{source}: a numpy array of shape {shape} ({math.prod(shape)} elements of {dtype}) over {len(data)} "
            "bytes: the file is damaged"
        )
    # astype copies (a writable array, as tensors are), keeping a Fortran-ordered array Fortran-ordered.
    return np.frombuffer(data, dtype).reshape(shape, order=order).astype(dtype.newbyteorder("="))


def _numpy_frombuffer(source: str, data, dtype, shape, order) -> np.ndarray:
    return _numpy_array(source, data, _plain_dtype(source, dtype), shape, order)


def _latin1(source: str, text, encoding) -> bytes:
    """Bytes as protocol 2 pickles them: `_codecs.encode(text, 'latin1')`, and nothing else that function does."""
    if not (isinstance(text, str) and encoding == "latin1"):
        raise CheckpointFormatError(f"{source}: _codecs.encode of a {type(text).__name__} to {encoding!r:.20}")
    return text.encode("latin1")


def _empty_bytes(source: str, *args) -> bytes:
    """Empty bytes as protocol 2 pickles them: `bytes()`; with an argument, bytes() could make anything."""
    if args:
        raise CheckpointFormatError(f"{source}: bytes() of {len(args)} arguments")
    return b""


def _numpy_globals(source: str, arrays: list[_NumpyArray]) -> dict[tuple[str, str], Any]:
    """Stand-ins for the globals of numpy's pickles (and of bytes in protocol 2), made afresh for each unpickler.

    Each array `_reconstruct` begins is added to `arrays`.
    """

    def standin(function: Callable) -> Callable:
        def call(*args):
            return function(source, *args)

        return call

    def reconstruct(subtype, shape, typecode) -> _NumpyArray:
        if subtype is not _NDARRAY:
            raise CheckpointFormatError(f"{source}: a numpy array of type {subtype!r:.40}, not numpy.ndarray")
        arrays.append(_NumpyArray(source))
        return arrays[-1]

    found: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): _NDARRAY,
        ("numpy", "dtype"): standin(_numpy_dtype),
        ("_codecs", "encode"): standin(_latin1),
        ("__builtin__", "bytes"): standin(_empty_bytes),
        ("builtins", "bytes"): standin(_empty_bytes),
    }
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x's names, numpy 2's
        found[(f"{core}.multiarray", "scalar")] = standin(_numpy_scalar)
        found[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        found[(f"{core}.numeric", "_frombuffer")] = standin(_numpy_frombuffer)
    return found


class _WeightsUnpickler(pickle.Unpickler):
    """An unpickler that knows tensors and plain containers, and refuses everything else.

    Each allowed global maps to a harmless stand-in: OrderedDict itself, a
    function that builds a numpy array from a storage (`rebuild`), inert
    descriptions of the storage types (tuples), and functions that rebuild
    numpy numbers and arrays from their bytes. Nothing the file names is
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
        self.numpy_arrays: list[_NumpyArray] = []
        self._globals.update(_numpy_globals(source, self.numpy_arrays))

    def find_class(self, module: str, name: str):
        allowed = self._globals.get((module, name))
        if allowed is None:
            raise UnsafeCheckpointError(
                f"{self._source}: refused to load the global {module}.{name}: a weights file holds only "
                "tensors, storages, dicts, lists, tuples, numpy numbers and plain values, and this reader runs "
                "nothing else"
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
            unpickler = _WeightsUnpickler(io.BytesIO(archive.read(pickles[0])), source, storage)
            obj = unpickler.load()
            # Walked only when needed: the walk copies the containers, and a cycle among them would not end.
            return _replace_placeholders(obj, {}) if unpickler.numpy_arrays else obj
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
    return _replace_placeholders(obj, filled)


def _replace_placeholders(obj: Any, filled: dict[int, _Storage]) -> Any:
    """`obj` with its legacy tensors rebuilt over `filled` storages, each numpy array in its builder's place."""
    if isinstance(obj, _PendingTensor):
        return _rebuild_tensor(filled[id(obj.storage)], *obj.args)
    if isinstance(obj, _NumpyArray):
        return obj.result()
    if isinstance(obj, dict):
        return type(obj)((k, _replace_placeholders(v, filled)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_replace_placeholders(v, filled) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_replace_placeholders(v, filled) for v in obj)
    return obj


def read_torch_checkpoint(path: str | Path) -> Any:
    """The object saved by `torch.save` at `path`, with every tensor as a numpy array.

    Float tensors keep their dtype (bfloat16 as `ml_dtypes.bfloat16`). numpy
    numbers and arrays saved beside them come back as numpy made them (arrays
    in this machine's byte order). Raises UnsafeCheckpointError when the file
    names anything but tensors, numpy numbers and plain containers (an object
    array too), and CheckpointFormatError when it is not a PyTorch checkpoint,
    holds a numpy value of another dtype, or is damaged or truncated.
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
