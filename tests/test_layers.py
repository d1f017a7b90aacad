"""The package's layers point one way: models and data at the bottom, then configuration and
evaluation, then training, then the command line. Every import counts, including those inside
functions."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ccnet_jax"

# Module prefix -> the ccnet_jax modules it may not import.
FORBIDDEN = {
    "ccnet_jax.models": ("ccnet_jax.data", "ccnet_jax.train", "ccnet_jax.evaluation", "ccnet_jax.config",
                         "ccnet_jax.commands"),
    "ccnet_jax.data": ("ccnet_jax.models", "ccnet_jax.train", "ccnet_jax.evaluation", "ccnet_jax.config",
                       "ccnet_jax.commands"),
    "ccnet_jax.config": ("ccnet_jax.train", "ccnet_jax.commands"),
    "ccnet_jax.evaluation": ("ccnet_jax.train", "ccnet_jax.commands"),
    "ccnet_jax.train": ("ccnet_jax.commands",),
    "ccnet_jax.durations": ("ccnet_jax.",),
    "ccnet_jax.json_fields": ("ccnet_jax.",),
    "ccnet_jax.labels": ("ccnet_jax.",),
    "ccnet_jax.scales": ("ccnet_jax.",),
    "ccnet_jax.trace_times": ("ccnet_jax.",),
    "ccnet_jax.hlo_traffic": ("ccnet_jax.",),
    "ccnet_jax.tree_shapes": ("ccnet_jax.",),
    "ccnet_jax.preemption": ("ccnet_jax.",),
    "ccnet_jax.torch_checkpoint": ("ccnet_jax.",),
    "ccnet_jax.convert": ("ccnet_jax.train", "ccnet_jax.evaluation", "ccnet_jax.data", "ccnet_jax.commands"),
    "ccnet_jax.converted_checkpoint": ("ccnet_jax.train", "ccnet_jax.evaluation", "ccnet_jax.data",
                                       "ccnet_jax.commands"),
    "ccnet_jax.export": ("ccnet_jax.train", "ccnet_jax.commands"),
    "ccnet_jax.exported_loader": ("ccnet_jax.",),
    "ccnet_jax.numpy_reference": ("ccnet_jax.",),  # independent of what it checks
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; the package uses absolute imports"
            names.update([node.module] + [f"{node.module}.{alias.name}" for alias in node.names])
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[_module_name(p) for p in MODULES])
def test_imports_point_down_the_layers(path):
    module = _module_name(path)
    rules = [banned for prefix, banned in FORBIDDEN.items() if module == prefix or module.startswith(prefix + ".")]
    wrong = sorted(
        name for name in _imports(path) for banned in rules for prefix in banned
        if (name == prefix.rstrip(".") or name.startswith(prefix if prefix.endswith(".") else prefix + "."))
        and not (name == module or name.startswith(module + "."))
    )
    assert not wrong, f"{module} imports {wrong}"


def test_every_library_module_has_a_layer():
    top = ("ccnet_jax.commands", "ccnet_jax.cli", *FORBIDDEN)  # the command line may import anything
    names = [_module_name(p) for p in MODULES]
    unruled = [n for n in names if n != "ccnet_jax" and not any(n == t or n.startswith(t + ".") for t in top)]
    assert not unruled, f"add {unruled} to FORBIDDEN"
