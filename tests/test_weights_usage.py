"""Bringing PyTorch weights as a user would: checkpoints of training scripts, wrong flags, odd files.

torch is not needed: `_torch_zip` writes torch's zip format (the pickle of `torch.save`, naming
torch's rebuild function and storage types, which are never imported) from numpy arrays.
"""

import collections
import io
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from ccnet_jax import numpy_reference as ref
from ccnet_jax.cli import main as cli_main
from ccnet_jax.convert import read_state_dict, torch_state_dict
from ccnet_jax.converted_checkpoint import build_converted, restore_converted
from ccnet_jax.models import CCNet, CCNetConfig
from ccnet_jax.torch_checkpoint import read_torch_checkpoint
from tests.converted_models import as_converted, converted_tiny_ccnet
from tests.torch_pickles import Global

FIXTURES = Path(__file__).parent / "fixtures" / "torch_checkpoints"
W, BLOCKS, CLASSES = ref.TINY_WIDTH, ref.TINY_BLOCKS, ref.TINY_CLASSES
_STORAGES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float16): "HalfStorage",
             np.dtype(ml_dtypes.bfloat16): "BFloat16Storage", np.dtype(np.int64): "LongStorage"}


class _Tensor:
    def __init__(self, array: np.ndarray, key: str):
        self.array, self.key = np.ascontiguousarray(array), key

    def __reduce__(self):
        stride = tuple(s // self.array.itemsize for s in self.array.strides)
        return (Global("torch._utils", "_rebuild_tensor_v2"),
                (("storage of", self), 0, self.array.shape, stride, False, collections.OrderedDict()))


class _TorchPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Global] = lambda self, g: self.write(f"c{g.module}\n{g.name}\n".encode())

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "storage of":
            array = obj[1].array
            return ("storage", Global("torch", _STORAGES[array.dtype]), obj[1].key, "cpu", array.size)
        return None


def _torch_zip(obj) -> bytes:
    """`torch.save(obj)`'s zip-format bytes, numpy arrays standing for the tensors."""
    tensors = []

    def wrap(value):
        if isinstance(value, np.ndarray):
            tensors.append(_Tensor(value, str(len(tensors))))
            return tensors[-1]
        if isinstance(value, dict):
            return type(value)((k, wrap(v)) for k, v in value.items())
        if isinstance(value, list):
            return [wrap(v) for v in value]
        return value

    pickled = io.BytesIO()
    _TorchPickler(pickled, protocol=2).dump(wrap(obj))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("archive/data.pkl", pickled.getvalue())
        archive.writestr("archive/byteorder", "little")
        for tensor in tensors:
            archive.writestr(f"archive/data/{tensor.key}", tensor.array.tobytes())
    return out.getvalue()


@pytest.fixture(scope="module")
def tiny_fp16():
    """The float16 tiny CCNet written by torch (tests/fixtures/torch_checkpoints)."""
    return read_torch_checkpoint(FIXTURES / "ccnet_tiny.zip.pth")


def _training_checkpoint(key: str, state_dict: dict) -> dict:
    """What a training script saves: the model under `key` (DataParallel names), optimizer state, epoch."""
    optimizer = {"state": {0: {"momentum_buffer": np.ones(3, np.float32)}},
                 "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": [0]}]}
    return {key: {f"module.{k}": v for k, v in state_dict.items()}, "optimizer": optimizer, "epoch": 7}


@pytest.mark.parametrize("key", ["net", "model_state", "model_state_dict", "my_weights"])
def test_a_state_dict_under_another_key_beside_optimizer_state_is_found(tmp_path, tiny_fp16, key):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(_torch_zip(_training_checkpoint(key, tiny_fp16)))
    sd = read_state_dict(path)
    assert sorted(sd) == sorted(f"module.{k}" for k in tiny_fp16)
    np.testing.assert_array_equal(sd["module.conv1.weight"], tiny_fp16["conv1.weight"].astype(np.float32))


def test_a_training_checkpoint_of_float16_weights_converts_to_float32_params(tmp_path, tiny_fp16, capsys):
    source = tmp_path / "checkpoint.pth"
    source.write_bytes(_torch_zip(_training_checkpoint("net", tiny_fp16)))
    assert cli_main(["convert", str(source), str(tmp_path / "out")]) == 0
    # R is not in the weights: the user is told which R was recorded and how to change it.
    assert "recurrence 2 (not in the weights: set it with --recurrence)" in capsys.readouterr().out
    model = build_converted(tmp_path / "out")
    assert {np.asarray(v[...]).dtype for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))} == {
        np.dtype(np.float32)}
    exported, expected = torch_state_dict(model, num_batches_tracked=False), as_converted(tiny_fp16)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_a_checkpoint_without_one_clear_state_dict_says_what_it_holds(tmp_path, tiny_fp16):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(_torch_zip({"student": dict(tiny_fp16), "teacher": dict(tiny_fp16), "epoch": 7}))
    with pytest.raises(ValueError, match=r"several entries hold tensors \('student', 'teacher'\)"):
        read_state_dict(path)
    path.write_bytes(_torch_zip({"epoch": 7, "best_miou": 0.8}))
    with pytest.raises(ValueError, match=r"no entry holds tensors \(its keys: 'epoch', 'best_miou'\)"):
        read_state_dict(path)


def _imagenet(stem: str) -> dict:
    sd = ref.random_state_dict(ref.backbone_shapes(W, BLOCKS, stem), seed=2)
    sd["fc.weight"] = np.zeros((10, 32 * W), np.float32)
    sd["fc.bias"] = np.zeros(10, np.float32)
    return sd


@pytest.mark.parametrize(
    "weights, given, fitting",
    [
        ("imagenet-deep", [], "imagenet-deep"),  # --format forgotten: not "pass --num-classes"
        ("imagenet-deep", ["--num-classes", "19"], "imagenet-deep"),
        ("torchvision", ["--format", "imagenet-deep"], "torchvision"),
        ("imagenet-deep", ["--format", "torchvision"], "imagenet-deep"),
        ("authors", ["--format", "imagenet-deep"], "authors"),
    ],
)
def test_a_wrong_format_is_refused_with_the_format_that_fits(tmp_path, capsys, weights, given, fitting):
    sd = (ref.random_state_dict(ref.authors_shapes(W, BLOCKS, CLASSES), seed=1) if weights == "authors"
          else _imagenet(weights.removeprefix("imagenet-")))
    source = tmp_path / "weights.npz"
    np.savez(source, **sd)
    assert cli_main(["convert", str(source), str(tmp_path / "out"), *given]) == 1
    assert f"pass --format {fitting}." in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bfloat16_arrays_in_an_npz_are_read_as_float32(tmp_path):
    weights = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    np.savez(tmp_path / "w.npz", w=weights.astype(ml_dtypes.bfloat16), n=np.array(3, np.int64))
    sd = read_state_dict(tmp_path / "w.npz")
    assert sd["w"].dtype == np.float32 and sd["n"].dtype == np.int64
    np.testing.assert_array_equal(sd["w"], weights)


def test_a_directory_or_an_empty_file_is_named_as_such(tmp_path, capsys):
    folder = tmp_path / "downloaded"
    folder.mkdir()
    assert cli_main(["convert", str(folder), str(tmp_path / "out")]) == 1
    assert "is a directory" in capsys.readouterr().err
    empty = tmp_path / "ccnet.pth"
    empty.write_bytes(b"")
    assert cli_main(["convert", str(empty), str(tmp_path / "out")]) == 1
    assert "the file is empty" in capsys.readouterr().err


def test_restoring_into_a_deeper_model_names_the_arrays_it_lacks(tmp_path):
    converted = converted_tiny_ccnet(tmp_path)
    deeper = CCNet(config=CCNetConfig(num_classes=CLASSES, width=W, blocks=(1, 1, 3, 2)), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="does not fit this model") as error:
        restore_converted(deeper, converted)
    message = str(error.value)
    assert "no batch_stats.backbone.layer3.2.bn1.mean" in message
    assert len(message) < 1500  # the few arrays that differ, not every stored name
