//! Synthetic activations with a known sparse ground truth, for tests and benchmarks
//! (sae_variants.md §6.8 describes the same construction).
//!
//! ```text
//! D ∈ R^{F_true × d}, unit rows (random directions)
//! x = Σ_{j active} c_j D_j + σ·ε,   each feature active with probability p = mean_active/F_true,
//! |c_j| ~ Exp(1) + 0.5,  sign +1 (or ±1 with equal probability when `bipolar`)
//! ```
//! [`mmcs`] scores a learned decoder against `D`: the mean over true features of the best
//! absolute cosine similarity with any decoder row.

use rayon::prelude::*;

use crate::rng::Rng;
use crate::sae::common::{dot, random_rows};

/// Shape of the synthetic data.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticConfig {
    /// Activation width.
    pub d: usize,
    /// Number of true features.
    pub n_features: usize,
    /// Expected active features per token.
    pub mean_active: f32,
    /// Standard deviation of the additive Gaussian noise per coordinate.
    pub noise: f32,
    /// Features fire with either sign (for signed SAEs); otherwise coefficients are positive.
    pub bipolar: bool,
    /// Seed of the dictionary.
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            d: 32,
            n_features: 64,
            mean_active: 3.0,
            noise: 0.01,
            bipolar: false,
            seed: 0,
        }
    }
}

/// A ground-truth dictionary and a sampler.
#[derive(Debug, Clone)]
pub struct SyntheticData {
    /// Configuration.
    pub cfg: SyntheticConfig,
    /// True feature directions `[n_features, d]`, unit rows.
    pub dict: Vec<f32>,
}

impl SyntheticData {
    /// Draw the dictionary from `cfg.seed`.
    pub fn new(cfg: SyntheticConfig) -> Self {
        let mut rng = Rng::new(cfg.seed ^ 0x5EED_D1C7);
        let dict = random_rows(&mut rng, cfg.n_features, cfg.d, 1.0);
        Self { cfg, dict }
    }

    /// `n` tokens `[n, d]`, deterministic in `seed` (parallel over blocks of 256 tokens,
    /// each with its own stream).
    pub fn sample(&self, n: usize, seed: u64) -> Vec<f32> {
        let d = self.cfg.d;
        let p = (self.cfg.mean_active / self.cfg.n_features as f32).clamp(0.0, 1.0) as f64;
        let mut out = vec![0.0f32; n * d];
        out.par_chunks_mut(256 * d)
            .enumerate()
            .for_each(|(blk, chunk)| {
                let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9).wrapping_add(blk as u64));
                for row in chunk.chunks_mut(d) {
                    self.sample_row(&mut rng, p, row);
                }
            });
        out
    }

    fn sample_row(&self, rng: &mut Rng, p: f64, row: &mut [f32]) {
        let d = self.cfg.d;
        // Geometric skipping: jump straight to the next active feature.
        let mut j = 0usize;
        let lnq = (1.0 - p).ln();
        loop {
            if p <= 0.0 {
                break;
            }
            let skip = if p >= 1.0 {
                0
            } else {
                (rng.uniform().max(1e-300).ln() / lnq).floor() as usize
            };
            j += skip;
            if j >= self.cfg.n_features {
                break;
            }
            let mut c = (-rng.uniform().max(1e-300).ln() + 0.5) as f32;
            if self.cfg.bipolar && rng.uniform() < 0.5 {
                c = -c;
            }
            crate::sae::common::axpy(c, &self.dict[j * d..(j + 1) * d], row);
            j += 1;
        }
        if self.cfg.noise > 0.0 {
            for v in row.iter_mut() {
                *v += self.cfg.noise * rng.normal() as f32;
            }
        }
    }
}

/// Mean max cosine similarity: for each true feature (row of `truth: [F_true, d]`), the best
/// `|cos|` with any row of `learned: [F, d]`, averaged over true features.
pub fn mmcs(truth: &[f32], learned: &[f32], d: usize) -> f64 {
    let norms: Vec<f32> = learned
        .chunks(d)
        .map(|r| dot(r, r).sqrt().max(1e-12))
        .collect();
    let best: Vec<f64> = truth
        .par_chunks(d)
        .map(|t| {
            let tn = dot(t, t).sqrt().max(1e-12);
            learned
                .chunks(d)
                .zip(&norms)
                .map(|(l, n)| (dot(t, l) / (tn * n)).abs() as f64)
                .fold(0.0, f64::max)
        })
        .collect();
    best.iter().sum::<f64>() / best.len().max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparsity_and_determinism() {
        let s = SyntheticData::new(SyntheticConfig {
            noise: 0.0,
            ..Default::default()
        });
        let a = s.sample(2000, 3);
        assert_eq!(a, s.sample(2000, 3));
        assert_ne!(a, s.sample(2000, 4));
        // E‖x‖² = mean_active · E[c²] = 3 · (2 + 1 + 0.25) ≈ 9.75 (unit, nearly orthogonal rows)
        let ms: f64 = a.chunks(32).map(|r| dot(r, r) as f64).sum::<f64>() / 2000.0;
        assert!(ms > 6.0 && ms < 14.0, "{ms}");
        assert!((mmcs(&s.dict, &s.dict, 32) - 1.0).abs() < 1e-5);
    }
}
