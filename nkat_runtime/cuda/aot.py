"""Compile the Triton kernels for GPUs that are not here, and read what each compiled kernel uses.

``triton.compile`` with a ``GPUTarget`` needs no GPU: it runs the whole pipeline to a cubin with
the ``ptxas`` triton ships, and the ``cuobjdump`` beside it reports the cubin's registers, stack,
local memory (spills land there) and shared memory. A kernel that spills or needs more shared
memory than a device offers fails here instead of on a user's card.

    python -m nkat_runtime.cuda.aot --cc 80,86,89,90 [--types Q4_K,Q6_K]    # one JSON line each

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

#: shared memory a block may use, by compute capability (CUDA programming guide, "Technical
#: Specifications per Compute Capability": 163 KB on sm_80, 99 KB on sm_86/89, 227 KB on sm_90)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255

#: each kernel's integer arguments, in order (its pointers and constexprs are set in ``compile_one``)
_INTS = {"gemv": ("M", "N", "K", "row_bytes", "k_per_split", "stride_xm", "stride_os", "stride_om"),
         "gemm": ("M", "N", "K", "row_bytes", "stride_xm", "stride_om"),
         "dequantize": ("N", "K", "row_bytes", "stride_o")}


def launches() -> dict[str, list[dict[str, int]]]:
    """Every tile shape ``kernels.py`` launches, per kernel."""
    from . import kernels as k

    return {"gemv": [{"BLOCK_M": m, "BLOCK_N": bn, "BLOCK_K": bk} for m, (bn, bk) in k.GEMV_TILES.items()],
            "gemm": [{"BLOCK_M": m, "BLOCK_N": k.GEMM_TILE[0], "BLOCK_K": k.GEMM_TILE[1]} for m in k.GEMM_BLOCK_M],
            "dequantize": [{"BLOCK_N": k.DEQUANT_TILE[0], "BLOCK_K": k.DEQUANT_TILE[1]}]}


def _tool(name: str) -> str:
    import triton.backends.nvidia as nvidia

    return str(Path(nvidia.__file__).parent / "bin" / name)


def resources(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL and SHARED of the one function in ``cubin`` (``cuobjdump --dump-resource-usage``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True,
                             text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in found.items()}


def compile_one(kernel: str, qtype: int, cc: int, constexprs: dict[str, int]) -> dict:
    """Compile ``kernel`` for GGML type ``qtype`` on compute capability ``cc``; its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import kernels
    from .dequant import TYPES

    fn = {"gemv": kernels._gemv, "gemm": kernels._gemm, "dequantize": kernels._dequantize}[kernel]
    pointers = {"x": "*fp32", "w": "*u8", "out": "*fp32"} if kernel != "dequantize" else {"w": "*u8", "out": "*fp32"}
    qk, ts = TYPES[qtype]
    src = ASTSource(fn=fn, signature={**pointers, **{n: "i32" for n in _INTS[kernel]}},
                    constexprs={"QTYPE": qtype, "QK": qk, "TS": ts, **constexprs})
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": kernels.WARPS[kernel]})
    used = resources(compiled.asm["cubin"])
    used["shared"] = max(used.get("shared", 0), compiled.metadata.shared)
    return {"kernel": kernel, "qtype": qtype, "cc": cc, **constexprs, **used}


def problems(report: dict) -> list[str]:
    """What is wrong with one compiled kernel's resources (empty when nothing)."""
    out = []
    if report.get("local", 0) or report.get("stack", 0):
        out.append(f"spills ({report.get('local', 0)} B local, {report.get('stack', 0)} B stack)")
    if report["reg"] > MAX_REGISTERS:
        out.append(f"{report['reg']} registers")
    if report["shared"] > SHARED_LIMIT[report["cc"]]:
        out.append(f"{report['shared']} B shared > {SHARED_LIMIT[report['cc']]}")
    return out


def main(argv: list[str] | None = None) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    from gguf.constants import GGMLQuantizationType as T

    from .dequant import TYPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cc", default="80,86,89,90", help="compute capabilities, comma-separated")
    p.add_argument("--types", default=",".join(T(t).name for t in TYPES), help="GGML types, comma-separated")
    p.add_argument("--kernels", default=",".join(_INTS))
    args = p.parse_args(argv)
    shapes = launches()
    bad = 0
    for name in args.types.split(","):
        for kernel in args.kernels.split(","):
            for cc in (int(c) for c in args.cc.split(",")):
                for constexprs in shapes[kernel]:
                    report = compile_one(kernel, int(T[name]), cc, constexprs)
                    report["type"], report["problems"] = name, problems(report)
                    bad += bool(report["problems"])
                    print(json.dumps(report), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
