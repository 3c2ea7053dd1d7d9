"""Output locations: a read-only disk or a file in the way ends in one line naming the path, not a traceback."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import InputError


def writable_dir(path: str | Path, what: str) -> Path:
    """Create `path` if needed and prove a file can be written there; `what` names the flag or key."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: {what} is an existing file, not a directory")
    with output_errors(path, what):
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    return path


@contextlib.contextmanager
def output_errors(path: str | Path, what: str) -> Iterator[None]:
    """OSError while writing (read-only file system, disk full, a file in the way) -> InputError naming `path`."""
    try:
        yield
    except OSError as exc:
        raise InputError(f"{path}: cannot write {what} ({exc.strerror or exc})") from None
