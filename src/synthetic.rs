//! Synthetic activations with a known sparse ground truth, for tests and benchmarks
//! (sae_variants.md §6.8 describes the same construction).
//!
//! ```text
//! D ∈ R^{F_true × d}, unit rows (random directions)
//! x = Σ_{j active} c_j D_j + σ·ε,   each feature active with probability p = mean_active/F_true,
//! |c_j| ~ Exp(1) + 0.5,  sign +1 (or ±1 with equal probability when `bipolar`)
//! ```
//! The first `n_bipolar` features are bipolar (a direction used with both signs, "pressure
//! too high / too low"); the rest fire with a positive coefficient only. `cfg.bipolar` makes
//! all of them bipolar; [`SyntheticData::with_bipolar_share`] sets a share.
//! [`mmcs`] scores a learned decoder against `D`: the mean over true features of the best
//! absolute cosine similarity with any decoder row.
//!
//! Pipelines use it through a `[synthetic]` section ([`SyntheticSection`]): the train and
//! evaluate stages read [`SyntheticSource`] instead of captured activations, the training
//! rows and the held-out rows from different seed streams.
//! Decision: rows are generated on demand from a per-row seed, so a source of any length
//! costs no memory and seeks in O(1).

use rayon::prelude::*;

use crate::kernels::{dot, random_rows};
use crate::store::{ActivationSource, DataError};
use crate::util::rng::Rng;

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
    /// Features `0..n_bipolar` fire with either sign.
    pub n_bipolar: usize,
}

impl SyntheticData {
    /// Draw the dictionary from `cfg.seed`.
    pub fn new(cfg: SyntheticConfig) -> Self {
        let mut rng = Rng::new(cfg.seed ^ 0x5EED_D1C7);
        let dict = random_rows(&mut rng, cfg.n_features, cfg.d, 1.0);
        let n_bipolar = if cfg.bipolar { cfg.n_features } else { 0 };
        Self {
            cfg,
            dict,
            n_bipolar,
        }
    }

    /// Make a share `share ∈ [0, 1]` of the features bipolar (rounded to whole features).
    pub fn with_bipolar_share(mut self, share: f32) -> Self {
        let f = self.cfg.n_features;
        self.n_bipolar = ((share.clamp(0.0, 1.0) as f64 * f as f64).round() as usize).min(f);
        self
    }

    /// Rows `start..start + n` of the stream `seed`, appended to `out`. Row `r` depends only
    /// on `(seed, r)`, so any slice of the stream can be generated on its own.
    pub fn rows(&self, start: u64, n: usize, seed: u64, out: &mut Vec<f32>) {
        let d = self.cfg.d;
        let p = (self.cfg.mean_active / self.cfg.n_features as f32).clamp(0.0, 1.0) as f64;
        let at = out.len();
        out.resize(at + n * d, 0.0);
        out[at..]
            .par_chunks_mut(d)
            .enumerate()
            .for_each(|(r, row)| {
                let key = (start + r as u64).wrapping_mul(0xD134_2543_DE82_EF95);
                let mut rng = Rng::new(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ key);
                self.sample_row(&mut rng, p, row);
            });
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
            if j < self.n_bipolar && rng.uniform() < 0.5 {
                c = -c;
            }
            crate::kernels::axpy(c, &self.dict[j * d..(j + 1) * d], row);
            j += 1;
        }
        if self.cfg.noise > 0.0 {
            for v in row.iter_mut() {
                *v += self.cfg.noise * rng.normal() as f32;
            }
        }
    }
}

/// The `[synthetic]` section of a pipeline file: a known dictionary instead of a model.
/// Budgets come from `data.n_tokens` (training rows) and `data.eval_tokens` (held-out rows).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SyntheticSection {
    /// Activation width d. Required.
    pub d: usize,
    /// Number of true unit directions. Required.
    pub n_features: usize,
    /// Expected active features per token. Required.
    pub mean_active: f32,
    /// Standard deviation of the Gaussian noise per coordinate. Default 0.02.
    #[serde(default = "default_noise")]
    pub noise: f32,
    /// Share of features that fire with either sign, in [0, 1]. Default 0.
    #[serde(default)]
    pub bipolar_share: f32,
    /// Seed of the dictionary and of both row streams. Default 0.
    #[serde(default)]
    pub seed: u64,
}

fn default_noise() -> f32 {
    0.02
}

impl SyntheticSection {
    /// The generator this section describes.
    pub fn data(&self) -> SyntheticData {
        SyntheticData::new(SyntheticConfig {
            d: self.d,
            n_features: self.n_features,
            mean_active: self.mean_active,
            noise: self.noise,
            bipolar: false,
            seed: self.seed,
        })
        .with_bipolar_share(self.bipolar_share)
    }
    /// Seed of the training row stream.
    pub fn train_seed(&self) -> u64 {
        self.seed ^ 0x7EA1_0000_0000_0001
    }
    /// Seed of the held-out row stream (disjoint from training).
    pub fn eval_seed(&self) -> u64 {
        self.seed ^ 0xE7A1_0000_0000_0002
    }
    /// Problems with the values, as `(key, message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if self.d == 0 {
            p.push(("synthetic.d", "must be > 0".to_string()));
        }
        if self.n_features == 0 {
            p.push(("synthetic.n_features", "must be > 0".to_string()));
        }
        if !(self.mean_active > 0.0 && self.mean_active <= self.n_features as f32) {
            p.push((
                "synthetic.mean_active",
                format!("{} must be in (0, n_features]", self.mean_active),
            ));
        }
        if !(self.noise >= 0.0 && self.noise.is_finite()) {
            p.push(("synthetic.noise", format!("{} must be >= 0", self.noise)));
        }
        if !(0.0..=1.0).contains(&self.bipolar_share) {
            p.push((
                "synthetic.bipolar_share",
                format!("{} must be in [0, 1]", self.bipolar_share),
            ));
        }
        p
    }
}

/// A finite stream of synthetic rows as an [`ActivationSource`].
#[derive(Debug, Clone)]
pub struct SyntheticSource {
    data: SyntheticData,
    seed: u64,
    len: u64,
    pos: u64,
}

impl SyntheticSource {
    /// `len` rows of the stream `seed` of `data`.
    pub fn new(data: SyntheticData, seed: u64, len: u64) -> Self {
        Self {
            data,
            seed,
            len,
            pos: 0,
        }
    }
}

impl ActivationSource for SyntheticSource {
    fn d_in(&self) -> usize {
        self.data.cfg.d
    }
    fn len_rows(&self) -> Option<u64> {
        Some(self.len)
    }
    fn next_batch(&mut self, rows: usize, out: &mut Vec<f32>) -> Result<usize, DataError> {
        let take = (rows as u64).min(self.len - self.pos) as usize;
        self.data.rows(self.pos, take, self.seed, out);
        self.pos += take as u64;
        Ok(take)
    }
    fn position(&self) -> u64 {
        self.pos
    }
    fn seek(&mut self, pos: u64) -> Result<(), DataError> {
        if pos > self.len {
            return Err(DataError::Seek { pos, len: self.len });
        }
        self.pos = pos;
        Ok(())
    }
}

impl SyntheticData {
    /// Polarity-aware recovery (sae_variants.md §6.8): every true feature `j` with every
    /// sign `σ` it is used with (both for bipolar features, `+` otherwise) is matched to the
    /// best `cos(σ D_j, s d_i)` over latents `i` and the signs `s` that latent fires with
    /// (`pos[i]`, `neg[i]`, e.g. from held-out codes); the mean over the `(j, σ)` pairs.
    /// A one-sided SAE needs two latents (`d` and `−d`) to cover a bipolar feature here.
    pub fn mmcs_signed(&self, learned: &[f32], pos: &[bool], neg: &[bool]) -> f64 {
        let d = self.cfg.d;
        let norms: Vec<f32> = learned
            .chunks(d)
            .map(|r| dot(r, r).sqrt().max(1e-12))
            .collect();
        let scores: Vec<f64> = self
            .dict
            .par_chunks(d)
            .enumerate()
            .flat_map_iter(|(j, t)| {
                let signs: &[f32] = if j < self.n_bipolar {
                    &[1.0, -1.0]
                } else {
                    &[1.0]
                };
                let norms = &norms;
                signs.iter().map(move |&sg| {
                    learned
                        .chunks(d)
                        .zip(norms)
                        .enumerate()
                        .map(|(i, (l, n))| {
                            let c = sg * dot(t, l) / n;
                            let p = if pos[i] { c } else { -1.0 };
                            let q = if neg[i] { -c } else { -1.0 };
                            p.max(q).max(0.0) as f64
                        })
                        .fold(0.0, f64::max)
                })
            })
            .collect();
        scores.iter().sum::<f64>() / scores.len().max(1) as f64
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

    #[test]
    fn bipolar_share_and_seekable_rows() {
        let s = SyntheticData::new(SyntheticConfig {
            d: 64,
            n_features: 8,
            mean_active: 8.0,
            noise: 0.0,
            bipolar: false,
            seed: 1,
        })
        .with_bipolar_share(0.5);
        assert_eq!(s.n_bipolar, 4);
        // every feature active (p = 1): the sign of the projection on each direction
        let mut x = Vec::new();
        s.rows(0, 4000, 9, &mut x);
        for j in 0..8 {
            let dj = &s.dict[j * 64..(j + 1) * 64];
            let neg = x.chunks(64).filter(|r| dot(r, dj) < 0.0).count();
            if j < 4 {
                assert!(neg > 1400, "feature {j} bipolar: {neg} of 4000 negative");
            } else {
                assert!(
                    neg < 600,
                    "feature {j} positive only: {neg} of 4000 negative"
                );
            }
        }
        // a slice of the stream equals the same rows generated from the start
        let mut src = SyntheticSource::new(s.clone(), 9, 4000);
        src.seek(1000).unwrap();
        let mut part = Vec::new();
        assert_eq!(src.next_batch(10, &mut part).unwrap(), 10);
        assert_eq!(part, x[1000 * 64..1010 * 64].to_vec());
        src.seek(3995).unwrap();
        assert_eq!(src.next_batch(10, &mut part).unwrap(), 5);
        assert_eq!(src.next_batch(10, &mut part).unwrap(), 0);
    }

    #[test]
    fn polarity_aware_recovery_needs_both_signs() {
        let s = SyntheticData::new(SyntheticConfig {
            d: 64,
            n_features: 4,
            ..Default::default()
        })
        .with_bipolar_share(0.5);
        let t = [true; 4];
        let f = [false; 4];
        // the true dictionary firing both ways covers every (feature, sign) pair
        assert!((s.mmcs_signed(&s.dict, &t, &t) - 1.0).abs() < 1e-6);
        // positive-only latents miss the negative uses of the 2 bipolar features
        let one_sided = s.mmcs_signed(&s.dict, &t, &f);
        assert!(one_sided < 0.8 && one_sided > 0.5, "{one_sided}");
        // adding the flipped directions as positive latents covers them again
        let mut both = s.dict.clone();
        both.extend(s.dict.iter().map(|v| -v));
        assert!((s.mmcs_signed(&both, &[true; 8], &[false; 8]) - 1.0).abs() < 1e-6);
    }
}
