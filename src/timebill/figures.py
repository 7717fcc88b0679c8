"""Saving a matplotlib figure the one way TimeBill does: parent folder created, file replaced atomically,
figure closed. Shared by the estimator's profile plot and the predictor comparison plot.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from timebill.paths import write_bytes_atomically


def save_figure(fig: Any, path: str | Path, dpi: int = 110) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix, PNG without one), close it, return the path.

    Rendered to memory first and then written with :func:`~timebill.paths.write_bytes_atomically`, so an
    interrupted run leaves the previous plot or the new one, never a torn file next to a report. The
    figure is closed even if rendering fails: pyplot keeps every open figure alive until then.
    """
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=out.suffix.removeprefix(".") or None, dpi=dpi)
    finally:
        plt.close(fig)
    write_bytes_atomically(out, buffer.getvalue())
    return out
