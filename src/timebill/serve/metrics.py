"""Counters and histograms behind ``GET /metrics``, written as Prometheus text.

Hand-written rather than ``prometheus_client``: ten counters, two gauges and one histogram in the exact text
scrapers and ``benchmarks/serve_load.py`` already read (the client would add ``*_created`` series, print
``1.0`` for ``1`` and omit labelled counters until their first increment), and no extra dependency.
"""

from __future__ import annotations

import math
import threading

ERROR_BUCKETS_S = (-1.0, -0.5, -0.25, -0.1, -0.05, -0.025, 0.0, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """Counters and histograms for ``GET /metrics`` (Prometheus text format, written by hand)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._hist: dict[tuple[str, tuple[tuple[str, str], ...]], list[float]] = {}  # buckets..., sum, count

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0.0) + value

    def observe(self, name: str, value: float, **labels: str) -> None:
        if not math.isfinite(value):
            return
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            h = self._hist.setdefault(key, [0.0] * (len(ERROR_BUCKETS_S) + 2))
            for i, bound in enumerate(ERROR_BUCKETS_S):
                if value <= bound:
                    h[i] += 1
            h[-2] += value
            h[-1] += 1

    def get(self, name: str, **labels: str) -> float:
        with self._lock:
            return self._counters.get((name, tuple(sorted(labels.items()))), 0.0)

    def render(self, gauges: dict[str, float]) -> str:
        helps = {
            "timebill_requests_total": ("counter", "Requests received, by endpoint."),
            "timebill_requests_invalid_total": ("counter", "Requests refused as malformed (HTTP 400/422)."),
            "timebill_requests_rejected_total": (
                "counter",
                "Requests refused with HTTP 429 because the budget cannot be met (stage: admission or queued).",
            ),
            "timebill_requests_completed_total": ("counter", "Requests the model ran, by stop reason."),
            "timebill_deadline_met_total": ("counter", "Completed requests answered within their budget."),
            "timebill_deadline_missed_total": ("counter", "Completed requests answered late (or with no token)."),
            "timebill_guard_stops_total": ("counter", "Answers the deadline guard cut short (finish_reason=length)."),
            "timebill_requests_cancelled_total": ("counter", "Requests whose client went away (queued or running)."),
            "timebill_requests_failed_total": ("counter", "Requests that failed inside the server (HTTP 500)."),
            "timebill_queue_wait_seconds_total": ("counter", "Time completed requests spent queued, summed."),
        }
        lines: list[str] = []
        with self._lock:
            counters = dict(self._counters)
            hists = {k: list(v) for k, v in self._hist.items()}
        for name, (kind, text) in helps.items():
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
            series = [(lab, v) for (n, lab), v in counters.items() if n == name] or [((), 0.0)]
            lines += [f"{name}{_labels(lab)} {_num(v)}" for lab, v in sorted(series)]
        gauge_help = {
            "timebill_queue_depth": "Requests waiting for the model.",
            "timebill_engine_busy": "1 while the model runs a request.",
        }
        for name, value in gauges.items():
            lines += [f"# HELP {name} {gauge_help.get(name, name)}", f"# TYPE {name} gauge", f"{name} {_num(value)}"]
        name = "timebill_time_error_seconds"
        lines += [
            f"# HELP {name} Measured minus predicted time (the estimator's error; queue wait excluded), by phase.",
            f"# TYPE {name} histogram",
        ]
        for (_, lab), h in sorted((k, v) for k, v in hists.items() if k[0] == name):
            for bound, count in zip(ERROR_BUCKETS_S, h, strict=False):
                lines.append(f"{name}_bucket{_labels((*lab, ('le', _num(bound))))} {_num(count)}")
            lines.append(f"{name}_bucket{_labels((*lab, ('le', '+Inf')))} {_num(h[-1])}")
            lines.append(f"{name}_sum{_labels(lab)} {_num(h[-2])}")
            lines.append(f"{name}_count{_labels(lab)} {_num(h[-1])}")
        return "\n".join(lines) + "\n"


def _labels(labels: tuple[tuple[str, str], ...]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))
