"""Permissions a plain `mkdir`/`open` would give, for files made through `tempfile`.

`tempfile.mkdtemp` and `mkstemp` create 0700/0600 whatever the umask (they are meant to be
private), so a repacked checkpoint or a cache entry renamed into place from one would be
unreadable by other users (a container's non-root user, a colleague sharing /models)."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    # /proc avoids os.umask's set-and-restore, which races with other threads creating files.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_if_created(path: str | os.PathLike, directory: bool | None = None) -> None:
    """chmod `path` to 0777 (directories) or 0666 (files) less the umask."""
    directory = os.path.isdir(path) if directory is None else directory
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())
