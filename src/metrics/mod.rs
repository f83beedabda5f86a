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
//! ```
//! Decision: metrics are computed in raw (unscaled) activation space; callers pass raw `x`
//! and raw reconstructions. The dead fraction here is over the evaluated window of `N`
//! tokens (state `N` with it); the trainer's running dead fraction uses its token counter.

use serde::{Deserialize, Serialize};

use crate::sae::common::Codes;

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
    /// Fraction of variance unexplained, `SSE/SST`.
    pub fn fvu(&self) -> f64 {
        self.sse / self.sst()
    }
    /// `R² = 1 − FVU`.
    pub fn r2(&self) -> f64 {
        1.0 - self.fvu()
    }
    /// `SSE/N`.
    pub fn mse(&self) -> f64 {
        self.sse / self.n.max(1) as f64
    }
}

/// Sparsity statistics (L0, L1, dead and dense fractions).
#[derive(Debug, Clone, PartialEq)]
pub struct SparsityStats {
    n: u64,
    nnz: u64,
    l1: f64,
    fires: Vec<u64>,
}

impl SparsityStats {
    /// Empty accumulator for `d_sae` latents.
    pub fn new(d_sae: usize) -> Self {
        Self {
            n: 0,
            nnz: 0,
            l1: 0.0,
            fires: vec![0; d_sae],
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
