"""Execution-time estimator (ETE, method §3): FLOPs analysis, time-model fitting, profile storage.

Model-agnostic: nothing here loads a model. Profiling (measuring timings) lives with the engine.
"""

from __future__ import annotations

from timebill.estimator.fit import (
    PAPER_KINDS,
    Fit,
    LinFit,
    OnlineRecalibrator,
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
    load_profile,
    save_profile,
)

__all__ = [
    "PAPER_KINDS",
    "SCHEMA_VERSION",
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
