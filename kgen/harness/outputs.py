"""Report files a command writes at its end (JUnit XML, JSON, HTML): checked before the work, so a path that cannot be
written is one line now rather than a traceback after a long run.
"""
from __future__ import annotations

from pathlib import Path

from kgen.build.pipeline import probe_writable
from kgen.errors import UsageError


def check_report_path(option: str, path: Path) -> None:
    """A report file pytest will write at the very end: refuse now, in one line, a path it could not write (pytest
    would fail after the whole run, with a traceback)."""
    def refuse(why: str) -> UsageError:
        return UsageError(f"{option} {path}: {why}; choose another path")

    if path.is_dir():
        raise refuse("is a directory")
    parent = path.parent
    while not (parent.exists() or parent.is_symlink()):
        parent = parent.parent
    if not parent.is_dir():
        raise refuse(f"{parent} is not a directory")
    probe_writable(parent, refuse)
