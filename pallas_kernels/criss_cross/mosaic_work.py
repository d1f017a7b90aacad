"""The work items of a Mosaic GPU kernel: one CTA each, or looped over by a persistent kernel.

A work item is (image, strip, query block, value split). Launched one CTA per
item, a CTA's serial work (loading its strip's queries and keys, Q·Kᵀ, the
softmax) happens while its value ring stands empty. A persistent kernel
launches one CTA per SM instead (at most one item each), and each CTA takes
items cta, cta + ctas, cta + 2·ctas, ... in a loop, so that the next item's
loads run under the current item's value tiles. With `images_last_first`
the items of the last image come first (see `walk_images`). Under `jax.vmap` the
kernel's launch gains a leading grid axis (mosaic_layout.launch), so each
mapped slice runs its own `ctas` CTAs over its items: right, but more CTAs
than SMs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jax import lax

GRID_NAMES = ("b", "s", "q", "c")


def walk_images(b, batch: int, last_first: bool):
    """The image of launch position `b` (traced) out of `batch`: `b`, or with `last_first`
    `batch - 1 - b`.

    A Mosaic GPU grid's leading axis is its slowest (the CUDA grid takes the
    axes in reverse, and GPUs dispatch CTAs in about that linear order,
    which CUDA does not promise), so a kernel launched after another over
    the same images and walking them the other way starts on the image the
    other finished with, whose lines L2 may still hold (50 MB on an H100,
    against 21.7 MB of q, k, v and the row result per 97x97 image of 64 + 512
    bfloat16 channels). Under `jax.vmap` the mapped axis comes before the
    images and keeps its order, so only within a mapped slice of one does the
    next kernel start where the last one finished; the results are right
    either way.
    """
    return batch - 1 - b if last_first else b


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One item's indices: image b, strip s, query block, value split (traced integers)."""

    b: Any
    s: Any
    block: Any
    split: Any


@dataclasses.dataclass(frozen=True)
class WorkItems:
    """(images, strips, query blocks, value splits) items, on one CTA each or, with `ctas`, on
    that many CTAs (at most one per item) each looping over its share."""

    grid: tuple[int, int, int, int]
    ctas: int | None = None
    images_last_first: bool = False

    def __post_init__(self):
        if self.ctas is not None and self.ctas < 1:
            raise ValueError(f"WorkItems: a persistent kernel needs at least one CTA, not {self.ctas}")

    @property
    def persistent(self) -> bool:
        return self.ctas is not None

    @property
    def count(self) -> int:
        return math.prod(self.grid)

    @property
    def launch_grid(self) -> tuple[int, ...]:
        return (min(self.ctas, self.count),) if self.persistent else self.grid

    @property
    def grid_names(self) -> tuple[str, ...]:
        return ("cta",) if self.persistent else GRID_NAMES

    def item(self, step) -> WorkItem:
        """The item a CTA takes at `step` of its loop (persistent), or the CTA's own."""
        if not self.persistent:
            b, *rest = (lax.axis_index(name) for name in GRID_NAMES)
        else:
            flat = lax.axis_index("cta") + step * self.launch_grid[0]
            index = []
            for size in reversed(self.grid):
                index.append(lax.rem(flat, size))
                flat = lax.div(flat, size)
            b, *rest = reversed(index)
        return WorkItem(walk_images(b, self.grid[0], self.images_last_first), *rest)

    def steps(self):
        """How many items this CTA of a persistent kernel takes (traced): items cta, cta + ctas, ..."""
        return lax.div(self.count - 1 - lax.axis_index("cta"), self.launch_grid[0]) + 1

    def first(self) -> WorkItem:
        return self.item(0)

    def run(self, fn) -> None:
        """fn(item, step, next_item, items_after) for each of this CTA's items: step 0, the next
        item None and items_after 0 without a persistent loop; else traced, items_after the
        count of this CTA's items after this one, and next_item() the next one's indices
        (past the last, they run past the grid), computed where called so that they do not
        hold registers through the item."""
        if not self.persistent:
            fn(self.first(), 0, None, 0)
            return
        steps = self.steps()

        def body(step, carry):
            fn(self.item(step), step, lambda: self.item(step + 1), steps - 1 - step)
            return carry

        lax.fori_loop(0, steps, body, None)
