"""Bytes an optimised XLA program moves, by kind of operation, read off its HLO text.

Each top-level instruction of the entry computation is counted as reading
every operand whole and writing its result once: an upper bound per
operation (a fusion that slices an operand reads less, and caches serve
repeated reads), and the traffic an operation that streams its arrays
would move through memory. Divided by a card's bandwidth it is the time
XLA's own operations (fusions, copies, reductions) need at the least, next
to the cuDNN convolutions, GEMMs and custom kernels, which are counted
apart since their time is their own. Works on any backend's `compiled.as_text()`.
"""

from __future__ import annotations

import collections
import re
from typing import NamedTuple

ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
              "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(ITEM_BYTES) + r")\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
# Instructions that only name or regroup buffers (no data moves), and the entry's inputs.
_FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "after-all", "opt-barrier"}


def array_bytes(shape_text: str) -> int:
    """Bytes of every array in a shape's text, e.g. "(f32[2,3]{1,0}, bf16[4])" -> 32."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape_text):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * ITEM_BYTES[dtype]
    return total


def kind_of(op: str, line: str) -> str:
    """"cudnn conv"; "gemm" (cuBLAS calls, XLA's Triton GEMM fusions); "kernel" (other custom
    calls: Mosaic GPU and Pallas Triton kernels); or "xla op" (fusions, copies, the rest)."""
    if op == "fusion":
        return "gemm" if "kind=kCustom" in line and "gemm" in line else "xla op"
    if op != "custom-call":
        return "xla op"
    target = re.search(r'custom_call_target="([^"]+)"', line)
    target = target.group(1) if target else ""
    if target.startswith("__cudnn$conv"):
        return "cudnn conv"
    return "gemm" if target.startswith("__cublas") else "kernel"


class Traffic(NamedTuple):
    bytes: int  # read plus written
    ops: int


def traffic(hlo_text: str) -> dict[str, Traffic]:
    """Bytes moved and instruction count per kind (`kind_of`) over the entry computation."""
    start = hlo_text.find("\nENTRY")
    if start < 0:
        raise ValueError("traffic: no ENTRY computation in this text; pass compiled.as_text()")
    sizes: dict[str, int] = {}
    moved: collections.Counter = collections.Counter()
    ops: collections.Counter = collections.Counter()
    for line in hlo_text[start:].splitlines()[1:]:
        if line.startswith("}"):
            break
        match = _INSTRUCTION.match(line)
        if match is None:
            continue
        name, shape, op = match.groups()
        sizes[name] = array_bytes(shape)
        if op in _FREE:
            continue
        operands = line[match.end():].split(")", 1)[0]
        kind = kind_of(op, line)
        moved[kind] += sizes[name] + sum(sizes.get(o, 0) for o in re.findall(r"%([\w.\-]+)", operands))
        ops[kind] += 1
    return {kind: Traffic(moved[kind], ops[kind]) for kind in sorted(ops)}
