"""The time-budget benchmark (the paper's §6 experiment, offline): average score and completion rate per
time budget, for every method and overrun policy, in one resumable run (``timebill bench``).

| module | idea |
|---|---|
| ``suite`` | the task file format (JSONL, optional header), reading, ``--fraction`` subsets |
| ``generate`` | the LongBench-style suite from real text on disk: retrieval, code, long-document chat |
| ``metrics`` | LongBench's QA F1, ROUGE-L and code edit similarity, without their dependencies |
| ``methods`` | vanilla / fixed α / int8 (one traced run per task) and TimeBill variants (one run per budget) |
| ``policies`` | Kill, Skip-Next and our guard: what an overrunning job is worth |
| ``runner`` | resumable runs, one fsync'd JSONL line per run, budgets chosen from vanilla's times |
| ``stats`` | policy summaries per method and budget, parts merged by budget level, the claims' numbers |
| ``plots`` | the Fig. 6/7/8-style PNGs (the only module using matplotlib) |
| ``report`` | ``results.md``: tables, claims checked, how budgets were chosen |

Like the CLI, nothing here holds request logic: methods call :class:`timebill.engine.Engine` and
:class:`timebill.facade.TimeBill`.
"""
