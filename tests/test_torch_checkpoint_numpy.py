"""Checkpoints holding numpy values beside the tensors: read back exactly, and nothing else let in.

Training scripts save numpy scalars (`best_pred`) and arrays (class weights) beside the state
dict. The files are written here without torch: `_torch_save` pickles torch's names as text, and
the numpy values as numpy itself pickles them, under numpy 2's `numpy._core` names or numpy 1.x's
`numpy.core` ones: `_numpy_names` renames them, giving what numpy 1.26.4 writes (compared once, up
to `pickletools.optimize`, for each protocol).
"""

import collections
import io
import pickle
import pickletools
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ccnet_jax import numpy_reference as ref
from ccnet_jax.cli import main as cli_main
from ccnet_jax.convert import read_state_dict, torch_state_dict
from ccnet_jax.converted_checkpoint import build_converted
from ccnet_jax.torch_checkpoint import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_torch_checkpoint,
)
from tests.converted_models import as_converted
from tests.torch_pickles import Global, Malicious

FORMATS = ["zip", "legacy"]
_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class _Storage:
    def __init__(self, array: np.ndarray):
        self.array = array


class _Tensor:
    """A torch tensor in the pickle: `_rebuild_tensor_v2` over a storage of the array's elements."""

    def __init__(self, array: np.ndarray):
        self.storage = _Storage(np.array(array, order="C"))

    def __reduce__(self):
        array = self.storage.array
        stride = tuple(s // array.itemsize for s in array.strides)
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (self.storage, 0, array.shape, stride, False, collections.OrderedDict()))


class _Reduce:
    """Any object whose pickle is `func(*args)`, then BUILD with `state` when given."""

    def __init__(self, func, args: tuple, state=None):
        self.reduced = (func, args) if state is None else (func, args, state)

    def __reduce__(self):
        return self.reduced


class _TorchPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Global] = lambda self, g: self.write(f"c{g.module}\n{g.name}\n".encode())

    def __init__(self, file, protocol: int, legacy: bool):
        super().__init__(file, protocol=protocol)
        self.legacy, self.storages = legacy, []

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        self.storages.append(obj.array)
        pid = ("storage", Global("torch", _STORAGES[obj.array.dtype]), str(len(self.storages) - 1), "cpu",
               obj.array.size)
        return pid + (None,) if self.legacy else pid  # legacy ids end with the storage's view


def _numpy_names(data: bytes, major: int) -> bytes:
    """The pickle with numpy `major`'s module names: numpy 1.x writes `numpy.core`, numpy 2 `numpy._core`."""
    old, new = ("numpy._core.", "numpy.core.") if major == 1 else ("numpy.core.", "numpy._core.")
    for module in ("multiarray", "numeric"):
        a, b = (old + module).encode(), (new + module).encode()
        data = data.replace(b"c" + a + b"\n", b"c" + b + b"\n")  # GLOBAL (protocol 2)
        data = data.replace(bytes([0x8C, len(a)]) + a, bytes([0x8C, len(b)]) + b)  # SHORT_BINUNICODE (4, 5)
    return pickletools.optimize(data)  # new frames (protocols 4, 5) around names of another length


def _torch_save(obj, fmt: str, protocol: int = 2, numpy_major: int | None = None) -> bytes:
    """`torch.save(obj)`'s bytes in `fmt`, `_Tensor`s standing for the tensors."""
    pickled = io.BytesIO()
    pickler = _TorchPickler(pickled, protocol, legacy=fmt == "legacy")
    pickler.dump(obj)
    data = pickled.getvalue() if numpy_major is None else _numpy_names(pickled.getvalue(), numpy_major)
    if fmt == "legacy":
        header = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": 1}))
        keys = pickle.dumps([str(i) for i in range(len(pickler.storages))], protocol=2)
        return header + data + keys + b"".join(struct.pack("<q", a.size) + a.tobytes() for a in pickler.storages)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", data)
        archive.writestr("archive/byteorder", "little")
        for key, array in enumerate(pickler.storages):
            archive.writestr(f"archive/data/{key}", array.tobytes())
    return out.getvalue()


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(data)
    return path


WEIGHT = np.arange(24, dtype=np.float32).reshape(4, 6) / 8 - 1
CLASS_WEIGHTS = np.linspace(0.5, 2, 38, dtype=np.float32).reshape(2, 19)
FORTRAN = np.asfortranarray(np.arange(12, dtype=np.float64).reshape(3, 4) / 7)


def _training_checkpoint() -> dict:
    """What a training script saves: numpy values beside the state dict of tensors."""
    state_dict = collections.OrderedDict([("conv.weight", _Tensor(WEIGHT)),
                                          ("bn.num_batches_tracked", _Tensor(np.array(5, np.int64)))])
    return {"state_dict": state_dict, "best_pred": np.float64(0.7974), "epoch": 10, "step": np.int64(-123456789012),
            "finished": np.bool_(True), "lr": np.float32(0.01), "class_weights": CLASS_WEIGHTS, "fortran": FORTRAN,
            "empty": np.zeros((0, 3), np.float32), "big_endian": np.arange(5, dtype=">i4"),
            "history": [np.float64(0.5), (np.int64(3), np.arange(3, dtype=np.uint8))]}


@pytest.mark.parametrize("numpy_major", [1, 2])
@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("fmt", FORMATS)
def test_numpy_scalars_and_arrays_beside_the_tensors_read_back_exactly(tmp_path, fmt, protocol, numpy_major):
    data = _torch_save(_training_checkpoint(), fmt, protocol, numpy_major)
    # The file carries the names of the numpy it stands for (protocol 5 writes contiguous arrays
    # through numeric._frombuffer, the others through multiarray._reconstruct).
    core = b"numpy.core." if numpy_major == 1 else b"numpy._core."
    assert core + b"multiarray" in data and (core + b"numeric" in data) == (protocol == 5)
    assert (b"numpy._core." if numpy_major == 1 else b"numpy.core.") not in data
    obj = read_torch_checkpoint(_write(tmp_path, data))

    for name, value in (("best_pred", np.float64(0.7974)), ("step", np.int64(-123456789012)),
                        ("finished", np.bool_(True)), ("lr", np.float32(0.01))):
        assert type(obj[name]) is type(value) and obj[name] == value, name
    assert obj["epoch"] == 10 and type(obj["epoch"]) is int
    for name, expected in (("class_weights", CLASS_WEIGHTS), ("fortran", FORTRAN),
                           ("empty", np.zeros((0, 3), np.float32))):
        assert type(obj[name]) is np.ndarray and obj[name].dtype == expected.dtype, name
        assert obj[name].shape == expected.shape, name
        np.testing.assert_array_equal(obj[name], expected, err_msg=name)
        assert obj[name].flags.writeable, name
    assert obj["fortran"].flags.f_contiguous and not obj["fortran"].flags.c_contiguous
    # Big-endian values come in this machine's byte order, as tensors do.
    assert obj["big_endian"].dtype == np.dtype(np.int32)
    np.testing.assert_array_equal(obj["big_endian"], np.arange(5))
    first, (second, third) = obj["history"]
    assert type(first) is np.float64 and first == 0.5 and type(second) is np.int64 and second == 3
    assert third.dtype == np.uint8 and third.tolist() == [0, 1, 2]
    # The tensors beside them are as before.
    sd = obj["state_dict"]
    assert sd["conv.weight"].dtype == np.float32
    np.testing.assert_array_equal(sd["conv.weight"], WEIGHT)
    assert sd["bn.num_batches_tracked"].dtype == np.int64 and sd["bn.num_batches_tracked"] == 5


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_state_dict_is_found_beside_numpy_values(tmp_path, fmt):
    sd = read_state_dict(_write(tmp_path, _torch_save(_training_checkpoint(), fmt)))
    assert sorted(sd) == ["bn.num_batches_tracked", "conv.weight"]
    np.testing.assert_array_equal(sd["conv.weight"], WEIGHT)


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_object_array_is_refused_and_the_objects_in_it_never_load(tmp_path, fmt, protocol):
    marker = tmp_path / "payload-ran"
    names = np.array(["road", Malicious(marker)], dtype=object)
    path = _write(tmp_path, _torch_save({"state_dict": {"w": _Tensor(WEIGHT)}, "names": names}, fmt, protocol))
    with pytest.raises(UnsafeCheckpointError, match=r"numpy value of dtype object.*pickled Python objects"):
        read_torch_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="dtype object"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("value", [np.array(["road", "sky"]), np.datetime64("2020-01-01"),
                                   np.zeros(2, "i4,f8"), np.array([1 + 2j], np.clongdouble)])
def test_numpy_values_of_other_dtypes_are_refused_by_dtype(tmp_path, value):
    path = _write(tmp_path, _torch_save({"state_dict": {"w": _Tensor(WEIGHT)}, "value": value}, "zip"))
    with pytest.raises(CheckpointFormatError, match=r"numpy value of dtype '\w+'.*only numbers and booleans"):
        read_torch_checkpoint(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("module, name", [("os", "system"), ("numpy", "load"), ("numpy.core.multiarray", "fromstring"),
                                          ("numpy._core.multiarray", "_vec_string"), ("builtins", "eval")])
def test_other_globals_are_still_refused_by_name(tmp_path, fmt, module, name):
    path = _write(tmp_path, _torch_save({"w": _Tensor(WEIGHT), "x": _Reduce(Global(module, name), ("true",))}, fmt))
    with pytest.raises(UnsafeCheckpointError, match=rf"refused to load the global {module}\.{name}:"):
        read_torch_checkpoint(path)


_RECONSTRUCT = Global("numpy._core.multiarray", "_reconstruct")
_NDARRAY = Global("numpy", "ndarray")


@pytest.mark.parametrize("obj, error", [
    # numpy's own array pickle, with data for 2 floats and a shape of 3
    (_Reduce(_RECONSTRUCT, (_NDARRAY, (0,), b"b"), (1, (3,), np.dtype("f4"), False, b"\0" * 8)), "3 elements"),
    # an array of another type than ndarray (here numpy.dtype, a global the reader allows)
    (_Reduce(_RECONSTRUCT, (Global("numpy", "dtype"), (0,), b"b")), "not numpy.ndarray"),
    # an array never given its data
    (_Reduce(_RECONSTRUCT, (_NDARRAY, (0,), b"b")), "without its data"),
    # a scalar's bytes for another dtype
    (_Reduce(Global("numpy._core.multiarray", "scalar"), (np.dtype("f8"), b"\0" * 4)), "4 bytes"),
    # bytes spelt in another codec
    (_Reduce(Global("_codecs", "encode"), ("abc", "rot13")), "rot13"),
])
def test_damaged_numpy_values_are_named_as_such(tmp_path, obj, error):
    path = _write(tmp_path, _torch_save({"w": _Tensor(WEIGHT), "x": obj}, "zip"))
    with pytest.raises(CheckpointFormatError, match=error):
        read_torch_checkpoint(path)


def test_ccnet_convert_reads_a_training_checkpoint_with_numpy_values(tmp_path):
    sd = ref.random_state_dict(ref.authors_shapes(ref.TINY_WIDTH, ref.TINY_BLOCKS, ref.TINY_CLASSES), seed=3)
    checkpoint = {"state_dict": {f"module.{k}": _Tensor(v) for k, v in sd.items()}, "epoch": 120,
                  "best_pred": np.float64(0.7922), "class_weights": np.ones(ref.TINY_CLASSES, np.float32)}
    source = _write(tmp_path, _torch_save(checkpoint, "legacy"))
    assert cli_main(["convert", str(source), str(tmp_path / "out")]) == 0
    exported = torch_state_dict(build_converted(tmp_path / "out"), num_batches_tracked=False)
    expected = as_converted(sd)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
