"""Wheels of what `ccnet-jax[train]` needs and the lent GPU machines lack, into .whl/.

Usage: python experiments/gpu_wheels.py [--dest .whl] [--list]

The GPU machines (nvidia-h100-x1, nvidia-h200) reach no package index. Their image holds jax,
flax, optax, orbax, torch and much else, but not the data stack (tensorflow-datasets, grain,
array-record) nor a few small packages the training command imports, so `ccnet demo` and
`ccnet train` cannot run there as they are. This walks the requirements of ccnet-jax[train]
through the distributions installed here (the versions CI tests), leaves out what the image
holds (GPU_IMAGE), and saves the rest for CPython 3.12 on x86-64 Linux: the index's binary
wheel where there is one, else a wheel built here from the source (pure-Python packages).
`bash experiments/gpu_check.sh demo` installs them there (`.whl` named in the device call's
carry) and runs the demo on the card.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement

# What a device call may carry along with the working tree.
CARRY_LIMIT_BYTES = 64 * 2**20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# The GPU machines' image ('cuda'), as the device notes listed its Python packages on 2026-11-17.
GPU_IMAGE = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split())


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str = "ccnet-jax", extras: tuple[str, ...] = ("train",)) -> dict[str, str]:
    """{canonical name: installed version} of `root` and everything it needs with `extras`, by the
    distributions installed in this environment (markers evaluated here)."""
    versions: dict[str, str] = {}
    walked: set[tuple[str, str]] = set()
    pending = [(root, extra) for extra in extras] or [(root, "")]
    while pending:
        name, extra = pending.pop()
        if (canonical(name), extra) in walked:
            continue
        walked.add((canonical(name), extra))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"gpu_wheels: {name} is required but not installed here; install the project with "
                             "`pip install -e '.[test]'` first") from None
        versions[canonical(name)] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                pending += [(requirement.name, e) for e in requirement.extras] or [(requirement.name, "")]
    return versions


def missing_on_gpu(root: str = "ccnet-jax", extras: tuple[str, ...] = ("train",)) -> dict[str, str]:
    """The part of `closure` that the GPU image lacks (the project itself travels as source)."""
    return {name: version for name, version in closure(root, extras).items()
            if name not in GPU_IMAGE and name != canonical(root)}


def wheel_release(wheel: Path) -> tuple[str, str]:
    """(canonical name, version) of a wheel file, from its name (NAME-VERSION-...-PLATFORM.whl)."""
    name, version = wheel.name.split("-")[:2]
    return canonical(name), version


def fetch(name: str, version: str, dest: Path) -> Path:
    """The wheel of name==version for CPython 3.12 on x86-64 Linux, saved in dest."""
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    binary = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                             "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(dest),
                             f"{name}=={version}"], capture_output=True, text=True)
    if binary.returncode != 0:
        with tempfile.TemporaryDirectory() as build:
            built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", build,
                                    f"{name}=={version}"], capture_output=True, text=True)
            wheels = list(Path(build).glob("*-py3-none-any.whl")) + list(Path(build).glob("*-py2.py3-none-any.whl"))
            if built.returncode != 0 or not wheels:
                raise SystemExit(f"gpu_wheels: no wheel of {name}=={version} for CPython 3.12 on x86-64 Linux, and "
                                 f"none could be built here as pure Python:\n{binary.stderr}{built.stderr}")
            target = dest / wheels[0].name
            target.write_bytes(wheels[0].read_bytes())
    return next(w for w in dest.glob("*.whl") if wheel_release(w) == (canonical(name), version))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=Path(".whl"), help="where the wheels go (git ignores .whl)")
    parser.add_argument("--list", action="store_true", help="only print what is missing there")
    args = parser.parse_args()
    missing = missing_on_gpu()
    for name, version in sorted(missing.items()):
        print(f"{name}=={version}")
    if args.list:
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    wanted = set(missing.items())
    for wheel in args.dest.glob("*.whl"):
        if wheel_release(wheel) not in wanted:  # two versions of one package stop the install there
            wheel.unlink()
    wheels = [fetch(name, version, args.dest) for name, version in sorted(missing.items())]
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest} (a device call carries at most "
          f"{CARRY_LIMIT_BYTES / 2**20:.0f} MiB with the working tree)")
    if total > CARRY_LIMIT_BYTES:
        raise SystemExit("gpu_wheels: too large to carry")


if __name__ == "__main__":
    main()
