"""Progress bars on stderr (tqdm), the one way the package's long jobs show how far they are.

tqdm is imported only when a bar is made, so importing a module that may show one stays light.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm


def progress_bar(total: float, unit: str, desc: str, enabled: bool = True, **options: Any) -> tqdm:
    """A tqdm bar of ``total`` ``unit`` labelled ``desc`` on stderr; a silent one unless ``enabled``.

    ``options`` go to tqdm as they are (``dynamic_ncols``, ``smoothing``, ``bar_format``).
    """
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled, file=sys.stderr, **options)
