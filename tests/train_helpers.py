"""Shared pieces of the training tests: tiny configs and running the CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {"num_classes": 10, "width": 8, "blocks": [1, 1, 1, 1], "implementation": "xla", "dropout": 0.1}

# Runs `ccnet ARGS` whether or not cli.COMMANDS lists the training commands yet.
CLI = (
    "import sys; from ccnet_jax import cli\n"
    "for name in ('train', 'eval', 'predict', 'benchmark', 'demo'):\n"
    "    cli.COMMANDS.setdefault(name, ('ccnet_jax.commands.' + name, name))\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


def tiny_config(path: Path, data_dir: Path, workdir: Path, **train) -> Path:
    values = {
        "model": TINY_MODEL,
        "data": {"name": "long_range", "data_dir": str(data_dir), "builder_config": "tiny",
                 "crop_size": [32, 48], "scales": [0.5, 0.75]},
        "train": {"batch_size": 4, "steps": 6, "log_every": 1, "checkpoint_every": 2, "keep": 2,
                  "learning_rate": 0.01, **train},
        "eval": {"batch_size": 4, "max_images": 4},
        "workdir": str(workdir),
    }
    path.write_text(json.dumps(values))
    return path


def env(devices: int = 4) -> dict[str, str]:
    out = dict(os.environ)
    out["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    out["PYTHONPATH"] = str(REPO) + os.pathsep + out.get("PYTHONPATH", "")
    return out


def ccnet(*args: str, devices: int = 4, check: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                            env=env(devices), timeout=timeout, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(
            f"ccnet {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
        )
    return result


def ccnet_popen(*args: str, devices: int = 4) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(devices), cwd=REPO)
