"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Every file a run writes goes through `atomic_path` (grid files, JSON, pictures, videos, meshes):
the content is written to a temporary sibling, flushed to disk, then moved over the target with
``os.replace``; a failure leaves nothing behind. Files get the process umask's normal mode.

`is_disk_full` recognises a write that failed for lack of space, however it reached us (an
`OSError`, or tensorstore's error text inside orbax's exceptions).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success move it onto ``path``.

    The temporary name keeps the suffix (writers that pick a format by suffix still work).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (keys sorted) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# tensorstore reports the OS error in its message: "... [os_error_code='28']".
_FULL_TEXT = re.compile(
    r"No space left on device|Disk quota exceeded|File too large|os_error_code='(28|122|27)'"
)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (or an exception it was raised from) is a write refused for lack of space."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        if _FULL_TEXT.search(str(err)):
            return True
        err = err.__cause__ or err.__context__
    return False
