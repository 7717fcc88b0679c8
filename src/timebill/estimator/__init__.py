"""Execution-time estimator (ETE, method §3): FLOPs analysis, time-model fitting, profile storage.

Layout (Vidur-style: measurement separate from the models of it):

* ``flops``         — FLOPs of prefill / a decode step from the model config (why the forms are what they are);
* ``profiler``      — times the engine's own prefill, eviction, decode set-up and decode step (imports torch
  only when it runs);
* ``fit``           — non-negative least-squares fits of the time forms;
* ``profile_fit``   — fits a profile from the profiler's measurements (form choice, held-out MAPE, noise);
* ``estimator``     — predicts request times (e2e, WCET) from a profile;
* ``recalibration`` — online correction of the predictions by measured requests;
* ``timemodel``     — the ``TimeModel`` protocol the facade and bench call the estimator through;
* ``report``        — the text report and plot of a profile;
* ``store``         — profile files keyed by setup, saved atomically.
"""

from __future__ import annotations

from timebill.estimator.estimator import ExecutionTimeEstimator
from timebill.estimator.fit import (
    PAPER_KINDS,
    Fit,
    LinFit,
    PiecewiseLinFit,
    PiecewiseQuadFit,
    QuadFit,
    fit_decode,
    fit_decode_piecewise,
    fit_from_dict,
    fit_prefill,
    fit_prefill_piecewise,
    mape,
    select_model,
    split_holdout,
)
from timebill.estimator.flops import (
    FlopsBreakdown,
    ModelShape,
    decode_step_flops,
    flops_coefficients,
    format_flops_table,
    prefill_flops,
)
from timebill.estimator.profile_fit import fit_profile, profile_key_for
from timebill.estimator.profiler import DEFAULT_N_MAX, ProfileGrid, profile_engine
from timebill.estimator.recalibration import DriftTracker, OnlineRecalibrator
from timebill.estimator.report import format_profile_report, plot_profile
from timebill.estimator.store import (
    SCHEMA_VERSION,
    Profile,
    ProfileKey,
    check_key,
    cpu_model_name,
    default_profile_path,
    device_string,
    find_profile,
    host_fingerprint,
    library_versions,
    list_profiles,
    load_profile,
    save_profile,
)
from timebill.estimator.timemodel import TimeModel

__all__ = [
    "DEFAULT_N_MAX",
    "DriftTracker",
    "ExecutionTimeEstimator",
    "ProfileGrid",
    "fit_profile",
    "format_profile_report",
    "list_profiles",
    "plot_profile",
    "profile_engine",
    "profile_key_for",
    "PAPER_KINDS",
    "SCHEMA_VERSION",
    "TimeModel",
    "Fit",
    "FlopsBreakdown",
    "LinFit",
    "ModelShape",
    "OnlineRecalibrator",
    "PiecewiseLinFit",
    "PiecewiseQuadFit",
    "Profile",
    "ProfileKey",
    "QuadFit",
    "check_key",
    "cpu_model_name",
    "decode_step_flops",
    "default_profile_path",
    "device_string",
    "find_profile",
    "fit_decode",
    "fit_decode_piecewise",
    "fit_from_dict",
    "fit_prefill",
    "fit_prefill_piecewise",
    "flops_coefficients",
    "format_flops_table",
    "host_fingerprint",
    "library_versions",
    "load_profile",
    "mape",
    "prefill_flops",
    "save_profile",
    "select_model",
    "split_holdout",
]
