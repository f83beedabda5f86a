#!/usr/bin/env python3
"""R², dead fraction and bipolar fraction of each variant at a matched L0 (sae_variants.md §6.7).

    python3 scripts/matched_l0.py data/sa-gsae-vs-gated/results/metrics.parquet [--l0 64]

Reads a `metrics.parquet` written by `saepipe run` (needs only pyarrow). Per hookpoint and
series (arch, optimiser when not Adam, width), the rows of each sparsity value are
averaged over seeds; the averaged points, sorted by L0, are interpolated linearly in log L0
at the target. When the target lies outside their L0 range the nearest point is reported and
marked `*`. Prints a Markdown table, plus the seed spread (max − min R² at the bracketing
sparsity values).
"""

import argparse
import math
import sys
from collections import defaultdict

import pyarrow.parquet as pq


def interpolate(points, target):
    """points: [(l0, values...)] sorted by l0 -> (values at target, exact?)."""
    lt = math.log(target)
    for (a, *va), (b, *vb) in zip(points, points[1:]):
        if a <= target <= b:
            la, lb = math.log(a), math.log(b)
            w = 0.0 if lb == la else (lt - la) / (lb - la)
            return [x + w * (y - x) for x, y in zip(va, vb)], True
    nearest = min(points, key=lambda p: abs(math.log(p[0]) - lt))
    return list(nearest[1:]), False


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("metrics", help="results/metrics.parquet of a run")
    ap.add_argument("--l0", type=float, default=64.0, help="target L0 (default 64)")
    args = ap.parse_args()
    try:
        rows = pq.read_table(args.metrics).to_pylist()
    except (OSError, ValueError) as e:
        sys.exit(f"{args.metrics}: {e}; run `saepipe run <pipeline>` first")
    groups = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if not (r["l0"] and r["l0"] > 0 and math.isfinite(r["r2"])):
            continue
        opt = r["optimizer"]
        series = r["arch"] + ("" if opt in ("", "adam") else f"+{opt}") + f" ({r['d_sae']})"
        groups[(r["hookpoint"], series)][r["sparsity_value"]].append(r)

    print(f"| hookpoint | series | R² @ L0={args.l0:g} | dead | bipolar | seeds | λ range L0 | R² seed spread |")
    print("|---|---|---:|---:|---:|---:|---|---:|")
    for (hp, series), by_s in sorted(groups.items()):
        pts = []
        spread = {}
        for s, rs in by_s.items():
            n = len(rs)
            mean = lambda k: sum((r[k] or 0.0) for r in rs) / n
            pts.append((mean("l0"), mean("r2"), mean("dead_frac"), mean("bipolar_frac"), n))
            r2s = [r["r2"] for r in rs]
            spread[mean("l0")] = max(r2s) - min(r2s)
        pts.sort()
        (r2, dead, bip), exact = interpolate([p[:4] for p in pts], args.l0)
        seeds = min(p[4] for p in pts)
        lo, hi = pts[0][0], pts[-1][0]
        sp = max(spread.values())
        star = "" if exact else "*"
        print(
            f"| {hp} | {series} | {r2:.3f}{star} | {dead:.3f}{star} | {bip:.3f}{star} | {seeds} "
            f"| {lo:.0f}–{hi:.0f} | {sp:.3f} |"
        )
    print(f"\n`*`: {args.l0:g} is outside the series' L0 range; nearest point shown.")


if __name__ == "__main__":
    main()
