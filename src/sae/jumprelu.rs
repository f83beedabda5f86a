//! JumpReLU SAE (Rajamanoharan et al. 2024, arXiv 2407.14435), sae_variants.md §5.
//!
//! ```text
//! π = W_enc x + b_enc                    (no pre-encoder b_dec subtraction, GDM default)
//! θ = exp(s·u)                            (u = scaled_log_threshold, learnable, per latent;
//!                                          s = threshold_lr_scale, fixed)
//! f = π · H(π − θ)
//! x̂ = Σ_i f_i d_i + b_dec
//! L = (1/B) Σ_b [ ‖x_b − x̂_b‖² + λ_t Σ_i H(π_{b,i} − θ_i) ]
//! ∂L/∂π = G·H(π − θ)   (exact; no L0 gradient reaches the encoder)
//! ∂L/∂θ_i = Σ_b (1/ε) K((π_{b,i} − θ_i)/ε) (−θ_i G_{b,i} − λ_t/B),  K = 1[−½ < u < ½]
//! ∂L/∂u = s θ ∂L/∂θ
//! ```
//! with `G_{b,i} = d_i·2(x̂_b − x_b)/B`, computed for the band latents too (§8). Unit-norm
//! decoder rows (§1.3 A).
//!
//! Decision: log-parameterised θ (SAELens) and λ·L0 (the paper), not dictionary_learning's
//! `(L0/target − 1)²`. Decision: ε = θ_init = 0.05 in `E‖x‖ = √d` units (≈ GDM's 0.001 at
//! unit mean-square scale times √d for d ≈ 2048; SAELens's bandwidth).
//!
//! Decision: measured — the log-threshold moves `s` times faster than the other parameters
//! (θ = exp(s·u): an Adam step of at most `lr` on `u` is one of `s·lr` on log θ). With `s = 1`
//! the thresholds travel at most `lr` per step in log space, so at the default sweep's
//! 128–512 steps θ stays near `init_threshold` and λ has no effect on L0 (measured on
//! SmolLM2 mlp_out at 128 steps, lr 1e-3: L0 549–550 at λ 5, 15 and 50). The grid s × λ
//! at 128 steps, lr 1e-3 (mean of 2 seeds; R² / L0 / dead): s = 10 is still too slow
//! (λ 1/4/16: L0 297/353/404, ordered wrongly), s = 100 overshoots and kills latents
//! (λ 1: 0.600 / 71 / 12%; λ 4: 11 / 29% dead), s = 30 follows λ with no dead latents
//! (λ 1: 0.641 / 77 / 0; λ 4: 0.422 / 26 / 0). GDM's recipe is in the same spirit: it
//! trains θ itself (not log θ) at lr 7e-5 from θ ≈ 1e-3, relative steps of up to ~7%.

use serde::{Deserialize, Serialize};

use super::export::{Folded, Format};
use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Fold, Param, Sae, SaeError, StepInput,
    StepOutput, Variant,
};
use super::tensor::{self, TensorForward, TensorInput};
use crate::kernels::{self as c, Workspace};
use candle_core::{DType, Tensor};
use crate::util::rng::Rng;

/// Variant name.
pub const ARCH: &str = "jumprelu";

/// JumpReLU hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// λ on the expected L0 (SumD-MeanB, `E‖x‖ = √d` inputs). Default 1.0.
    pub l0_coefficient: f32,
    /// STE bandwidth ε of the rectangle kernel. Default 0.05.
    pub bandwidth: f32,
    /// Initial threshold θ for every latent. Default 0.05.
    pub init_threshold: f32,
    /// How many times faster log θ moves than the other parameters (θ = exp(s·u), `u`
    /// trained). Default [`DEFAULT_THRESHOLD_LR_SCALE`].
    pub threshold_lr_scale: f32,
}

/// Default [`Config::threshold_lr_scale`] (measured: issue 16).
pub const DEFAULT_THRESHOLD_LR_SCALE: f32 = 30.0;

impl Default for Config {
    fn default() -> Self {
        Self {
            l0_coefficient: 1.0,
            bandwidth: 0.05,
            init_threshold: 0.05,
            threshold_lr_scale: DEFAULT_THRESHOLD_LR_SCALE,
        }
    }
}

const W_ENC: usize = 0;
const B_ENC: usize = 1;
const W_DEC: usize = 2;
const B_DEC: usize = 3;
const LOG_TH: usize = 4;

/// The registration (see [`super::registry`]).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || Config::default().into(),
    formats: &[Format {
        architecture: "jumprelu",
        per_latent: &["b_enc", "threshold"],
        read_cfg: super::export::no_extra_cfg,
        encode: encode_loaded,
        tensor_encode: tensor_encode_loaded,
    }],
};

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        Ok(Box::new(JumpRelu::new(self.clone(), d, f, rng)?))
    }
    fn with_sparsity(&self, factor: f32) -> ArchConfig {
        Config {
            l0_coefficient: self.l0_coefficient * factor,
            ..self.clone()
        }
        .into()
    }
    fn sparsity_param(&self) -> (&'static str, f64) {
        ("l0_coefficient", self.l0_coefficient as f64)
    }
    /// 7e-5 for long runs (§9); 1e-3 at 128 steps. Decision: measured (issue 16's note).
    fn recommended_adam(&self, _d_sae: usize, steps: u64) -> (f32, f32, f32) {
        (crate::sae::registry::budget_lr(7e-5, 1e-3, steps), 0.0, 0.999)
    }
    fn supports_tensor(&self) -> bool {
        true
    }
    fn problems(&self, _d_sae: Option<usize>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        crate::sae::registry::check_nonneg(&mut out, "l0_coefficient", self.l0_coefficient);
        crate::sae::registry::check_positive(&mut out, "bandwidth", self.bandwidth);
        crate::sae::registry::check_positive(&mut out, "init_threshold", self.init_threshold);
        crate::sae::registry::check_positive(&mut out, "threshold_lr_scale", self.threshold_lr_scale);
        out
    }
}

/// SAELens `jumprelu` encode (also BatchTopK's export): `m·1[m > threshold]`, `m > 0`,
/// `m = x W_enc + b_enc`.
fn encode_loaded(t: &Folded, n: usize, ws: &mut Workspace) {
    let th = t.per("threshold");
    c::encode_collect(
        ws,
        n,
        t.d_in,
        &t.w_enc,
        t.d_sae,
        Some(t.per("b_enc")),
        |_, row, buf| {
            buf.main.extend(
                row.iter()
                    .zip(th)
                    .enumerate()
                    .filter(|(_, (&v, &h))| v > h && v > 0.0)
                    .map(|(i, (&v, _))| (i as u32, v)),
            );
        },
    );
}

/// [`encode_loaded`] on tensors ([`crate::sae::export_tensor`]).
fn tensor_encode_loaded(
    s: &crate::sae::export_tensor::DeviceSae,
    xt: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let pre = s.pre(xt, Some("b_enc"))?;
    let open = crate::sae::export_tensor::mask(pre.broadcast_gt(s.per("threshold")?)?)?;
    pre.relu()? * open
}


/// The JumpReLU SAE.
pub struct JumpRelu {
    cfg: Config,
    d: usize,
    f: usize,
    params: Vec<Param>,
    theta: Vec<f32>,
}

impl JumpRelu {
    /// Initialise (§5.3): unit decoder rows, `W_enc = W_decᵀ`, zero biases, θ = θ_init.
    pub fn new(cfg: Config, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        if !(cfg.bandwidth > 0.0
            && cfg.init_threshold > 0.0
            && cfg.threshold_lr_scale > 0.0
            && cfg.threshold_lr_scale.is_finite()
            && cfg.l0_coefficient >= 0.0)
        {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!(
                    "bandwidth ({}), init_threshold ({}) and threshold_lr_scale ({}) must be > 0 and l0_coefficient ({}) >= 0",
                    cfg.bandwidth, cfg.init_threshold, cfg.threshold_lr_scale, cfg.l0_coefficient
                ),
            });
        }
        let w_dec = c::random_rows(rng, f, d, 1.0);
        let mut dec = Param::new("W_dec", vec![f, d], w_dec.clone());
        dec.unit_rows = true;
        let params = vec![
            Param::new("W_enc", vec![f, d], w_dec),
            Param::new("b_enc", vec![f], vec![0.0; f]),
            dec,
            Param::new("b_dec", vec![d], vec![0.0; d]),
            Param::new(
                "scaled_log_threshold",
                vec![f],
                vec![cfg.init_threshold.ln() / cfg.threshold_lr_scale; f],
            ),
        ];
        Ok(Self {
            cfg,
            d,
            f,
            params,
            theta: Vec::new(),
        })
    }

    fn thetas(&self, out: &mut Vec<f32>) {
        let s = self.cfg.threshold_lr_scale;
        out.clear();
        out.extend(self.params[LOG_TH].data.iter().map(|u| (s * u).exp()));
    }
}

impl Sae for JumpRelu {
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
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    fn encode(&self, x: &[f32], n: usize, ws: &mut Workspace) -> Result<(), SaeError> {
        check_width(ARCH, self.d, x, n)?;
        let p = &self.params;
        let mut theta = std::mem::take(&mut ws.lat2);
        self.thetas(&mut theta);
        c::prepare_input(x, self.d, None, &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            self.d,
            &p[W_ENC].data,
            self.f,
            Some(&p[B_ENC].data),
            |_, row, buf| {
                buf.main.extend(
                    row.iter()
                        .zip(&theta)
                        .enumerate()
                        .filter(|(_, (&v, &t))| v > t)
                        .map(|(i, (&v, _))| (i as u32, v)),
                );
            },
        );
        ws.lat2 = theta;
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
        let lambda = self.cfg.l0_coefficient * input.sparsity_scale;
        let eps = self.cfg.bandwidth;
        let mut theta = std::mem::take(&mut self.theta);
        self.thetas(&mut theta);
        let p = &self.params;
        // 1. π = W_enc x + b_enc; active (π > θ) → codes, band (|π − θ| < ε/2) → aux
        c::prepare_input(input.x, d, None, &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            d,
            &p[W_ENC].data,
            f,
            Some(&p[B_ENC].data),
            |_, row, buf| {
                for (i, (&v, &t)) in row.iter().zip(&theta).enumerate() {
                    if v > t {
                        buf.main.push((i as u32, v));
                    }
                    if (v - t).abs() < 0.5 * eps {
                        buf.aux.push((i as u32, v));
                    }
                }
            },
        );
        // 2. decode, g = 2(x̂ − x)/B, G on active and band entries
        c::decode(
            &mut ws.scratch,
            &ws.codes,
            &p[W_DEC].data,
            d,
            f,
            Some(&p[B_DEC].data),
            &mut ws.recon,
        );
        let sse = c::residual(&ws.recon, input.x, d, 2.0 / n as f32, &mut ws.resid);
        c::dots_and_accumulate(
            &mut ws.scratch,
            &ws.codes,
            &p[W_DEC].data,
            d,
            f,
            &ws.resid,
            &mut ws.gvals,
            &ws.codes.val,
            &mut grads[W_DEC],
        );
        c::entry_dots(
            &mut ws.scratch,
            &ws.aux,
            &p[W_DEC].data,
            d,
            f,
            &ws.resid,
            &mut ws.aux_gvals,
        );
        // 3. encoder and decoder gradients (exact on active entries)
        let (ge, rest) = grads.split_at_mut(B_ENC);
        c::accumulate_rows(
            &mut ws.scratch,
            &ws.codes,
            &ws.gvals,
            &ws.xt,
            d,
            f,
            &mut ge[W_ENC],
        );
        c::scatter_add(&ws.codes, &ws.gvals, &mut rest[0]);
        c::col_sums(&ws.resid, n, d, &mut grads[B_DEC]);
        // 4. threshold STE: ∂L/∂u_i = s θ_i Σ_band (1/ε)(−θ_i G − λ/B)
        let lb = lambda / n as f32;
        let s = self.cfg.threshold_lr_scale;
        let gt = &mut grads[LOG_TH];
        for (&i, &g) in ws.aux.idx.iter().zip(&ws.aux_gvals) {
            let th = theta[i as usize];
            gt[i as usize] += s * th * (-th * g - lb) / eps;
        }
        self.theta = theta;
        let mse = sse / n as f64;
        let l0 = lambda as f64 * ws.codes.nnz() as f64 / n as f64;
        Ok(StepOutput {
            loss: mse + l0,
            losses: vec![("mse", mse), ("l0_penalty", l0)],
            metrics: vec![],
        })
    }

    /// The same loss on tensors, with the rectangle-kernel STE composed from detached
    /// masks: `f = π ⊙ H + (−θ K/ε) ⊙ zero_with_grad(θ)` and
    /// `L0 = Σ H + (−K/ε) ⊙ zero_with_grad(θ)` (values unchanged, `∂/∂θ` as in the header),
    /// `H = 1[π > θ]`, `K = 1[|π − θ| < ε/2]`, `θ = exp(s·u)` so autograd gives
    /// `∂L/∂u = s θ ∂L/∂θ`.
    fn tensor_forward(
        &self,
        params: &[Tensor],
        input: &TensorInput,
    ) -> Result<TensorForward, SaeError> {
        let lambda = (self.cfg.l0_coefficient * input.sparsity_scale) as f64;
        let eps = self.cfg.bandwidth;
        let run = || -> candle_core::Result<TensorForward> {
            let (w_enc, b_enc, w_dec, b_dec, log_th) = (
                &params[W_ENC],
                &params[B_ENC],
                &params[W_DEC],
                &params[B_DEC],
                &params[LOG_TH],
            );
            let (x, n) = (input.x, input.n as f64);
            let f = w_enc.dim(0)?;
            // 1. π = x W_encᵀ + b_enc: [n, d_sae]; θ: [1, d_sae]
            let pre = tensor::mm(x, &w_enc.t()?, input.gemm)?.broadcast_add(b_enc)?;
            let theta = (log_th * self.cfg.threshold_lr_scale as f64)?
                .exp()?
                .reshape((1, f))?;
            let diff = pre.detach().broadcast_sub(&theta.detach())?;
            let active = diff.gt(0f32)?.to_dtype(DType::F32)?;
            let band = diff.abs()?.lt(0.5 * eps)?.to_dtype(DType::F32)?;
            let st = tensor::zero_with_grad(&theta)?; // value 0, ∂/∂θ = 1
            // 2. f with the STE on θ; x̂ = f W_dec + b_dec
            let coef = band.broadcast_mul(&(theta.detach() * (-1.0 / eps as f64))?)?;
            let codes = (&pre * &active)?;
            let feat = (&codes + coef.broadcast_mul(&st)?)?;
            let recon = tensor::mm(&feat, w_dec, input.gemm)?.broadcast_add(b_dec)?;
            let mse = (tensor::sse(&recon, x)? / n)?;
            // 3. λ L0 / B with the STE
            let l0 = (active.sum_all()? + (band * (-1.0 / eps as f64))?.broadcast_mul(&st)?.sum_all()?)?;
            let l0 = (l0 * (lambda / n))?;
            Ok(TensorForward {
                losses: vec![("mse", mse), ("l0_penalty", l0)],
                metrics: vec![],
                codes: codes.detach(),
            })
        };
        run().map_err(|e| SaeError::tensor(ARCH, e))
    }

    fn export_parts(&self) -> ExportParts {
        let p = &self.params;
        let mut theta = Vec::new();
        self.thetas(&mut theta);
        ExportParts {
            architecture: "jumprelu",
            w_enc: p[W_ENC].data.clone(),
            w_dec: p[W_DEC].data.clone(),
            b_dec: p[B_DEC].data.clone(),
            per_latent: vec![
                ("b_enc", p[B_ENC].data.clone(), Fold::ByDecoderNorm),
                ("threshold", theta, Fold::ByDecoderNorm),
            ],
            apply_b_dec_to_input: false,
            extra_cfg: vec![],
        }
    }
}
