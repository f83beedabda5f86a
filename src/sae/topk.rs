//! TopK SAE with the AuxK dead-latent loss (Gao et al. 2024), sae_variants.md §3.1–3.4.
//!
//! ```text
//! π = W_enc (x − b_dec) + b_enc
//! S = indices of the k largest π;  z_i = ReLU(π_i) for i ∈ S, else 0    (L0 ≤ k)
//! x̂ = Σ_{i∈S} z_i d_i + b_dec
//! L = (1/B) Σ_b ‖x_b − x̂_b‖²  +  α · ‖e − ê‖² / ‖e − ē‖²
//!     e = sg(x − x̂),  ê = Σ_{i ∈ top-k_aux of π over dead latents} ReLU(π_i) d_i   (no b_dec)
//! ```
//! Unit-norm decoder rows (§1.3 A). Exact gradients (no STE).
//!
//! Decision: SumD-MeanB main loss (not OpenAI's FVU) so λ-free variants and L1 variants share
//! one convention; AuxK in OpenAI's form (§3.3 default): no bias, normalised by the batch
//! variance of `e`, α = 1/32, k_aux = min(d_in/2, #dead).
//! Decision: ReLU after selection (released OpenAI code and SAELens 6.x agree).

use serde::{Deserialize, Serialize};

use super::export::{Folded, Format};
use super::registry::divide_k;
use super::tensor::{self, TensorForward, TensorInput};
use super::topk_family::{self, dead_list, push_aux, TopKParams};
use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Param, Sae, SaeError, StepInput, StepOutput,
    Variant,
};
use crate::kernels::{self as c, Workspace};
use candle_core::Tensor;
use crate::util::rng::Rng;

/// Variant name.
pub const ARCH: &str = "topk";

/// TopK hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Active latents per token (L0 ≤ k). Default 32.
    pub k: usize,
    /// AuxK latents per token; `None` = d_in/2 (dictionary_learning, EleutherAI). Default None.
    pub aux_k: Option<usize>,
    /// AuxK loss coefficient α. Default 1/32 (0 disables AuxK).
    pub aux_coefficient: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            k: 32,
            aux_k: None,
            aux_coefficient: 1.0 / 32.0,
        }
    }
}

/// The registration (see [`super::registry`]).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || {
        Config {
            k: 4,
            ..Config::default()
        }
        .into()
    },
    formats: &[Format {
        architecture: "topk",
        per_latent: &["b_enc"],
        read_cfg,
        encode: encode_loaded,
        tensor_encode: tensor_encode_loaded,
    }],
};

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        Ok(Box::new(TopK::new(self.clone(), d, f, rng)?))
    }
    fn with_sparsity(&self, factor: f32) -> ArchConfig {
        Config {
            k: divide_k(self.k, factor),
            ..self.clone()
        }
        .into()
    }
    fn sparsity_param(&self) -> (&'static str, f64) {
        ("k", self.k as f64)
    }
    fn recommended_adam(&self, d_sae: usize, steps: u64) -> (f32, f32, f32) {
        recommended_adam(d_sae, steps)
    }
    fn problems(&self, d_sae: Option<usize>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        crate::sae::registry::check_k(&mut out, "k", self.k, d_sae);
        crate::sae::registry::check_nonneg(&mut out, "aux_coefficient", self.aux_coefficient);
        out
    }
    fn supports_pam_sgd(&self) -> bool {
        true
    }
    fn supports_tensor(&self) -> bool {
        true
    }
}

/// Adam `(lr, beta1, beta2)` of the TopK family: `2e-4 / sqrt(d_sae / 16384)` for long runs
/// (§9), [`SHORT_BUDGET_LR`] at the default sweep's budget, [`budget_lr`] between.
///
/// [`budget_lr`]: crate::sae::registry::budget_lr
pub(crate) fn recommended_adam(d_sae: usize, steps: u64) -> (f32, f32, f32) {
    let long = 2e-4 / ((d_sae as f32) / 16384.0).sqrt();
    (crate::sae::registry::budget_lr(long, SHORT_BUDGET_LR, steps), 0.9, 0.999)
}

/// Adam's lr for the TopK family at 128 steps. Decision: measured (issue 16; SmolLM2-135M
/// mlp_out, batch 512, seed 0): at 4× width k 32, lr 1e-3 / 2e-3 / 4e-3 gave R² 0.584 /
/// 0.620 / 0.639 with 0 / 0 / 2.9% dead; 2e-3 is the best with no dead latents. Unlike the
/// long-budget rule it does not fall with width: at 8×, 2.8e-3 beat 1.4e-3 (0.631 vs 0.609).
pub(crate) const SHORT_BUDGET_LR: f32 = 2e-3;

/// `cfg.json` of the `topk` format: an integer `k` in `1..=d_sae`.
fn read_cfg(
    cfg: &serde_json::Value,
    f: usize,
) -> Result<Vec<(String, serde_json::Value)>, String> {
    if !cfg["k"].as_u64().is_some_and(|k| k >= 1 && k as usize <= f) {
        return Err("topk needs an integer `k` in 1..=d_sae".into());
    }
    Ok(Vec::new())
}

/// SAELens `topk` encode: top-k of `ReLU(x W_enc + b_enc)`.
fn encode_loaded(t: &Folded, n: usize, ws: &mut Workspace) {
    let k = t.k.unwrap_or(1);
    c::encode_collect(
        ws,
        n,
        t.d_in,
        &t.w_enc,
        t.d_sae,
        Some(t.per("b_enc")),
        |_, row, buf| {
            c::topk_positive(row, k, &mut buf.scratch, &mut buf.main);
        },
    );
}

/// [`encode_loaded`] on tensors ([`crate::sae::export_tensor`]).
fn tensor_encode_loaded(
    s: &crate::sae::export_tensor::DeviceSae,
    xt: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let pre = s.pre(xt, Some("b_enc"))?;
    let sel = crate::sae::tensor::topk_mask(&pre, s.k())?;
    pre.relu()? * sel
}


/// The TopK SAE.
pub struct TopK {
    cfg: Config,
    d: usize,
    f: usize,
    params: TopKParams,
}

impl TopK {
    /// Initialise (§3.4): random unit decoder rows, `W_enc = W_decᵀ`, zero biases.
    pub fn new(cfg: Config, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        if cfg.k == 0 || cfg.k > f {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!("k = {} must be between 1 and d_sae = {f}", cfg.k),
            });
        }
        if cfg.aux_coefficient.is_nan() || cfg.aux_coefficient < 0.0 {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!("aux_coefficient = {} must be >= 0", cfg.aux_coefficient),
            });
        }
        Ok(Self {
            params: TopKParams::new(d, f, rng),
            cfg,
            d,
            f,
        })
    }
}

impl TopK {
    /// Encoder rows `[d_sae, d_in]`.
    pub fn w_enc(&self) -> &[f32] {
        self.params.w_enc()
    }
    /// Decoder rows `[d_sae, d_in]`.
    pub fn w_dec(&self) -> &[f32] {
        self.params.w_dec()
    }
    /// Decoder bias, mutable (the JSAE pair sets it to the data mean).
    pub fn b_dec_mut(&mut self) -> &mut [f32] {
        self.params.b_dec_mut()
    }
    /// The `W_enc` gradient in a gradient list laid out like [`Sae::params`].
    pub fn grad_w_enc(grads: &mut [Vec<f32>]) -> &mut Vec<f32> {
        TopKParams::grad_w_enc(grads)
    }
    /// The `W_dec` gradient in a gradient list laid out like [`Sae::params`].
    pub fn grad_w_dec(grads: &mut [Vec<f32>]) -> &mut Vec<f32> {
        TopKParams::grad_w_dec(grads)
    }
}

impl Sae for TopK {
    fn arch(&self) -> &'static str {
        ARCH
    }
    fn config(&self) -> ArchConfig {
        self.cfg.clone().into()
    }
    fn dims(&self) -> (usize, usize) {
        (self.d, self.f)
    }
    fn params(&self) -> &[Param] {
        self.params.all()
    }
    fn params_mut(&mut self) -> &mut [Param] {
        self.params.all_mut()
    }

    fn encode(&self, x: &[f32], n: usize, ws: &mut Workspace) -> Result<(), SaeError> {
        check_width(ARCH, self.d, x, n)?;
        let p = &self.params;
        let k = self.cfg.k;
        c::prepare_input(x, self.d, Some(p.b_dec()), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            self.d,
            p.w_enc(),
            self.f,
            Some(p.b_enc()),
            |_, row, buf| {
                c::topk_positive(row, k, &mut buf.scratch, &mut buf.main);
            },
        );
        Ok(())
    }

    fn forward_backward(
        &mut self,
        input: &StepInput,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, SaeError> {
        let (d, f, n) = (self.d, self.f, input.n);
        check_width(ARCH, d, input.x, n)?;
        let p = &self.params;
        let (k, alpha) = (self.cfg.k, self.cfg.aux_coefficient);
        let mut dead = std::mem::take(&mut ws.dead);
        dead_list(input.dead, f, self.cfg.aux_k, alpha, &mut dead);
        let k_aux = self.cfg.aux_k.unwrap_or(d / 2).max(1).min(dead.len());
        // 1. x̃ = x − b_dec; π = W_enc x̃ + b_enc chunk by chunk; top-k and AuxK selection
        c::prepare_input(input.x, d, Some(p.b_dec()), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            d,
            p.w_enc(),
            f,
            Some(p.b_enc()),
            |_, row, buf| {
                c::topk_positive(row, k, &mut buf.scratch, &mut buf.main);
                push_aux(row, &dead, k_aux, buf);
            },
        );
        // 2. decode, losses and gradients
        ws.dead = dead;
        let (mse, auxk) = p.backward((d, f), (input.x, n), alpha, grads, ws);
        Ok(StepOutput {
            loss: mse + auxk,
            losses: vec![("mse", mse), ("auxk", auxk)],
            metrics: vec![],
        })
    }

    /// Top-k per row by bisection ([`tensor::topk_mask`]), then the family's steps.
    fn tensor_forward(
        &self,
        params: &[Tensor],
        input: &TensorInput,
    ) -> Result<TensorForward, SaeError> {
        let k = self.cfg.k;
        topk_family::tensor_forward(
            params,
            input,
            |pre| tensor::topk_mask(pre, k),
            false,
            (self.cfg.aux_k, self.cfg.aux_coefficient),
        )
        .map_err(|e| SaeError::tensor(ARCH, e))
    }

    /// PAM-SGD: see [`TopKParams::install_decoder`].
    fn install_decoder(&mut self, w_dec: &[f32], b_dec: &[f32]) -> Result<(), SaeError> {
        self.params.install_decoder(w_dec, b_dec, self.d);
        Ok(())
    }

    fn export_parts(&self) -> ExportParts {
        let mut e = self.params.export("topk");
        e.extra_cfg = vec![
            ("k", serde_json::json!(self.cfg.k)),
            ("rescale_acts_by_decoder_norm", serde_json::json!(false)),
        ];
        e
    }
}
