//! Streaming SAE metrics (sae_variants.md §7, STYLE.md §2.8), accumulated in `f64` token by
//! token in input order, so the result does not depend on how the tokens are split into
//! batches (bit for bit).
//!
//! ```text
//! N    = number of tokens;  μ = (1/N) Σ_t x_t  (per dimension)
//! SSE  = Σ_t ‖x_t − x̂_t‖²
//! SST  = Σ_t ‖x_t − μ‖² = Σ_j (Σ_t x_{t,j}² − (Σ_t x_{t,j})²/N)     (pooled, = N·tr Cov x)
//! R²   = 1 − SSE/SST;  FVU = SSE/SST;  MSE = SSE/N   (SumD: summed over dimensions)
//! L0   = (1/N) Σ_t #{i : f_{t,i} ≠ 0}          (≠ 0, so signed latents count)
//! L1   = (1/N) Σ_t Σ_i |f_{t,i}|
//! dead fraction  = (1/F) #{i : f_{t,i} = 0 for every t in the window}
//! dense fraction(τ) = (1/F) #{i : (1/N) #{t : f_{t,i} ≠ 0} > τ}
//! bipolar census (sae_variants.md §6.7): n⁺_i = #{t : f_{t,i} > 0}, n⁻_i = #{t : f_{t,i} < 0};
//!   latent i is bipolar if n⁺_i + n⁻_i ≥ 100 and min(n⁺_i, n⁻_i)/(n⁺_i + n⁻_i) ≥ 0.1
//! bipolar fraction  = (1/F) #{bipolar i}
//! bipolar var share = Σ_{bipolar i} E_i / Σ_i E_i,   E_i = Σ_t f_{t,i}² ‖d_i‖²
//! ```
//! Decision: `E_i` (the energy latent i adds to the reconstruction, cross terms left out) is
//! accumulated from the codes alone, so it is `Σ_t f²` of an SAE with unit decoder rows,
//! which every exported SAE has (export folds the norms into the codes).
//! Decision: metrics are computed in raw (unscaled) activation space; callers pass raw `x`
//! and raw reconstructions. The dead fraction here is over the evaluated window of `N`
//! tokens (state `N` with it); the trainer's running dead fraction uses its token counter.

pub mod pareto;
pub mod power;

use serde::{Deserialize, Serialize};

use crate::kernels::Codes;

/// Reconstruction statistics (R², FVU, MSE).
#[derive(Debug, Clone, PartialEq)]
pub struct ReconStats {
    d: usize,
    n: u64,
    sum_x: Vec<f64>,
    sum_sq: Vec<f64>,
    sse: f64,
}

impl ReconStats {
    /// Empty accumulator for width `d`.
    pub fn new(d: usize) -> Self {
        Self {
            d,
            n: 0,
            sum_x: vec![0.0; d],
            sum_sq: vec![0.0; d],
            sse: 0.0,
        }
    }
    /// Add tokens `x`, `recon`: `[n, d]`.
    pub fn update(&mut self, x: &[f32], recon: &[f32]) {
        for (xr, rr) in x.chunks(self.d).zip(recon.chunks(self.d)) {
            let mut e = 0.0f64;
            for j in 0..self.d {
                let v = xr[j] as f64;
                self.sum_x[j] += v;
                self.sum_sq[j] += v * v;
                let r = v - rr[j] as f64;
                e += r * r;
            }
            self.sse += e;
            self.n += 1;
        }
    }
    /// Tokens seen.
    pub fn n(&self) -> u64 {
        self.n
    }
    /// Pooled total sum of squares about the mean.
    pub fn sst(&self) -> f64 {
        let n = self.n.max(1) as f64;
        (0..self.d)
            .map(|j| self.sum_sq[j] - self.sum_x[j] * self.sum_x[j] / n)
            .sum()
    }
    /// Whether the evaluation set has no variance to explain: `SST ≤ VARIANCE_FLOOR · Σ‖x‖²`
    /// (constant activations leave only f64 rounding noise in SST).
    pub fn degenerate(&self) -> bool {
        let total: f64 = self.sum_sq.iter().sum();
        self.sst() <= VARIANCE_FLOOR * total
    }
    /// Fraction of variance unexplained, `SSE/SST`; NaN when [`ReconStats::degenerate`].
    pub fn fvu(&self) -> f64 {
        if self.degenerate() {
            return f64::NAN;
        }
        self.sse / self.sst()
    }
    /// `R² = 1 − FVU`; NaN when [`ReconStats::degenerate`].
    pub fn r2(&self) -> f64 {
        1.0 - self.fvu()
    }
    /// `SSE/N`.
    pub fn mse(&self) -> f64 {
        self.sse / self.n.max(1) as f64
    }
}

/// Relative floor on the evaluation set's variance: below `VARIANCE_FLOOR · Σ‖x‖²` the total
/// variance is rounding noise and R²/FVU are undefined (reported as null, with a warning).
/// Decision: relative, so the floor means the same at every activation scale; 1e-9 is far
/// above f64 rounding of the accumulators (~1e-16) and far below any real hookpoint's
/// variance share.
pub const VARIANCE_FLOOR: f64 = 1e-9;

/// Sparsity statistics (L0, L1, dead and dense fractions).
#[derive(Debug, Clone, PartialEq)]
pub struct SparsityStats {
    n: u64,
    nnz: u64,
    l1: f64,
    fires: Vec<u64>,
    neg: Vec<u64>,
    energy: Vec<f64>,
}

/// Minimum firings for a latent to enter the bipolar census (§6.7).
pub const BIPOLAR_MIN_FIRES: u64 = 100;
/// Minimum share of the rarer sign for a latent to count as bipolar (§6.7).
pub const BIPOLAR_MIN_SHARE: f64 = 0.1;

impl SparsityStats {
    /// Empty accumulator for `d_sae` latents.
    pub fn new(d_sae: usize) -> Self {
        Self {
            n: 0,
            nnz: 0,
            l1: 0.0,
            fires: vec![0; d_sae],
            neg: vec![0; d_sae],
            energy: vec![0.0; d_sae],
        }
    }
    /// Add the codes of a batch.
    pub fn update(&mut self, codes: &Codes) {
        for b in 0..codes.n() {
            let (ix, vs) = codes.row(b);
            for (&i, &v) in ix.iter().zip(vs) {
                if v != 0.0 {
                    self.nnz += 1;
                    self.l1 += v.abs() as f64;
                    self.fires[i as usize] += 1;
                    self.neg[i as usize] += (v < 0.0) as u64;
                    self.energy[i as usize] += (v as f64) * (v as f64);
                }
            }
            self.n += 1;
        }
    }
    /// Mean active latents per token.
    pub fn l0(&self) -> f64 {
        self.nnz as f64 / self.n.max(1) as f64
    }
    /// Mean L1 norm of the codes per token.
    pub fn l1(&self) -> f64 {
        self.l1 / self.n.max(1) as f64
    }
    /// Fraction of latents that never fired in the window.
    pub fn dead_frac(&self) -> f64 {
        self.fires.iter().filter(|&&c| c == 0).count() as f64 / self.fires.len().max(1) as f64
    }
    /// Fraction of latents firing on more than `tau` of the tokens.
    pub fn dense_frac(&self, tau: f64) -> f64 {
        let n = self.n.max(1) as f64;
        self.fires.iter().filter(|&&c| c as f64 / n > tau).count() as f64
            / self.fires.len().max(1) as f64
    }
    /// Per-latent firing counts.
    pub fn fires(&self) -> &[u64] {
        &self.fires
    }
    /// Per-latent counts of negative activations (`n⁻`).
    pub fn negative_fires(&self) -> &[u64] {
        &self.neg
    }
    /// Whether latent `i` is bipolar by the §6.7 census.
    pub fn is_bipolar(&self, i: usize) -> bool {
        let (all, neg) = (self.fires[i], self.neg[i]);
        all >= BIPOLAR_MIN_FIRES && (neg.min(all - neg) as f64) >= BIPOLAR_MIN_SHARE * all as f64
    }
    /// Share of latents that fire with both signs (§6.7).
    pub fn bipolar_frac(&self) -> f64 {
        let f = self.fires.len();
        (0..f).filter(|&i| self.is_bipolar(i)).count() as f64 / f.max(1) as f64
    }
    /// Share of the code energy `Σ f²` (reconstruction variance with unit decoder rows)
    /// carried by bipolar latents; 0 when nothing fired.
    pub fn bipolar_var_share(&self) -> f64 {
        let total: f64 = self.energy.iter().sum();
        if total <= 0.0 {
            return 0.0;
        }
        let bip: f64 = (0..self.fires.len())
            .filter(|&i| self.is_bipolar(i))
            .map(|i| self.energy[i])
            .sum();
        bip / total
    }
}

/// Final metric values of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricValues {
    /// Tokens evaluated (the dead-fraction window).
    pub n_tokens: u64,
    /// Pooled R².
    pub r2: f64,
    /// FVU = 1 − R².
    pub fvu: f64,
    /// SSE/N (raw space).
    pub mse: f64,
    /// Mean L0.
    pub l0: f64,
    /// Mean L1 of the codes.
    pub l1: f64,
    /// Dead fraction over the window.
    pub dead_frac: f64,
    /// Fraction of latents firing on > 1% of tokens.
    pub dense_frac_1pct: f64,
    /// Fraction of latents firing on > 10% of tokens.
    pub dense_frac_10pct: f64,
    /// Share of latents firing with both signs (§6.7 census).
    pub bipolar_frac: f64,
    /// Share of the reconstruction energy carried by bipolar latents.
    pub bipolar_var_share: f64,
}

/// Whether a larger value of metric `name` is better (`None` for descriptive metrics);
/// the Pareto code reads the axis direction from here.
pub fn higher_is_better(name: &str) -> Option<bool> {
    match name {
        "r2" => Some(true),
        "fvu" | "mse" | "l0" | "l1" | "dead_frac" => Some(false),
        _ => None,
    }
}

/// Both accumulators together.
#[derive(Debug, Clone, PartialEq)]
pub struct Metrics {
    /// Reconstruction.
    pub recon: ReconStats,
    /// Sparsity.
    pub sparsity: SparsityStats,
}

impl Metrics {
    /// Empty accumulators.
    pub fn new(d_in: usize, d_sae: usize) -> Self {
        Self {
            recon: ReconStats::new(d_in),
            sparsity: SparsityStats::new(d_sae),
        }
    }
    /// Add a batch: raw `x`, raw reconstruction, codes.
    pub fn update(&mut self, x: &[f32], recon: &[f32], codes: &Codes) {
        self.recon.update(x, recon);
        self.sparsity.update(codes);
    }
    /// The values.
    pub fn finish(&self) -> MetricValues {
        MetricValues {
            n_tokens: self.recon.n(),
            r2: self.recon.r2(),
            fvu: self.recon.fvu(),
            mse: self.recon.mse(),
            l0: self.sparsity.l0(),
            l1: self.sparsity.l1(),
            dead_frac: self.sparsity.dead_frac(),
            dense_frac_1pct: self.sparsity.dense_frac(0.01),
            dense_frac_10pct: self.sparsity.dense_frac(0.1),
            bipolar_frac: self.sparsity.bipolar_frac(),
            bipolar_var_share: self.sparsity.bipolar_var_share(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r2_is_one_for_perfect_and_zero_for_mean() {
        let x = vec![1.0, 2.0, 3.0, 5.0, -1.0, 0.5];
        let mut m = ReconStats::new(2);
        m.update(&x, &x);
        assert_eq!(m.r2(), 1.0);
        let mu = [1.0, 2.5];
        let pred: Vec<f32> = (0..3).flat_map(|_| mu).collect();
        let mut m = ReconStats::new(2);
        m.update(&x, &pred);
        assert!(m.r2().abs() < 1e-12, "{}", m.r2());
    }
}

#[cfg(test)]
mod census_tests {
    use super::*;

    fn codes(rows: &[Vec<(u32, f32)>]) -> Codes {
        let mut c = Codes::default();
        c.clear();
        for r in rows {
            for &(i, v) in r {
                c.idx.push(i);
                c.val.push(v);
            }
            c.indptr.push(c.idx.len());
        }
        c
    }

    #[test]
    fn l0_counts_negatives_and_the_census_finds_bipolar_latents() {
        // latent 0: 60 positive, 60 negative (bipolar); latent 1: 150 positive, 5 negative
        // (rarer sign 3%: not bipolar); latent 2: 20 each sign (too few firings); latent 3 dead.
        let mut rows = Vec::new();
        for t in 0..200 {
            let mut r = Vec::new();
            if t < 120 {
                r.push((0, if t % 2 == 0 { 2.0 } else { -2.0 }));
            }
            if t < 155 {
                r.push((1, if t < 150 { 1.0 } else { -1.0 }));
            }
            if t < 40 {
                r.push((2, if t % 2 == 0 { 1.0 } else { -1.0 }));
            }
            rows.push(r);
        }
        let mut s = SparsityStats::new(4);
        s.update(&codes(&rows));
        assert_eq!(s.l0(), (120.0 + 155.0 + 40.0) / 200.0);
        assert_eq!(s.negative_fires(), &[60, 5, 20, 0]);
        assert!(s.is_bipolar(0) && !s.is_bipolar(1) && !s.is_bipolar(2) && !s.is_bipolar(3));
        assert_eq!(s.bipolar_frac(), 0.25);
        let e0 = 120.0 * 4.0;
        assert!((s.bipolar_var_share() - e0 / (e0 + 155.0 + 40.0)).abs() < 1e-12);
        assert_eq!(s.dead_frac(), 0.25);
    }
}

#[cfg(test)]
mod variance_floor_tests {
    use super::ReconStats;

    #[test]
    fn constant_activations_have_no_r2() {
        let d = 8;
        // Every token the same vector: SST is rounding noise, R² would read > 1.
        let x: Vec<f32> = (0..64)
            .flat_map(|_| (0..d).map(|j| 3.7 + j as f32 * 0.1))
            .collect();
        let recon: Vec<f32> = x.iter().map(|v| v + 1e-4).collect();
        let mut s = ReconStats::new(d);
        s.update(&x, &recon);
        assert!(s.degenerate());
        assert!(s.r2().is_nan() && s.fvu().is_nan());
        // A little real variance is enough to define it again.
        let y: Vec<f32> = x
            .iter()
            .enumerate()
            .map(|(i, v)| v + if i % 3 == 0 { 0.05 } else { 0.0 })
            .collect();
        let mut s = ReconStats::new(d);
        s.update(&y, &y);
        assert!(!s.degenerate());
        assert_eq!(s.r2(), 1.0);
    }
}
