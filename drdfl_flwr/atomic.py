"""Files that a crash cannot tear: written whole to a temporary file beside them, flushed
to disk, then renamed over the old one (a rename within one folder is atomic on POSIX
and Windows), so a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def append_line(path: Path, line: str) -> None:
    """One line appended and flushed to disk before returning: a crash after it keeps it,
    a crash during it leaves at most a torn last line (readers drop it)."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")
        f.flush()
        os.fsync(f.fileno())
