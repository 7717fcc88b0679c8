"""A profile for people: the text report (coefficients, held-out MAPE against the noise floor, FLOPs
check) and the measured-vs-fitted plot that `timebill profile` prints and saves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from timebill.estimator.fit import PAPER_KINDS, Fit, fit_from_dict
from timebill.estimator.store import Profile
from timebill.figures import save_figure


def _fmt_fit(fit: Fit) -> str:
    d = fit.to_dict()
    return f"{d.pop('kind')}: " + ", ".join(f"{k}={v:.4g}" for k, v in d.items())


def format_profile_report(profile: Profile) -> str:
    """A human-readable summary: setup, coefficients, held-out MAPE vs noise floor, FLOPs check."""
    rep, noise = profile.report or {}, profile.noise or {}
    grid = profile.measurements.get("grid", {})
    lines = [
        f"setup     : {profile.key.describe()}",
        f"host      : {profile.key.host}",
        f"versions  : {', '.join(f'{k} {v}' for k, v in profile.key.versions.items())}",
        f"created   : {profile.created}   grid: {grid.get('name', '?')} "
        f"({len(grid.get('prefill_n', []))} prompt lengths, {len(grid.get('decode_n_kv', []))} cache "
        f"lengths, {grid.get('repeats', '?')} repeats; measured in "
        f"{profile.measurements.get('wall_s', '?')} s, {profile.measurements.get('waited_s', 0)} s of it waiting "
        "for other processes to go quiet)",
        "",
        "time models (seconds; N = prompt tokens, N_kv = cached tokens):",
        f"  prefill  {_fmt_fit(profile.prefill_fit())}",
        f"  decode   {_fmt_fit(profile.decode_fit())}",
    ]
    ev = profile.eviction_fit()
    if ev is not None:
        lines.append(f"  evict    {_fmt_fit(ev)}  (t = p·N_x + q, all α pooled)")
    su = profile.setup_fit()
    if su is not None:
        lines.append(f"  setup    {_fmt_fit(su)}  (decode set-up, t = p·kept + q)")
    paper = rep.get("paper_fits", {})
    if rep.get("prefill", {}).get("chosen") not in PAPER_KINDS and "prefill" in paper:
        lines.append(f"  (paper-form prefill  {_fmt_fit(fit_from_dict(paper['prefill']))})")
    if rep.get("decode", {}).get("chosen") not in PAPER_KINDS and "decode" in paper:
        lines.append(f"  (paper-form decode   {_fmt_fit(fit_from_dict(paper['decode']))})")
    lines += ["", "accuracy on held-out grid points (not used for fitting) vs measurement noise:"]
    header = (
        f"  {'model':<9}{'chosen':<18}{'MAPE held-out':>14}{'max APE':>9}{'points':>8}"
        f"{'noise MAD':>11}{'CV':>7}{'floor':>8}{'contended':>11}{'LOO (fit pts)':>15}"
    )
    lines.append(header)
    for kind in ("prefill", "decode", "evict", "setup"):
        r, nz = rep.get(kind) or {}, noise.get(kind) or {}
        if not r:
            continue
        chosen = r["chosen"]
        lines.append(
            f"  {kind:<9}{chosen:<18}{r['mape_holdout_pct'][chosen]:>13.2f}%"
            f"{r.get('max_ape_holdout_pct', float('nan')):>8.2f}%{r['n_holdout_points']:>8d}"
            f"{nz.get('mad_rel_pct', float('nan')):>10.2f}%{nz.get('cv_pct', float('nan')):>6.2f}%"
            f"{nz.get('floor_mape_pct', float('nan')):>7.2f}%{100 * nz.get('contended_share', 0.0):>10.1f}%"
            + (f"{r['mape_loo_pct'][chosen]:>14.2f}%" if r.get("mape_loo_pct", {}).get(chosen) is not None else "")
        )
        others = {k: v for k, v in r["mape_holdout_pct"].items() if k != chosen}
        for kind2, value in others.items():
            loo = r.get("mape_loo_pct", {}).get(kind2)
            lines.append(
                f"  {'':<9}{'(' + kind2 + ')':<18}{value:>13.2f}%"
                + (f"{'':>54}{loo:>14.2f}%" if loo is not None else "")
            )
    lines.append("  noise MAD/CV: median over grid points of the repeat-to-repeat spread; floor: expected MAPE of a")
    lines.append("  perfect model against the held-out medians (≈ σ/√repeats); contended: samples during which other")
    lines.append("  processes used the CPU (re-measured up to the retry limit); LOO: leave-one-out MAPE on the fit")
    lines.append("  points, which chooses the form (a hinge must beat the paper form by >10 %).")
    contended = max((noise.get(k) or {}).get("contended_share", 0.0) for k in ("prefill", "decode"))
    if contended > 0.1:
        lines.append(
            f"  WARNING: {100 * contended:.0f}% of samples ran while other processes used the CPU; this "
            "profile is slower and noisier than the machine — re-run `timebill profile` when it is quiet."
        )
    fc = rep.get("flops_check")
    if fc:
        lines += ["", "FLOPs check (fitted paper-form coefficient vs FLOPs of the same term):"]
        for term, value in fc["gflops_per_s"].items():
            flops = fc["flops"][term[0]]
            text = f"{value:8.1f} GFLOP/s" if value else "     n/a (coefficient is 0)"
            lines.append(f"  {term:<32} {flops:>12.4g} FLOPs  -> {text}")
        for term, value in fc["gbytes_per_s"].items():
            text = f"{value:8.1f} GB/s" if value else "     n/a"
            lines.append(f"  {term:<32} {'':>12}        -> {text}")
        if fc.get("a_over_b_throughput"):
            lines.append(
                f"  attention N² runs at {fc['a_over_b_throughput']:.2f}× the matmul throughput of the "
                "per-token term (FLOPs counted for the full N×N square; a causal kernel skips ~half)."
            )
    return "\n".join(lines)


def plot_profile(profile: Profile, path: str | Path) -> Path:
    """PNG of measured vs fitted prefill and decode-step times, with relative residuals (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = profile.report or {}
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex="col", gridspec_kw={"height_ratios": [3, 1.3]})
    for col, (kind, fit, label) in enumerate(
        (
            ("prefill", profile.prefill_fit(), "prompt tokens N_x"),
            ("decode", profile.decode_fit(), "cached tokens N_kv"),
        )
    ):
        ax, res = axes[0][col], axes[1][col]
        raw = np.array([[r[1], r[2]] for r in profile.measurements.get(kind, [])], dtype=float)
        pts = np.array(rep.get("points", {}).get(kind, []), dtype=float)
        hold = set(rep.get(kind, {}).get("holdout_n", []))
        scale, unit = (1.0, "s") if kind == "prefill" else (1e3, "ms")
        if raw.size:
            ax.scatter(raw[:, 0], raw[:, 1] * scale, s=6, color="0.7", label="each repeat", zorder=1)
        xs = np.linspace(0, max(raw[:, 0].max() if raw.size else 1.0, 1.0), 400)
        ax.plot(xs, np.asarray(fit.predict(xs)) * scale, color="C3", label=f"fit ({fit.kind})", zorder=3)
        paper = rep.get("paper_fits", {}).get(kind)
        if paper and paper.get("kind") != fit.kind:
            pf = fit_from_dict(paper)
            ax.plot(xs, np.asarray(pf.predict(xs)) * scale, "--", color="C0", label="paper form", zorder=2)
        if pts.size:
            is_hold = np.array([p in hold for p in pts[:, 0]])
            for mask, marker, name in ((~is_hold, "o", "median (fit)"), (is_hold, "s", "median (held out)")):
                ax.scatter(pts[mask, 0], pts[mask, 1] * scale, marker=marker, s=28, label=name, zorder=4)
                rel = (pts[mask, 1] - np.asarray(fit.predict(pts[mask, 0]))) / pts[mask, 1] * 100
                res.errorbar(pts[mask, 0], rel, yerr=pts[mask, 2] * 100, fmt=marker, ms=5, capsize=2, label=name)
        mape_h = rep.get(kind, {}).get("mape_holdout_pct", {}).get(fit.kind)
        title = f"{kind}: held-out MAPE {mape_h:.2f}%" if mape_h is not None else kind
        ax.set_title(title)
        ax.set_ylabel(f"time ({unit})")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        res.axhline(0, color="0.3", lw=0.8)
        res.set_xlabel(label)
        res.set_ylabel("measured − fit (%)")
        res.grid(alpha=0.3)
    fig.suptitle(f"TimeBill ETE profile — {profile.key.describe()}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
