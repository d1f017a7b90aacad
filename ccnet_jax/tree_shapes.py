"""How a stored tree of arrays differs from a model's: the names and shapes that do not match.

Shared by the training checkpoints and the converted-weights folders, so that both say the
same thing when weights do not fit a model.
"""

from __future__ import annotations

from typing import Any

import jax


def leaf_name(path: tuple) -> str:
    """A leaf's dotted name ("params.backbone.conv1.kernel")."""
    # Checkpoint metadata names every level by dict key; the live state mixes attributes and keys.
    parts = []
    for key in path:
        part = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
        parts.append(str(part))
    return ".".join(parts)


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape by its dotted name."""
    return {leaf_name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def model_mismatch(saved: Any, target: Any) -> str | None:
    """How a stored array tree (metadata or arrays) differs from `target`, or None if it fits:
    the first few names missing on either side or saved with another shape."""
    have, want = leaf_shapes(saved), leaf_shapes(target)
    problems = [f"{name} {have[name]} where this model has {want[name]}"
                for name in sorted(have.keys() & want.keys()) if have[name] != want[name]]
    problems += [f"no {name}" for name in sorted(want.keys() - have.keys())]
    problems += [f"an extra {name}" for name in sorted(have.keys() - want.keys())]
    if not problems:
        return None
    more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more
