"""Where TimeBill keeps files it creates (profiles, downloaded models, trained predictors).

One root directory for everything so a user can see, move or delete TimeBill's state in one place.
``TIMEBILL_CACHE_DIR`` overrides it: tests point it at a temporary directory, and users on shared
machines or read-only home directories need a way to put the cache elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

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
