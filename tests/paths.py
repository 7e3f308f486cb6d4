"""Where the tests find things: the repository, the shared folder beside it, the helper scripts."""

from __future__ import annotations

import os
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def shared_dir() -> Path:
    return Path(os.environ.get("NKAT_SHARED_DIR") or REPO.parent / "shared")


def wiki_text_path() -> Path:
    return shared_dir() / "data" / "wiki_vital_en.txt"
