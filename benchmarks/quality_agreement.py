"""Do two quality models agree? Per-kind factors of two calibration suites, side by side.

Why: the expected-score planner ranks configurations by a quality model's per-kind factors. If two
disjoint calibration suites of the same size rank them differently, the ranking is noise at that size,
and a planner built on it picks by noise. This prints, for two quality files (e.g. one fitted on
calibration-v1 only, one on calibration-v2 only: `timebill calibrate --fit-only --suite S --runs R --out F`),
each factor's raw value in both, their Pearson correlation (with and without the one large known effect,
α = 0.95), and each kind's best configuration in each file.

    python benchmarks/quality_agreement.py A.json B.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

LARGE_KNOWN = "alpha:0.95"


def _kinds(path: str) -> dict[str, dict[str, float]]:
    try:
        data = json.loads(open(path, encoding="utf-8").read())
        return {k: dict(v["relative_raw"]) for k, v in data["kinds"].items() if k != "all"}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        sys.exit(f"{path}: not a timebill quality file ({exc})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args(argv)
    a, b = _kinds(args.a), _kinds(args.b)
    kinds = sorted(set(a) & set(b))
    if not kinds:
        sys.exit("the two files share no kind")
    pairs: list[tuple[str, str, float, float]] = []
    print(f"{'kind':10} {'factor':14} {'A':>6} {'B':>6}")
    for kind in kinds:
        for factor in sorted(set(a[kind]) & set(b[kind])):
            pairs.append((kind, factor, a[kind][factor], b[kind][factor]))
            print(f"{kind:10} {factor:14} {a[kind][factor]:6.2f} {b[kind][factor]:6.2f}")
    xs, ys = [p[2] for p in pairs], [p[3] for p in pairs]
    rest = [(p[2], p[3]) for p in pairs if p[1] != LARGE_KNOWN]
    print(f"\nPearson r over {len(pairs)} factors: {statistics.correlation(xs, ys):.2f}")
    if len(rest) > 2:
        r = statistics.correlation(*zip(*rest, strict=True))
        print(f"Pearson r without {LARGE_KNOWN} ({len(rest)} factors): {r:.2f}")
    for kind in kinds:
        best_a, best_b = max(a[kind], key=a[kind].get), max(b[kind], key=b[kind].get)
        print(f"best for {kind}: A {best_a} ({a[kind][best_a]:.2f}), B {best_b} ({b[kind][best_b]:.2f})")


if __name__ == "__main__":
    main()
