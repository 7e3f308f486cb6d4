"""``nkat-requantize``: a coarser copy of a GGUF model (every block weight to one type), to try
θ's residual mode against the original."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import common


def _main(argv: Sequence[str] | None) -> int:
    from ..gguf.requantize import TYPES, requantize

    p = argparse.ArgumentParser(prog="nkat-requantize", description=__doc__)
    p.add_argument("--input", "-i", required=True)
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--type", default="Q4_0", choices=TYPES)
    a = p.parse_args(argv)
    names = requantize(Path(a.input), Path(a.output), a.type)
    print(f"wrote {a.output}: {len(names)} block weights requantised to {a.type}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return common.run(_main, argv, prog="nkat-requantize")


if __name__ == "__main__":
    sys.exit(main())
