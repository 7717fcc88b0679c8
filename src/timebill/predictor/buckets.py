"""Bucket maths of the paper's RLP (§2 of the method): lengths ↔ classes of fixed width B.

Bucket n (1-based) covers lengths ((n−1)·B, n·B]; a length N has label ⌈N/B⌉; there are ⌈N_cap/B⌉
buckets, N_cap being the longest response the labels can hold (the labelling cap, 1024 tokens for the
packaged labels; the paper's 8192). A class predicts the *upper edge* of its bucket, capped at N_max:
N̂ = min(N_max, n̂·B). Classes in arrays are 0-based (class = label − 1). Pure integer maths, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from timebill.errors import InvalidInputError

DEFAULT_BUCKET_WIDTH = 16


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InvalidInputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class BucketSpec:
    """Buckets of ``width`` tokens covering lengths 1..``cap_tokens``."""

    width: int = DEFAULT_BUCKET_WIDTH
    cap_tokens: int = 1024

    def __post_init__(self) -> None:
        _positive_int("bucket width", self.width)
        _positive_int("cap_tokens", self.cap_tokens)

    @property
    def num_classes(self) -> int:
        """⌈N_cap / B⌉."""
        return -(-self.cap_tokens // self.width)

    def label(self, length: int) -> int:
        """1-based bucket ⌈N/B⌉ of a length; lengths past the cap fall in the last bucket."""
        length = _positive_int("length", length)
        return min(self.num_classes, -(-length // self.width))

    def labels(self, lengths: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`label`, as 0-based classes (int64)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        if lengths.size and lengths.min() < 1:
            raise InvalidInputError("lengths must be >= 1 token")
        return np.minimum(self.num_classes, -(-lengths // self.width)) - 1

    def length(self, label: int, n_max: int | None = None) -> int:
        """N̂ = min(N_max, label·B) for a 1-based ``label``; N_max defaults to ``cap_tokens``."""
        label = _positive_int("bucket label", label)
        if label > self.num_classes:
            raise InvalidInputError(f"bucket label {label} is past the last bucket ({self.num_classes})")
        return min(self.cap_tokens if n_max is None else _positive_int("n_max", n_max), label * self.width)

    def upper_edges(self, n_max: int | None = None) -> np.ndarray:
        """Predicted length of every 0-based class: min(N_max, (c+1)·B)."""
        n_max = self.cap_tokens if n_max is None else _positive_int("n_max", n_max)
        return np.minimum(n_max, np.arange(1, self.num_classes + 1, dtype=np.int64) * self.width)
