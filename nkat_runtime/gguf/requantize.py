"""Requantise the block weights of a GGUF to a coarser type with gguf-py's own quantiser.

There is no full-precision model on these machines; to study θ's residual mode we make a
*coarser* copy (e.g. every block weight → Q4_0) and use the original file as the
reference. Everything else is copied byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from .. import quant
from .names import BLOCK_WEIGHT
from .reader import open_gguf
from .writer import write_derived_gguf

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # the types gguf-py can quantise


def requantize(input_path: Path, output: Path, qtype_name: str = "Q4_0", progress: bool = True) -> list[str]:
    import gguf

    if qtype_name not in TYPES:
        raise ValueError(f"type {qtype_name} cannot be produced by gguf-py (choose from {', '.join(TYPES)})")
    if output.resolve() == input_path.resolve():
        raise ValueError("the output path is the input file")
    qtype = gguf.GGMLQuantizationType[qtype_name]
    src = open_gguf(input_path)
    names = [n for n in src.tensors if BLOCK_WEIGHT.match(n)]
    replace = {}
    for name in tqdm(names, desc=f"requantising to {qtype_name}", disable=not progress):
        t = src.tensors[name]
        dense = quant.dequantize(t.raw_tensor(), t.qtype, t.shape).numpy()
        replace[name] = (gguf.quants.quantize(dense, qtype), qtype)
    write_derived_gguf(src, output, replace=replace, progress=progress)
    return names
