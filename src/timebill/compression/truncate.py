"""``truncate``: keep the head and the tail of the prompt, drop its middle — what any user can do by hand."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from timebill.compression.base import Compressor, positional_scores
from timebill.compression.layout import PromptLayout


@dataclass
class TruncateCompressor(Compressor):
    """Scores a chunk by its distance to the nearer end of the removable text: the middle goes first."""

    name = "truncate"

    def score(self, layout: PromptLayout) -> np.ndarray:
        return positional_scores(layout)
