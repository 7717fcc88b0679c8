"""``timebill serve``: TimeBill behind an OpenAI-compatible HTTP API, with per-request time budgets.

``protocol`` (request schemas) → ``admission`` (plan against the queue, or 429) → ``queue`` (EDF, one model
worker) → ``service`` (runs jobs, metrics) → ``streaming`` (JSON and SSE answers) → ``app`` (the routes).
"""

from timebill.serve.app import create_app
from timebill.serve.metrics import Metrics
from timebill.serve.protocol import DEFAULT_BUDGET_S, MAX_BUDGET_S, RejectedError
from timebill.serve.queue import EDFQueue, Job
from timebill.serve.service import load_timebill

__all__ = [
    "DEFAULT_BUDGET_S",
    "MAX_BUDGET_S",
    "EDFQueue",
    "Job",
    "Metrics",
    "RejectedError",
    "create_app",
    "load_timebill",
]
