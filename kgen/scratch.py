"""kgen's temporary directories: each named after the process that made it (`kgen-<kind>-<pid>-...`), so a later
run removes those of processes that are gone — a SIGKILL leaves no chance to clean up, and nothing else would.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

PREFIX = "kgen-"
_NAME = re.compile(rf"^{PREFIX}([a-z]+)-(\d+)-")
_swept: set[Path] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # someone else's process: alive
        return True
    return True


def sweep_stale_dirs(root: Path | None = None) -> list[Path]:
    """Remove the directories kgen processes that are gone left in `root` (TMPDIR); returns what was removed."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    try:
        candidates = [path for path in root.iterdir() if path.name.startswith(PREFIX)]
    except OSError:
        return removed
    for path in candidates:
        match = _NAME.match(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def scratch_dir(kind: str, root: Path | None = None) -> Path:
    """A new private directory `kgen-<kind>-<pid>-XXXXXXXX` in `root` (TMPDIR); the first one made in a root sweeps
    the stale ones there first."""
    root = Path(root or tempfile.gettempdir())
    if root not in _swept:
        _swept.add(root)
        sweep_stale_dirs(root)
    return Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-{os.getpid()}-", dir=root))
