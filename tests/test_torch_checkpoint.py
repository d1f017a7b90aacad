"""Reading PyTorch checkpoints without torch: both formats, every dtype, views, and no code run.

The fixtures were written once with torch by tests/fixtures/torch_checkpoints/write_fixtures.py;
nothing here imports torch.
"""

import io
import pickle
import struct
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from ccnet_jax.convert import read_state_dict
from ccnet_jax.torch_checkpoint import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    CheckpointFormatError,
    UnsafeCheckpointError,
    read_torch_checkpoint,
)
from tests.torch_pickles import Malicious

FIXTURES = Path(__file__).parent / "fixtures" / "torch_checkpoints"
FORMATS = ["zip", "legacy"]
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float64": np.float64,
          "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
          "bool": np.bool_}


@pytest.fixture(scope="module")
def expected():
    with np.load(FIXTURES / "dtypes_expected.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_dtype_and_view_comes_out_as_torch_saved_it(fmt, expected):
    obj = read_torch_checkpoint(FIXTURES / f"dtypes.{fmt}.pth")
    assert obj["epoch"] == 3
    sd = obj["state_dict"]
    assert list(sd) == list(expected)
    for name, dtype in DTYPES.items():
        assert sd[f"module.{name}"].dtype == np.dtype(dtype), name
    for name, value in sd.items():
        assert value.shape == expected[name].shape, name
        np.testing.assert_array_equal(value.astype(expected[name].dtype), expected[name], err_msg=name)
    # The views keep their values, not their storage's layout.
    np.testing.assert_array_equal(sd["module.transposed"], expected["module.float64"].T / 3)
    assert sd["module.strided_slice"].shape == (2, 3)


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_is_found_under_state_dict_with_floats_as_float32(fmt, expected):
    sd = read_state_dict(FIXTURES / f"dtypes.{fmt}.pth")
    assert sorted(sd) == sorted(expected)  # "epoch" is not a tensor and is left out
    assert sd["module.bfloat16"].dtype == np.float32 and sd["module.float64"].dtype == np.float32
    assert sd["module.int64"].dtype == np.int64 and sd["module.bool"].dtype == np.bool_
    np.testing.assert_array_equal(sd["module.bfloat16"], expected["module.bfloat16"].astype(np.float32))


def test_safetensors_are_read_too(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, ml_dtypes.bfloat16),
              "n": np.array(7, np.int64)}
    save_file(arrays, tmp_path / "w.safetensors")
    sd = read_state_dict(tmp_path / "w.safetensors")
    np.testing.assert_array_equal(sd["a.weight"], arrays["a.weight"])
    assert sd["b"].dtype == np.float32 and sd["n"].dtype == np.int64


def _legacy_file(obj_pickle: bytes) -> bytes:
    header = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}))
    return header + obj_pickle + pickle.dumps([], protocol=2)


def _zip_file(obj_pickle: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", obj_pickle)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
    return out.getvalue()


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(fmt, tmp_path):
    marker = tmp_path / "payload-ran"
    evil = pickle.dumps({"weight": [1.0, 2.0], "trap": Malicious(marker)}, protocol=2)
    # The pickle is genuinely malicious: plain pickle runs the payload.
    pickle.loads(evil)
    assert marker.read_text() == "ran"
    marker.unlink()

    path = tmp_path / "evil.pth"
    path.write_bytes(_zip_file(evil) if fmt == "zip" else _legacy_file(evil))
    refusal = r"refused to load the global tests\.torch_pickles\.payload"
    with pytest.raises(UnsafeCheckpointError, match=refusal):
        read_torch_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_give_a_clear_error(fmt, tmp_path):
    data = (FIXTURES / f"dtypes.{fmt}.pth").read_bytes()
    for cut in (len(data) // 3, len(data) // 2, len(data) - 5):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointFormatError, match="truncated"):
            read_torch_checkpoint(path)


def test_other_files_are_named_as_such(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_bytes(b"these are not weights")
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        read_torch_checkpoint(path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(CheckpointFormatError, match="not a PyTorch checkpoint"):
        read_torch_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        read_torch_checkpoint(tmp_path / "absent.pth")


def _text(value: str) -> bytes:
    return b"X" + struct.pack("<I", len(value)) + value.encode()


def _legacy_tensor_file(size: int, numel: int) -> bytes:
    """A hand-assembled legacy checkpoint {"w": tensor of `size` floats over a `numel`-float storage}."""
    # ('storage', FloatStorage, key '0', 'cpu', numel, no view), as a persistent id.
    storage_id = (b"(" + _text("storage") + b"ctorch\nFloatStorage\n" + _text("0") + _text("cpu")
                  + b"K" + bytes([numel]) + b"Nt")
    # _rebuild_tensor_v2(storage, offset 0, size (size,), stride (1,), False, OrderedDict())
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage_id + b"Q" + b"K\x00K" + bytes([size])
              + b"\x85K\x01\x85" + b"\x89ccollections\nOrderedDict\n)Rt" + b"R")
    obj = b"\x80\x02}" + _text("w") + tensor + b"s."
    header = b"".join(pickle.dumps(x, protocol=2) for x in (LEGACY_MAGIC, LEGACY_PROTOCOL, {"little_endian": True}))
    data = np.arange(numel, dtype=np.float32).tobytes()
    return header + obj + pickle.dumps(["0"], protocol=2) + struct.pack("<q", numel) + data


def test_hand_assembled_legacy_file_reads_and_a_tensor_past_its_storage_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(_legacy_tensor_file(size=4, numel=4))
    np.testing.assert_array_equal(read_torch_checkpoint(path)["w"], np.arange(4, dtype=np.float32))
    path.write_bytes(_legacy_tensor_file(size=10, numel=4))
    with pytest.raises(CheckpointFormatError, match="reaches element 9 of a storage of 4"):
        read_torch_checkpoint(path)


def test_a_file_cannot_change_the_reader_for_later_files(tmp_path, expected):
    # GLOBAL torch.FloatStorage, then BUILD with state (None, {"dtype": "u1"}): an attempt to make
    # every later float32 storage read as bytes. The storage types are tuples, which refuse it.
    build = (b"\x80\x02ctorch\nFloatStorage\nN}" + _text("dtype") + _text("u1") + b"s\x86b.")
    path = tmp_path / "tamper.pth"
    path.write_bytes(_legacy_file(build))
    with pytest.raises(CheckpointFormatError):
        read_torch_checkpoint(path)
    sd = read_torch_checkpoint(FIXTURES / "dtypes.zip.pth")["state_dict"]
    assert sd["module.float32"].dtype == np.float32
    np.testing.assert_array_equal(sd["module.float32"], expected["module.float32"])
