"""The CPU lock: an exclusive ``flock`` on a file that jobs sharing a machine take turns holding.

Two uses: :func:`cpu_lock` yields ``hold()`` to take per chunk of work (others get turns between chunks),
:func:`holding` holds it around one block (a timed benchmark run). Stdlib only; ``path=None``: no lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

# Sleep after each release, so that a process waiting for the lock gets it before we take it again.
RELEASE_PAUSE_S = 0.05

Hold = Callable[[], AbstractContextManager[None]]


@contextmanager
def unlocked() -> Iterator[None]:
    """The ``hold()`` of no lock: holds nothing."""
    yield


@contextmanager
def cpu_lock(path: str | os.PathLike[str] | None, pause_s: float = RELEASE_PAUSE_S) -> Iterator[Hold]:
    """Yields ``hold()``, a context manager holding an exclusive flock on ``path`` (None: no lock).

    The file stays open between holds; each release is followed by ``pause_s`` of sleep.
    """
    if path is None:
        yield unlocked
        return
    with open(path, "a") as lock_file:

        @contextmanager
        def hold() -> Iterator[None]:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
                if pause_s > 0:
                    time.sleep(pause_s)

        yield hold


@contextmanager
def holding(path: str | os.PathLike[str] | None, pause_s: float = RELEASE_PAUSE_S) -> Iterator[None]:
    """Hold the CPU lock at ``path`` for one block of work (None: no lock)."""
    with cpu_lock(path, pause_s) as hold, hold():
        yield
