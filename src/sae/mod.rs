//! Sparse-autoencoder variants behind one trait (STYLE.md §2.3; sae_variants.md §2–6).
//!
//! Every variant is one file with its `Config`, its struct and `impl Sae`. The trainer,
//! metrics and I/O only see [`Sae`], [`Param`] and [`crate::kernels::Codes`]. Adding a variant
//! means one file plus one `mod` line, one [`ArchConfig`] arm, one `build` arm and one
//! `examples` entry.
//!
//! Decision: plain `f32` buffers and hand-written backward passes instead of candle
//! autograd (sae_variants.md §8 "Autograd"): generic autograd would materialise dense
//! `B × d_sae` gradients, and the sparse kernels in [`common`] are what makes CPU training fast.
//! Decision: the trait is written so that a signed, gated variant (SA-GSAE, §6) fits: codes
//! carry signed values (`≠ 0` means active), parameters are a named list with per-latent
//! vectors, and [`ExportParts`] lists per-latent tensors with how they fold.

pub mod batchtopk;
pub mod export;
pub mod gated;
pub mod jumprelu;
pub mod kmeans;
pub mod relu_l1;
pub mod sa_gsae;
pub mod topk;

use serde::{Deserialize, Serialize};

pub use crate::kernels::{Codes, Workspace};

/// Errors from building or running an SAE.
#[derive(Debug, thiserror::Error)]
pub enum SaeError {
    /// The configuration cannot work.
    #[error("invalid {arch} SAE config: {msg}")]
    Config {
        /// Variant name.
        arch: &'static str,
        /// What is wrong and how to fix it.
        msg: String,
    },
    /// Input of the wrong width.
    #[error("{arch} SAE expects d_in = {expected} but the input has {found} values per token; use an SAE built for this hookpoint")]
    Shape {
        /// Variant name.
        arch: &'static str,
        /// SAE width.
        expected: usize,
        /// Width found.
        found: usize,
    },
}

/// One named parameter (or non-trainable state) of an SAE.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    /// Name; weights use SAELens names where one exists (`W_enc`, `b_dec`, …).
    pub name: &'static str,
    /// Shape (row-major). Matrices are `[d_sae, d_in]`.
    pub shape: Vec<usize>,
    /// Values.
    pub data: Vec<f32>,
    /// Updated by the optimiser (false for running statistics such as BatchTopK's threshold).
    pub trainable: bool,
    /// Rows are kept at unit norm (§1.3 A): the trainer projects their gradient before the
    /// step and renormalises after it.
    pub unit_rows: bool,
}

impl Param {
    /// A trainable parameter.
    pub fn new(name: &'static str, shape: Vec<usize>, data: Vec<f32>) -> Self {
        Self {
            name,
            shape,
            data,
            trainable: true,
            unit_rows: false,
        }
    }
}

/// Find a parameter by name.
pub fn param<'a>(params: &'a [Param], name: &str) -> Option<&'a Param> {
    params.iter().find(|p| p.name == name)
}

/// What the trainer hands to [`Sae::forward_backward`].
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// Scaled activations, `[n, d_in]` row-major.
    pub x: &'a [f32],
    /// Tokens in the batch.
    pub n: usize,
    /// Optimiser step (0-based).
    pub step: u64,
    /// Sparsity-coefficient warmup factor in `[0, 1]` (multiplies λ).
    pub sparsity_scale: f32,
    /// `dead[i]`: latent `i` has not fired for more than the dead window (AuxK input).
    pub dead: &'a [bool],
}

/// Loss terms of one training step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepOutput {
    /// Total loss that was differentiated.
    pub loss: f64,
    /// Named terms (each already weighted), e.g. `("mse", …)`, `("l1", …)`, `("auxk", …)`.
    pub terms: Vec<(&'static str, f64)>,
}

/// How a per-latent export tensor transforms when decoder norms are folded into the
/// encoder (§1.3 B): scaled by `‖d_i‖` (biases, thresholds in pre-activation space) or kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Multiply by the decoder row norm.
    ByDecoderNorm,
    /// Unchanged (e.g. Gated `r_mag`).
    Keep,
}

/// Raw export tensors before scaling and norm folding (see [`export`]).
#[derive(Debug, Clone)]
pub struct ExportParts {
    /// SAELens `architecture` string (`standard`, `topk`, `jumprelu`, `gated`).
    pub architecture: &'static str,
    /// Encoder rows `[d_sae, d_in]` (exported transposed as `W_enc [d_in, d_sae]`).
    pub w_enc: Vec<f32>,
    /// Decoder rows `[d_sae, d_in]`.
    pub w_dec: Vec<f32>,
    /// Decoder bias `[d_in]`.
    pub b_dec: Vec<f32>,
    /// Per-latent tensors (`b_enc`, `threshold`, `b_gate`, `b_mag`, `r_mag`).
    pub per_latent: Vec<(&'static str, Vec<f32>, Fold)>,
    /// SAELens `apply_b_dec_to_input`.
    pub apply_b_dec_to_input: bool,
    /// Extra `cfg.json` keys (e.g. `k` for topk).
    pub extra_cfg: Vec<(&'static str, serde_json::Value)>,
}

/// A sparse autoencoder: parameters plus forward/backward on plain buffers.
pub trait Sae: Send + Sync {
    /// Our variant name (`relu_l1`, `topk`, …), as in [`ArchConfig`]'s `kind`.
    fn arch(&self) -> &'static str;
    /// The configuration it was built from.
    fn config(&self) -> ArchConfig;
    /// `(d_in, d_sae)`.
    fn dims(&self) -> (usize, usize);
    /// Parameters and state, in a fixed order.
    fn params(&self) -> &[Param];
    /// Mutable parameters (optimiser, checkpoint restore).
    fn params_mut(&mut self) -> &mut [Param];
    /// Inference encode of `x: [n, d_in]` into `ws.codes` (BatchTopK uses its threshold).
    fn encode(&self, x: &[f32], n: usize, ws: &mut Workspace) -> Result<(), SaeError>;
    /// One training forward and backward pass. Writes the gradient of every parameter
    /// into `grads` (same order and sizes as [`Sae::params`]; the caller zeroes them), the
    /// training codes into `ws.codes` and the reconstruction into `ws.recon`.
    /// May update non-trainable state (BatchTopK's threshold).
    fn forward_backward(
        &mut self,
        input: &StepInput,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, SaeError>;
    /// Export tensors before folding.
    fn export_parts(&self) -> ExportParts;

    /// Data-dependent initialisation, called once by the trainer before step 0 with the
    /// scaled init sample `x: [n, d_in]`, after `b_dec` is set. Default: nothing.
    fn init_from_sample(&mut self, x: &[f32], n: usize) -> Result<(), SaeError> {
        let _ = (x, n);
        Ok(())
    }

    /// PAM-SGD (`jsae_pamsgd.md` §2.2): install the closed-form decoder `w_dec [d_sae, d_in]`,
    /// `b_dec [d_in]` solved for the current codes, keeping the variant's own constraints.
    /// Variants that cannot be trained by PAM-SGD keep this default, which refuses.
    fn install_decoder(&mut self, w_dec: &[f32], b_dec: &[f32]) -> Result<(), SaeError> {
        let _ = (w_dec, b_dec);
        Err(SaeError::Config {
            arch: self.arch(),
            msg: format!(
                "PAM-SGD (train.optimizer.kind = \"pam_sgd\") supports sae.arch kinds {}",
                ArchConfig::PAM_SGD_KINDS.join(", ")
            ),
        })
    }

    /// Called by the trainer after every step with the number of steps done and the dead
    /// mask (`tokens_since_fired > dead_after_tokens`): a variant may reset parameters of
    /// dead latents (SA-GSAE threshold resets, sae_variants.md §6.5). Returns the
    /// `(parameter index, element index)` pairs it reset; the trainer zeroes their Adam
    /// moments. Default: nothing.
    fn revive_dead(&mut self, _steps_done: u64, _dead: &[bool]) -> Vec<(usize, usize)> {
        Vec::new()
    }

    /// Decode codes into `out: [n, d_in]` (`x̂ = Σ f_i d_i + b_dec`, sparse).
    fn decode(&self, codes: &Codes, out: &mut Vec<f32>, ws: &mut Workspace) {
        let (d, f) = self.dims();
        let p = self.params();
        let w = &param(p, "W_dec")
            .expect("invariant: every variant has W_dec")
            .data;
        let b = &param(p, "b_dec")
            .expect("invariant: every variant has b_dec")
            .data;
        crate::kernels::decode(&mut ws.scratch, codes, w, d, f, Some(b), out);
    }

    /// Check invariants that must hold after every update: finite values and unit-norm
    /// rows where required. Returns a description of the first violation.
    fn check_invariants(&self) -> Result<(), String> {
        let d = self.dims().0;
        for p in self.params() {
            if let Some(i) = p.data.iter().position(|v| !v.is_finite()) {
                return Err(format!("{}[{i}] = {}", p.name, p.data[i]));
            }
            if p.unit_rows {
                for (r, row) in p.data.chunks(d).enumerate() {
                    let n = crate::kernels::dot(row, row).sqrt();
                    if (n - 1.0).abs() > 1e-4 {
                        return Err(format!("{} row {r} has norm {n}", p.name));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Check that the input width matches.
pub(crate) fn check_width(
    arch: &'static str,
    d_in: usize,
    x: &[f32],
    n: usize,
) -> Result<(), SaeError> {
    if n == 0 || x.len() != n * d_in {
        return Err(SaeError::Shape {
            arch,
            expected: d_in,
            found: x.len().checked_div(n).unwrap_or(0),
        });
    }
    Ok(())
}

/// The SAE architecture and its hyperparameters: the `[sae] arch = { kind = "topk", k = 32 }`
/// table of a pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ArchConfig {
    /// ReLU + norm-weighted L1 (Anthropic April-2024 update), §2.2.
    ReluL1(relu_l1::Config),
    /// TopK with AuxK (Gao et al. 2024), §3.1–3.4.
    #[serde(rename = "topk")]
    TopK(topk::Config),
    /// BatchTopK (Bussmann et al. 2024), §3.5.
    #[serde(rename = "batchtopk")]
    BatchTopK(batchtopk::Config),
    /// JumpReLU with rectangle-kernel STE (Rajamanoharan et al. 2024), §5.
    #[serde(rename = "jumprelu")]
    JumpRelu(jumprelu::Config),
    /// Gated SAE with `r_mag` sharing (Rajamanoharan et al. 2024), §4.
    Gated(gated::Config),
    /// k-means autoencoder (a Top-1 SAE with code 1), the SplInterp baseline
    /// (`jsae_pamsgd.md` §2.4). `d_sae` = number of clusters; L0 = 1.
    #[serde(rename = "kmeans")]
    KMeans(kmeans::Config),
    /// k-means + local-PCA autoencoder (rank-r affine map per Voronoi cell), §2.4.
    #[serde(rename = "kmeans_pca")]
    KMeansPca(kmeans::PcaConfig),
    /// Sign-Aware Gated SAE with Bi-Jump-ReLU (arXiv 2605.28149), §6.
    SaGsae(sa_gsae::Config),
}

impl ArchConfig {
    /// The variants PAM-SGD can train (they implement [`Sae::install_decoder`]).
    pub const PAM_SGD_KINDS: [&'static str; 2] = [topk::ARCH, relu_l1::ARCH];

    /// Whether `train.optimizer.kind = "pam_sgd"` can train this variant.
    pub fn supports_pam_sgd(&self) -> bool {
        Self::PAM_SGD_KINDS.contains(&self.kind())
    }

    /// Variant name (the serde `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            ArchConfig::ReluL1(_) => relu_l1::ARCH,
            ArchConfig::TopK(_) => topk::ARCH,
            ArchConfig::BatchTopK(_) => batchtopk::ARCH,
            ArchConfig::JumpRelu(_) => jumprelu::ARCH,
            ArchConfig::Gated(_) => gated::ARCH,
            ArchConfig::KMeans(_) => kmeans::ARCH,
            ArchConfig::KMeansPca(_) => kmeans::ARCH_PCA,
            ArchConfig::SaGsae(_) => sa_gsae::ARCH,
        }
    }

    /// Build an SAE of width `d_sae` on `d_in`-dimensional inputs, initialised from `seed`.
    pub fn build(&self, d_in: usize, d_sae: usize, seed: u64) -> Result<Box<dyn Sae>, SaeError> {
        if d_in == 0 || d_sae == 0 {
            return Err(SaeError::Config {
                arch: self.kind(),
                msg: format!("d_in = {d_in} and d_sae = {d_sae} must both be positive"),
            });
        }
        let mut rng = crate::util::rng::Rng::new(seed);
        Ok(match self {
            ArchConfig::ReluL1(c) => {
                Box::new(relu_l1::ReluL1::new(c.clone(), d_in, d_sae, &mut rng)?)
            }
            ArchConfig::TopK(c) => Box::new(topk::TopK::new(c.clone(), d_in, d_sae, &mut rng)?),
            ArchConfig::BatchTopK(c) => {
                Box::new(batchtopk::BatchTopK::new(c.clone(), d_in, d_sae, &mut rng)?)
            }
            ArchConfig::JumpRelu(c) => {
                Box::new(jumprelu::JumpRelu::new(c.clone(), d_in, d_sae, &mut rng)?)
            }
            ArchConfig::Gated(c) => Box::new(gated::Gated::new(c.clone(), d_in, d_sae, &mut rng)?),
            ArchConfig::KMeans(_) => Box::new(kmeans::KMeans::new(0, d_in, d_sae, &mut rng)?),
            ArchConfig::KMeansPca(c) => {
                if c.rank == 0 {
                    return Err(SaeError::Config {
                        arch: kmeans::ARCH_PCA,
                        msg: "rank must be >= 1 (rank 0 is kind = \"kmeans\")".into(),
                    });
                }
                Box::new(kmeans::KMeans::new(c.rank, d_in, d_sae, &mut rng)?)
            }
            ArchConfig::SaGsae(c) => {
                Box::new(sa_gsae::SaGsae::new(c.clone(), d_in, d_sae, &mut rng)?)
            }
        })
    }

    /// One small default per variant; drives the conformance suite.
    pub fn examples() -> Vec<ArchConfig> {
        vec![
            // λ = 1: the default 5 is tuned for d_in in the thousands (E‖x‖ = √d); at the
            // examples' tiny widths it would switch every latent off.
            ArchConfig::ReluL1(relu_l1::Config {
                l1_coefficient: 1.0,
                ..relu_l1::Config::default()
            }),
            ArchConfig::TopK(topk::Config {
                k: 4,
                ..topk::Config::default()
            }),
            ArchConfig::BatchTopK(batchtopk::Config {
                k: 4,
                ..batchtopk::Config::default()
            }),
            ArchConfig::JumpRelu(jumprelu::Config::default()),
            ArchConfig::Gated(gated::Config::default()),
            ArchConfig::KMeans(kmeans::Config {}),
            ArchConfig::KMeansPca(kmeans::PcaConfig { rank: 2 }),
            ArchConfig::SaGsae(sa_gsae::Config::default()),
        ]
    }

    /// The same config with its sparsity knob turned by `factor` (> 1 = sparser): λ times
    /// `factor` for penalty variants, `k` divided by `factor` (at least 1) for TopK-style ones.
    pub fn with_sparsity(&self, factor: f32) -> ArchConfig {
        let div = |k: usize| ((k as f32 / factor).round() as usize).max(1);
        match self {
            ArchConfig::ReluL1(c) => ArchConfig::ReluL1(relu_l1::Config {
                l1_coefficient: c.l1_coefficient * factor,
                ..c.clone()
            }),
            ArchConfig::TopK(c) => ArchConfig::TopK(topk::Config {
                k: div(c.k),
                ..c.clone()
            }),
            ArchConfig::BatchTopK(c) => ArchConfig::BatchTopK(batchtopk::Config {
                k: div(c.k),
                ..c.clone()
            }),
            ArchConfig::JumpRelu(c) => ArchConfig::JumpRelu(jumprelu::Config {
                l0_coefficient: c.l0_coefficient * factor,
                ..c.clone()
            }),
            ArchConfig::Gated(c) => ArchConfig::Gated(gated::Config {
                l1_coefficient: c.l1_coefficient * factor,
                ..c.clone()
            }),
            // L0 = 1 by construction: no knob.
            ArchConfig::KMeans(c) => ArchConfig::KMeans(c.clone()),
            ArchConfig::KMeansPca(c) => {
                ArchConfig::KMeansPca(kmeans::PcaConfig { rank: div(c.rank) })
            }
            ArchConfig::SaGsae(c) => ArchConfig::SaGsae(sa_gsae::Config {
                l1_coefficient: c.l1_coefficient * factor,
                ..c.clone()
            }),
        }
    }

    /// The variant's sparsity parameter as `(name, value)`: what a sweep varies and the
    /// results tables report (`k` for the TopK family, the penalty coefficient otherwise).
    pub fn sparsity_param(&self) -> (&'static str, f64) {
        match self {
            ArchConfig::ReluL1(c) => ("l1_coefficient", c.l1_coefficient as f64),
            ArchConfig::TopK(c) => ("k", c.k as f64),
            ArchConfig::BatchTopK(c) => ("k", c.k as f64),
            ArchConfig::JumpRelu(c) => ("l0_coefficient", c.l0_coefficient as f64),
            ArchConfig::Gated(c) => ("l1_coefficient", c.l1_coefficient as f64),
            ArchConfig::KMeans(_) => ("rank", 0.0),
            ArchConfig::KMeansPca(c) => ("rank", c.rank as f64),
            ArchConfig::SaGsae(c) => ("l1_coefficient", c.l1_coefficient as f64),
        }
    }

    /// Recommended Adam `(lr, beta1, beta2)` for this variant (§9), used when the training
    /// config leaves them unset.
    pub fn recommended_adam(&self, d_sae: usize) -> (f32, f32, f32) {
        match self {
            ArchConfig::ReluL1(_) => (5e-5, 0.9, 0.999),
            ArchConfig::TopK(_) | ArchConfig::BatchTopK(_) => {
                (2e-4 / ((d_sae as f32) / 16384.0).sqrt(), 0.9, 0.999)
            }
            ArchConfig::JumpRelu(_) => (7e-5, 0.0, 0.999),
            ArchConfig::Gated(_) | ArchConfig::SaGsae(_) => (3e-4, 0.0, 0.999),
            // Only the local-PCA subspaces use Adam (centroids are mini-batch k-means).
            ArchConfig::KMeans(_) | ArchConfig::KMeansPca(_) => (1e-3, 0.9, 0.999),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arch_config_parses_from_toml_and_rejects_unknown_fields() {
        #[derive(Deserialize)]
        struct T {
            arch: ArchConfig,
        }
        let t: T = toml::from_str("arch = { kind = \"topk\", k = 32 }").unwrap();
        assert!(matches!(t.arch, ArchConfig::TopK(ref c) if c.k == 32));
        let bad = toml::from_str::<T>("arch = { kind = \"topk\", kk = 32 }");
        assert!(bad.is_err());
        let t: T = toml::from_str("arch = { kind = \"batchtopk\", k = 8 }").unwrap();
        assert_eq!(t.arch.kind(), "batchtopk");
        for ex in ArchConfig::examples() {
            let s = serde_json::to_string(&ex).unwrap();
            let back: ArchConfig = serde_json::from_str(&s).unwrap();
            assert_eq!(back, ex);
        }
    }
}
