"""Overrun policies: what a job that misses its deadline is worth (the paper's Kill and Skip-Next, our guard).

Each policy is a small class behind one interface (:class:`OverrunPolicy`), applied to a job stream's
:class:`JobOutcome` list — what each job did under one time budget T — and returns one
:class:`JobScore` per job. The outcomes come from real runs: a TimeBill run at budget T, or the per-token
trace of a budget-independent run (vanilla, fixed α, int8) read at T (see
:mod:`timebill.bench.methods`).

| policy | a job that would overrun | jobs behind it | paper |
|---|---|---|---|
| ``kill`` | terminated at T: empty answer, score 0 | unaffected | TimeBill §6 |
| ``skip-next`` | runs to its end, score 0 | releases (every T) while it runs are skipped, score 0 | TimeBill §6 |
| ``guard`` | stops at T and returns what it has, scored as is | unaffected | ours |

**Completion** is the paper's: the job's full answer (ended by EOS or N_max, not cut by a deadline) was
delivered by T, and the job was not skipped. A partial answer never counts as completed, even under
``guard`` where it still earns its score. Average score is over *all* jobs (skipped and killed ones
count as 0), ×100 as LongBench reports it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from timebill.errors import InvalidInputError


@dataclass(frozen=True)
class JobOutcome:
    """What one job did under one budget, in the terms the policies need."""

    task_id: str
    finished: bool  # full answer (EOS or N_max) delivered by the deadline
    full_score: float  # metric of the full answer (meaningful when finished)
    partial_score: float  # metric of what had been emitted by the deadline
    answered: bool  # at least one token emitted by the deadline
    busy_s: float  # how long the job holds the processor when left to run to its own end


@dataclass(frozen=True)
class JobScore:
    """One job's fate under a policy."""

    task_id: str
    score: float  # in [0, 1]
    completed: bool
    skipped: bool = False


@dataclass(frozen=True)
class PolicySummary:
    """Aggregate over a job stream: the numbers results.md and the plots show."""

    policy: str
    jobs: int
    avg_score: float  # ×100, over all jobs
    completion_rate: float  # completed / all jobs, in [0, 1]
    skipped: int

    @classmethod
    def of(cls, policy: str, scores: Sequence[JobScore]) -> PolicySummary:
        n = len(scores)
        if n == 0:
            return cls(policy, 0, float("nan"), float("nan"), 0)
        return cls(
            policy=policy,
            jobs=n,
            avg_score=100.0 * sum(s.score for s in scores) / n,
            completion_rate=sum(s.completed for s in scores) / n,
            skipped=sum(s.skipped for s in scores),
        )


class OverrunPolicy(ABC):
    """Scores a stream of jobs released every ``period_s`` seconds (= the budget T) in order."""

    name: str = ""

    @abstractmethod
    def apply(self, jobs: Sequence[JobOutcome], period_s: float) -> list[JobScore]: ...

    def summarise(self, jobs: Sequence[JobOutcome], period_s: float) -> PolicySummary:
        return PolicySummary.of(self.name, self.apply(jobs, period_s))


class Kill(OverrunPolicy):
    """The paper's Kill: a job that would overrun is terminated at the deadline; its answer is empty."""

    name = "kill"

    def apply(self, jobs: Sequence[JobOutcome], period_s: float) -> list[JobScore]:
        return [JobScore(j.task_id, j.full_score if j.finished else 0.0, j.finished) for j in jobs]


class Guard(OverrunPolicy):
    """Ours: the job stops at the deadline and its partial answer is scored as is (not 'completed')."""

    name = "guard"

    def apply(self, jobs: Sequence[JobOutcome], period_s: float) -> list[JobScore]:
        return [
            JobScore(j.task_id, j.full_score if j.finished else (j.partial_score if j.answered else 0.0), j.finished)
            for j in jobs
        ]


class SkipNext(OverrunPolicy):
    """The paper's Skip-Next: an overrunning job runs on; jobs released meanwhile are skipped.

    Job ``i`` is released at ``i·T``. It starts at its release if the processor is free (it is never
    queued), else it is skipped (score 0, not completed). A started job holds the processor for its
    ``busy_s``; its own score is as under Kill (0 if it missed its deadline). A job released exactly when
    the previous one ends starts.
    """

    name = "skip-next"

    def apply(self, jobs: Sequence[JobOutcome], period_s: float) -> list[JobScore]:
        if not period_s > 0:
            raise InvalidInputError(f"the period must be > 0 s, got {period_s}")
        free_at = 0.0
        scores = []
        for i, job in enumerate(jobs):
            release = i * period_s
            if release < free_at:
                scores.append(JobScore(job.task_id, 0.0, False, skipped=True))
                continue
            free_at = release + max(0.0, job.busy_s)
            scores.append(JobScore(job.task_id, job.full_score if job.finished else 0.0, job.finished))
        return scores


POLICIES: dict[str, OverrunPolicy] = {p.name: p for p in (Kill(), SkipNext(), Guard())}
