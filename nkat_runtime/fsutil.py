"""Atomic file output: write to a temporary file beside the target, then rename it in.

``mkstemp`` creates files readable by the owner only; ``publish`` gives the file the mode
a plainly created file would have (0666 minus the umask) before renaming it into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(target: str | os.PathLike[str]) -> Path:
    """A new empty temporary file in the target's folder (closed)."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.resolve().parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    return Path(tmp)


def publish(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Give ``tmp`` the default file mode, flush it to disk and rename it to ``target`` (atomic on
    one filesystem): a reader, a crash or a kill sees the old file or the whole new one."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    try:  # the rename itself: best effort (some filesystems refuse fsync on a folder)
        dfd = os.open(Path(target).resolve().parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
