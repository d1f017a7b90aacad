"""`ccnet export`: the artefact runs without the package and gives the model's logits."""

import json
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ccnet_jax import exported_loader
from ccnet_jax import numpy_reference as ref
from ccnet_jax.cli import main as cli_main
from ccnet_jax.converted_checkpoint import build_converted
from ccnet_jax.evaluation.inference import InferenceConfig, predict_logits
from ccnet_jax.evaluation.predict_files import class_ids
from ccnet_jax.train.inputs import NORMALIZATIONS
from pallas_kernels.criss_cross.reference import MASK_VALUE
from tests.converted_models import converted_tiny_ccnet

# Run in a fresh interpreter in which ccnet_jax, pallas_kernels and flax cannot be imported.
WITHOUT_THE_PACKAGE = """
import sys
for name in ("ccnet_jax", "pallas_kernels", "flax"):
    sys.modules[name] = None
"""


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return converted_tiny_ccnet(tmp_path_factory.mktemp("model"), seed=8)


def model_logits(converted, images: np.ndarray) -> np.ndarray:
    model = build_converted(converted)
    model.eval()
    x = jnp.asarray(NORMALIZATIONS["caffe_bgr"](images))
    return np.asarray(predict_logits(lambda x: model(x)[0], x, InferenceConfig()))


def run_without_package(code: str, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", WITHOUT_THE_PACKAGE + code], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_portable_export_runs_without_the_package_and_matches_the_model(converted, tmp_path):
    out = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(converted), "--output", str(out), "--height", "45",
                     "--width", "38", "--batch", "dynamic"]) == 0
    info = json.loads((out / "ccnet_export.json").read_text())
    assert (info["height"], info["width"], info["batch"]) == (45, 38, None)
    assert info["platforms"] == ["cpu", "cuda", "tpu"] and info["attention"] == "xla"
    images = np.random.default_rng(1).integers(0, 256, (3, 45, 38, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    run_without_package(f"""
import jax, numpy as np
exported = jax.export.deserialize(open({str(out / 'ccnet.jax')!r}, "rb").read())
ids, logits = exported.call(np.load("images.npy"))
np.savez("result.npz", ids=np.asarray(ids), logits=np.asarray(logits))
""", cwd=tmp_path)
    with np.load(tmp_path / "result.npz") as result:
        ids, logits = result["ids"], result["logits"]
    expected = model_logits(converted, images)
    assert logits.shape == (3, 45, 38, ref.TINY_CLASSES) and ids.dtype == np.int32
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    np.testing.assert_array_equal(ids, np.argmax(logits, axis=-1))
    # The self-mask is a finite value (-inf appears only as the identity of max reductions).
    text = jax.export.deserialize((out / "ccnet.jax").read_bytes()).mlir_module()
    constants = [float(c) for c in re.findall(r"constant dense<(-[0-9.]+E\+38)> : tensor<f32>", text)]
    assert any(abs(c / MASK_VALUE - 1) < 1e-6 for c in constants)
    # The backbone's dilated convs are exported as plain convs over space-to-batch sub-images.
    dilations = set(re.findall(r"rhs_dilate = (\[\d+, \d+\])", text))
    assert "stablehlo.convolution" in text and dilations <= {"[1, 1]"}


@pytest.mark.slow
def test_the_shipped_loader_segments_files_without_the_package(converted, tmp_path):
    out = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(converted), "--output", str(out), "--height", "33",
                     "--width", "41"]) == 0
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (33, 41, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    Image.fromarray(rng.integers(0, 256, (20, 70, 3), dtype=np.uint8)).save(tmp_path / "wide.jpg")
    run_without_package(f"""
import runpy, sys
sys.argv = ["predict_exported.py", "--images", "photo.png", "wide.jpg", "--output-dir", "segmented"]
runpy.run_path({str(out / 'predict_exported.py')!r}, run_name="__main__")
""", cwd=tmp_path)
    ids = np.asarray(Image.open(tmp_path / "segmented" / "photo_trainIds.png"))
    np.testing.assert_array_equal(ids, np.argmax(model_logits(converted, rgb[None])[0], axis=-1))
    # Another aspect ratio is fitted into the input, not stretched, and comes back at its own size.
    wide = np.asarray(Image.open(tmp_path / "segmented" / "wide_trainIds.png"))
    assert wide.shape == (20, 70) and wide.max() < ref.TINY_CLASSES


def test_cuda_export_carries_the_fused_kernel_and_needs_a_fixed_batch(converted, tmp_path, capsys):
    out = tmp_path / "cuda"
    assert cli_main(["export", "--checkpoint", str(converted), "--output", str(out), "--height", "49",
                     "--width", "49", "--platform", "cuda", "--batch", "2", "--compute-dtype", "bfloat16"]) == 0
    exported = jax.export.deserialize((out / "ccnet.jax").read_bytes())
    assert exported.platforms == ("cuda",)
    assert exported.in_avals[0].shape == (2, 49, 49, 3)
    assert "__gpu$xla.gpu.triton" in exported.mlir_module()
    assert cli_main(["export", "--checkpoint", str(converted), "--output", str(tmp_path / "dyn"),
                     "--platform", "cuda", "--batch", "dynamic"]) == 1
    assert "a dynamic batch needs the portable export" in capsys.readouterr().err
    # An existing export is kept unless --force.
    assert cli_main(["export", "--checkpoint", str(converted), "--output", str(out)]) == 1
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("shape,size", [((9, 11), (129, 257)), ((40, 50), (33, 41)), ((1, 5), (130, 1)),
                                        ((6, 7), (6, 7))])
def test_the_shipped_loader_resizes_logits_as_ccnet_predict_does(shape, size):
    # The loader fits a photo into the exported size and brings the prediction back to the photo's:
    # through its logits, resized bilinearly before the arg-max, to the bit as `ccnet predict`, not
    # through nearest blocks of the small prediction.
    logits = np.random.default_rng(3).normal(size=(*shape, 6)).astype(np.float32)
    ids = exported_loader.upsampled_class_ids(logits, size, band_rows=16)
    assert ids.shape == size and ids.dtype == np.uint8
    np.testing.assert_array_equal(ids, class_ids(jnp.asarray(logits), size))
    blocks = np.asarray(Image.fromarray(logits.argmax(-1).astype(np.uint8)).resize(size[::-1], Image.NEAREST))
    assert shape == size or (ids != blocks).any()
