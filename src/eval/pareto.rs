//! Pareto frontiers over (L0, R²) and the comparison of two frontiers.
//!
//! Implements `sae_variants.md` §7.6. The direction of each axis comes from the metric's
//! own metadata ([`Objective::higher_is_better`], after burn's `NumericAttributes`), not
//! from a hard-coded "L0 down, R² up".
//!
//! Decision: points with equal coordinates are kept once (the first in input order is the
//! representative), so the frontier is a set of distinct points and does not depend on
//! input order up to that choice.
//! Decision: comparisons interpolate the better axis linearly in `ln(L0)` along each
//! frontier, on 64 log-spaced grid points over the overlap of the two L0 ranges.

/// One axis of a frontier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Objective {
    /// The metric's name (a column of `metrics.parquet`).
    pub name: &'static str,
    /// Whether larger values are better.
    pub higher_is_better: bool,
}

/// L0: mean active latents per token; fewer is better.
pub const L0: Objective = Objective {
    name: "l0",
    higher_is_better: false,
};
/// Pooled R²; higher is better.
pub const R2: Objective = Objective {
    name: "r2",
    higher_is_better: true,
};

/// `a` is at least as good as `b` on this axis.
fn at_least(o: Objective, a: f64, b: f64) -> bool {
    if o.higher_is_better {
        a >= b
    } else {
        a <= b
    }
}

/// Whether point `a` dominates `b`: at least as good on both axes and different.
pub fn dominates(axes: (Objective, Objective), a: (f64, f64), b: (f64, f64)) -> bool {
    at_least(axes.0, a.0, b.0) && at_least(axes.1, a.1, b.1) && a != b
}

/// Indices of the non-dominated points, ordered by the first axis from best-to-worst
/// "cost" (for (L0, R²): ascending L0). Points with a non-finite coordinate never enter.
pub fn frontier(axes: (Objective, Objective), points: &[(f64, f64)]) -> Vec<usize> {
    let mut keep: Vec<usize> = Vec::new();
    for (i, &p) in points.iter().enumerate() {
        if !(p.0.is_finite() && p.1.is_finite()) {
            continue;
        }
        let dominated = points.iter().enumerate().any(|(j, &q)| {
            q.0.is_finite() && q.1.is_finite() && (dominates(axes, q, p) || (q == p && j < i))
        });
        if !dominated {
            keep.push(i);
        }
    }
    // Order along the first axis: ascending when lower is better.
    keep.sort_by(|&a, &b| {
        let (x, y) = (points[a].0, points[b].0);
        let ord = x.total_cmp(&y);
        if axes.0.higher_is_better {
            ord.reverse()
        } else {
            ord
        }
    });
    keep
}

/// R² on a (L0, R²) frontier at `l0`, interpolated linearly in `ln L0`; `None` outside
/// the frontier's L0 range. `front` must be sorted by ascending L0 (as [`frontier`]
/// returns it for [`L0`], [`R2`]) with positive L0.
pub fn interp_log_l0(front: &[(f64, f64)], l0: f64) -> Option<f64> {
    let first = front.first()?;
    let last = front.last()?;
    if !(l0 >= first.0 && l0 <= last.0) || l0 <= 0.0 {
        return None;
    }
    for w in front.windows(2) {
        let (a, b) = (w[0], w[1]);
        if l0 >= a.0 && l0 <= b.0 {
            if b.0 == a.0 {
                return Some(a.1.max(b.1));
            }
            let t = (l0.ln() - a.0.ln()) / (b.0.ln() - a.0.ln());
            return Some(a.1 + t * (b.1 - a.1));
        }
    }
    // A single-point frontier: only its own L0 is covered.
    Some(first.1)
}

/// How frontier A compares with frontier B over their common L0 range.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// The L0 range both frontiers cover.
    pub overlap: (f64, f64),
    /// Largest R²_A − R²_B on the grid.
    pub max_gap: f64,
    /// Smallest R²_A − R²_B on the grid.
    pub min_gap: f64,
    /// R²_A > R²_B at every grid point.
    pub a_strictly_dominates: bool,
}

/// Compare two (L0, R²) frontiers (each sorted by ascending L0) on 64 log-spaced points
/// over the overlap of their L0 ranges. `None` when the ranges do not overlap.
pub fn compare(a: &[(f64, f64)], b: &[(f64, f64)]) -> Option<Comparison> {
    let lo = a.first()?.0.max(b.first()?.0);
    let hi = a.last()?.0.min(b.last()?.0);
    if !(lo > 0.0 && lo <= hi) {
        return None;
    }
    const N: usize = 64;
    let (mut max_gap, mut min_gap) = (f64::NEG_INFINITY, f64::INFINITY);
    for i in 0..N {
        let t = i as f64 / (N - 1) as f64;
        let l0 = (lo.ln() + t * (hi.ln() - lo.ln())).exp().clamp(lo, hi);
        let gap = interp_log_l0(a, l0)? - interp_log_l0(b, l0)?;
        max_gap = max_gap.max(gap);
        min_gap = min_gap.min(gap);
    }
    Some(Comparison {
        overlap: (lo, hi),
        max_gap,
        min_gap,
        a_strictly_dominates: min_gap > 0.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const AXES: (Objective, Objective) = (L0, R2);

    #[test]
    fn keeps_only_non_dominated_points_in_l0_order() {
        let pts = [
            (10.0, 0.5),
            (20.0, 0.7),
            (15.0, 0.4),
            (40.0, 0.7),
            (5.0, 0.2),
        ];
        assert_eq!(frontier(AXES, &pts), vec![4, 0, 1]);
    }

    #[test]
    fn interpolates_in_log_l0() {
        let front = [(8.0, 0.5), (32.0, 0.7)];
        let mid = interp_log_l0(&front, 16.0).unwrap();
        assert!((mid - 0.6).abs() < 1e-12);
        assert_eq!(interp_log_l0(&front, 64.0), None);
        let cmp = compare(&[(8.0, 0.6), (32.0, 0.8)], &front).unwrap();
        assert!(cmp.a_strictly_dominates);
        assert!((cmp.min_gap - 0.1).abs() < 1e-9 && (cmp.max_gap - 0.1).abs() < 1e-9);
    }

    proptest! {
        #[test]
        fn frontier_is_non_dominated_and_order_free(
            pts in proptest::collection::vec((1.0f64..100.0, -1.0f64..1.0), 1..30),
            rot in 0usize..30,
        ) {
            let f = frontier(AXES, &pts);
            for &i in &f {
                for &j in &f {
                    prop_assert!(!dominates(AXES, pts[i], pts[j]));
                }
            }
            // Every point off the frontier is dominated by (or equal to) one on it.
            for (i, &p) in pts.iter().enumerate() {
                if !f.contains(&i) {
                    prop_assert!(f.iter().any(|&j| dominates(AXES, pts[j], p) || pts[j] == p));
                }
            }
            let mut shuffled = pts.clone();
            let r = rot % pts.len();
            shuffled.rotate_left(r);
            let a: Vec<(f64, f64)> = f.iter().map(|&i| pts[i]).collect();
            let b: Vec<(f64, f64)> = frontier(AXES, &shuffled).iter().map(|&i| shuffled[i]).collect();
            prop_assert_eq!(a, b);
        }
    }
}
