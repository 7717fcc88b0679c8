"""TimeBill: time-budgeted LLM inference (predict length, estimate time, evict KV, meet the deadline)."""

from __future__ import annotations

__version__ = "0.1.0"
