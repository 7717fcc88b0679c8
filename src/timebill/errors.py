"""Exception types users can act on.

Every failure that a user can cause (bad input, missing or corrupt files, a budget that cannot be met)
is raised as a subclass of :class:`TimeBillError` with a message that says what was wrong and what to do.
The CLI maps these to exit code 2 (3 for infeasible budgets) and never prints a traceback for them.
"""

from __future__ import annotations


class TimeBillError(Exception):
    """Base class for all errors TimeBill raises on purpose."""


class InvalidInputError(TimeBillError, ValueError):
    """A request argument is out of range or malformed (empty prompt, bad alpha, bad budget...)."""


class PromptTooLongError(InvalidInputError):
    """The prompt does not fit in the model's context window."""


class ModelLoadError(TimeBillError):
    """A model path or id could not be resolved or loaded."""


class ProfileError(TimeBillError):
    """An estimator profile file is missing, corrupt or was taken for a different setup."""


class PredictorError(TimeBillError):
    """A length-predictor file is missing, corrupt or belongs to another model."""


class InfeasibleBudgetError(TimeBillError):
    """The time budget cannot be met even at the maximum eviction ratio."""

    def __init__(self, message: str, earliest_feasible_s: float | None = None) -> None:
        super().__init__(message)
        self.earliest_feasible_s = earliest_feasible_s


class CacheCapacityError(TimeBillError):
    """A preallocated KV cache would overflow its capacity."""
