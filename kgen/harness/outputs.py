"""Report files a command writes at its end (JUnit XML, JSON, HTML): checked before the work, so a path that cannot be
written is one line now rather than a traceback after a long run.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from kgen.build.config import show_path
from kgen.build.pipeline import probe_writable
from kgen.errors import UsageError


# The longest file name Linux file systems take (ext4, tmpfs, btrfs, xfs).
NAME_MAX = 255


def check_report_path(option: str, path: Path) -> None:
    """A report file pytest will write at the very end: refuse now, in one line, a path it could not write (pytest
    would fail after the whole run, with a traceback)."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"{option} {show_path(path)}: {why}; choose another path")

    try:
        if path.is_dir():
            raise refuse("is a directory")
        parent = path.parent
        while not (parent.exists() or parent.is_symlink()):
            parent = parent.parent
        if not parent.is_dir():
            raise refuse(f"{parent} is not a directory")
    except OSError as err:      # a name longer than the file system allows, a loop of links
        raise refuse(err.strerror or str(err)) from None
    if any(len(os.fsencode(part)) > NAME_MAX for part in path.parts):
        raise refuse(f"a name in it is longer than {NAME_MAX} bytes")
    probe_writable(parent, refuse)


def write_report(path: Path, text: str) -> None:
    """Write a report file whole or not at all: its missing directories are created (as pytest does for
    --junitxml), the text goes to a temporary file beside it, renamed over `path` once written. A full disk leaves
    no partial page and no temporary file; the OSError goes up to be said in one line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name[:64]}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
