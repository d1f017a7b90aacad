"""Loading a script of experiments/ as a module, for tests of its pure parts."""

import importlib.util
import sys
from pathlib import Path

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def load_experiment(name: str):
    """experiments/<name>.py, executed as a module named `name` (its main() not run)."""
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered first, as an import would: dataclasses look their module up while the script runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
