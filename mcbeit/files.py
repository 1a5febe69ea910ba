"""File modes: what the package writes gets the user's umask, as a plainly created file would.

Writers that go through a private temporary file (``tempfile.mkstemp`` in
:func:`mcbeit.engine.checkpoint.write_atomic`, safetensors' ``save_file``) create 0600 files; a
group that shares checkpoints or exported weights could not read them. This module imports
nothing of the package, so every layer can use it.
"""
from __future__ import annotations

import functools
import os


@functools.cache
def file_mode() -> int:
    """The mode a new file gets from this process's umask (0o666 & ~umask), read once and without
    changing it where possible: /proc/self/status on Linux (a set-and-restore of the umask would race
    with threads creating files); elsewhere os.umask's set-and-restore, once."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def apply_umask(*paths: str | os.PathLike) -> None:
    """Give each file in ``paths`` :func:`file_mode`."""
    for path in paths:
        os.chmod(path, file_mode())
