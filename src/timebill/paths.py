"""Where TimeBill keeps files it creates (profiles, downloaded models, trained predictors).

One root directory for everything so a user can see, move or delete TimeBill's state in one place.
``TIMEBILL_CACHE_DIR`` overrides it: tests point it at a temporary directory, and users on shared
machines or read-only home directories need a way to put the cache elsewhere.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

CACHE_ENV_VAR = "TIMEBILL_CACHE_DIR"


def cache_dir() -> Path:
    """Return the cache root: ``$TIMEBILL_CACHE_DIR`` if set and non-empty, else the platform cache dir.

    The directory is not created here: callers create the subdirectory they write to, so that merely
    asking for a path (e.g. to print it) has no side effects.
    """
    override = os.environ.get(CACHE_ENV_VAR, "").strip()
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("timebill"))


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort: not every platform/filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def finite_or_none(value: Any) -> Any:
    """Copy of a JSON-like value with every non-finite float as None (standard JSON: a missing number is null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def write_bytes_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a crash leaves either the old or the new file, never a torn one.

    Temp file in the same directory, fsync, ``os.replace``, fsync of the directory. ``mode`` is set
    explicitly because ``mkstemp`` creates 0600 files (a packaged data file must stay readable).
    """
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
