"""One way to write a file so that a reader never sees it half written."""
from __future__ import annotations

import os
from pathlib import Path


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` then rename to ``path``: readers never see a partial file. An object-store
    URL is written to a local file and uploaded whole (``storage.write_via_file``: one PUT)."""
    from .storage import is_url, write_via_file

    if is_url(path):
        write_via_file(path, write)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    write(tmp)
    os.replace(tmp, path)
