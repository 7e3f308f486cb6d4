"""Pick NKAT or a stock Kobold.cpp for this machine and model, then launch it.

Not built yet (see the issue "backend_selector.py"). It prints that and exits with status 2.
"""

from __future__ import annotations

import sys


def main() -> int:
    print("backend_selector: not implemented yet; run nkat-generate for now", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
