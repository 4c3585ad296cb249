"""Files written whole or not at all: every file the pack writes goes through here."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

__all__ = ["replace_atomically"]


def replace_atomically(path: str | os.PathLike[str], write: Callable[[str], None], *,
                       keep_mode: bool = False, make_folder: bool = False) -> None:
    """``write(tmp)`` a temporary file in ``path``'s folder, then put it in place with one
    ``os.replace``: a reader never sees a partial file, a failed write leaves any existing file
    untouched, and the temporary file is removed either way. ``keep_mode``: the new file gets the
    old one's permissions (0644 when there was none) instead of ``mkstemp``'s 0600. ``make_folder``:
    create a missing folder (the pack's own cache); otherwise a missing folder is an error, as the
    user's chosen place must exist."""
    target = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(target)
    if make_folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        if keep_mode:
            os.chmod(tmp, os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
