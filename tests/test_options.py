"""The per-request options type: every field checked once, when the object is made (no model needed)."""

from __future__ import annotations

import dataclasses

import pytest

from timebill.errors import InvalidInputError
from timebill.options import RequestOptions, SamplingConfig, check_alpha, check_max_new_tokens, check_press


@pytest.mark.parametrize(
    ("field", "value", "says"),
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("max_new_tokens", 2.5, "max_new_tokens"),
        ("max_new_tokens", True, "max_new_tokens"),
        ("k", 0.5, "k must be"),
        ("k", float("nan"), "k must be"),
        ("alpha_max", 0.0, "alpha_max"),
        ("alpha_max", 1.0, "alpha_max"),
        ("bound", "magic", "bound"),
        ("delta", 1.0, "delta"),
        ("infeasible_slack", -0.5, "infeasible_slack"),
        ("infeasible_slack", float("inf"), "infeasible_slack"),
        ("replan", "yes", "replan"),
        ("press", "magic", "Unknown press"),
        ("temperature", -1.0, "temperature"),
        ("top_p", 0.0, "top_p"),
        ("seed", 1.5, "seed"),
    ],
)
def test_each_bad_field_is_a_clear_error_naming_it(field: str, value: object, says: str) -> None:
    with pytest.raises(InvalidInputError, match=says):
        RequestOptions(**{field: value})


def test_defaults_are_the_papers_and_ours() -> None:
    opts = RequestOptions()
    assert (opts.k, opts.alpha_max, opts.bound, opts.infeasible_slack) == (5.0, 0.95, "k", 0.02)
    assert opts.sampling == SamplingConfig()


def test_overrides_skip_none_reject_unknown_names_and_revalidate() -> None:
    base = RequestOptions(max_new_tokens=64)
    assert base.with_overrides(k=None, bound=None) is base  # None = "not given", as from a CLI flag
    changed = base.with_overrides(k=3, replan=False)
    assert (changed.k, changed.replan, changed.max_new_tokens) == (3, False, 64)
    with pytest.raises(InvalidInputError, match="unknown request option"):
        base.with_overrides(kk=3)
    with pytest.raises(InvalidInputError, match="alpha_max"):
        base.with_overrides(alpha_max=1.5)


def test_options_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        RequestOptions().k = 2  # type: ignore[misc]


def test_shared_field_checks() -> None:
    assert check_max_new_tokens(3) == 3 and check_alpha(0) == 0.0 and check_press("knorm") == "knorm"
    for bad in (-0.1, 1.0, float("nan"), True):
        with pytest.raises(InvalidInputError, match="alpha"):
            check_alpha(bad)
