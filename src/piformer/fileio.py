"""Writing files so that a kill at any moment leaves the old version or the new one, never half.

Files and directories are made for people: they get the permissions the user's umask allows
(0644 / 0755 under the usual umask 022), as `open` and `mkdir` would give them. The temporary
files and directories that make writes atomic (mkstemp, mkdtemp) are created private (0600 /
0700) and keep that mode when renamed into place, so every writer widens them with these helpers.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows (/proc/self/status).

    Elsewhere it is read by setting and restoring it; meanwhile the mask is the strict 0o077, so
    a file another thread creates in that instant is at worst too private, never too open.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode `open` gives a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode `mkdir` gives a new directory: 0o777 less the umask."""
    return 0o777 & ~current_umask()


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to a temporary sibling, fsync it, and move it over `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp's 0600 would survive the rename
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
