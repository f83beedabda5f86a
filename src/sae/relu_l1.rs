//! ReLU SAE with decoder-norm-weighted L1 (Anthropic "April 2024 update"),
//! sae_variants.md §2.2.
//!
//! ```text
//! π = W_enc x + b_enc            (no pre-encoder b_dec subtraction)
//! f = ReLU(π)
//! x̂ = Σ_i f_i d_i + b_dec
//! L = (1/B) Σ_b [ ‖x_b − x̂_b‖² + λ_t Σ_i f_{b,i} ‖d_i‖ ]
//! ```
//! No decoder constraint (§1.3 B); norms are folded into the encoder at export.
//!
//! Decision: SumD-MeanB loss; λ default 5 (the update's value, in `E‖x‖ = √d` scaling).
//! Decision: decoder init norm 0.1 with `W_enc = W_decᵀ` (SAELens "heuristic" init).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::export::{Folded, Format};
use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Fold, Param, Sae, SaeError, StepInput,
    StepOutput, Variant,
};
use super::tensor::{self, TensorForward, TensorInput};
use crate::kernels::{self as c, Workspace};
use candle_core::Tensor;
use crate::util::rng::Rng;

/// Variant name.
pub const ARCH: &str = "relu_l1";

/// ReLU+L1 hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Sparsity coefficient λ on `Σ_i f_i ‖d_i‖` (SumD-MeanB, inputs scaled to `E‖x‖ = √d`). Default 5.0.
    pub l1_coefficient: f32,
    /// Norm of each decoder row at initialisation. Default 0.1.
    pub decoder_init_norm: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            l1_coefficient: 5.0,
            decoder_init_norm: 0.1,
        }
    }
}

const W_ENC: usize = 0;
const B_ENC: usize = 1;
const W_DEC: usize = 2;
const B_DEC: usize = 3;

/// The registration (see [`super::registry`]).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || {
        // λ = 1: the default 5 is tuned for d_in in the thousands (E‖x‖ = √d); at the
        // examples' tiny widths it would switch every latent off.
        Config {
            l1_coefficient: 1.0,
            ..Config::default()
        }
        .into()
    },
    formats: &[Format {
        architecture: "standard",
        per_latent: &["b_enc"],
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
        Ok(Box::new(ReluL1::new(self.clone(), d, f, rng)?))
    }
    fn with_sparsity(&self, factor: f32) -> ArchConfig {
        Config {
            l1_coefficient: self.l1_coefficient * factor,
            ..self.clone()
        }
        .into()
    }
    fn sparsity_param(&self) -> (&'static str, f64) {
        ("l1_coefficient", self.l1_coefficient as f64)
    }
    /// 5e-5 for long runs (§9); 3e-3 at 128 steps. Decision: measured (issue 16; SmolLM2
    /// mlp_out, 4×, λ 2): lr 1e-3 → R² 0.634 at L0 236, 3e-3 → 0.647 at L0 98, 0.1% dead.
    fn recommended_adam(&self, _d_sae: usize, steps: u64) -> (f32, f32, f32) {
        (crate::sae::registry::budget_lr(5e-5, 3e-3, steps), 0.9, 0.999)
    }
    fn problems(&self, _d_sae: Option<usize>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        crate::sae::registry::check_nonneg(&mut out, "l1_coefficient", self.l1_coefficient);
        crate::sae::registry::check_positive(&mut out, "decoder_init_norm", self.decoder_init_norm);
        out
    }
    fn supports_pam_sgd(&self) -> bool {
        true
    }
    fn supports_tensor(&self) -> bool {
        true
    }
}

/// SAELens `standard` encode: `ReLU(x W_enc + b_enc)`.
fn encode_loaded(t: &Folded, n: usize, ws: &mut Workspace) {
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
                    .enumerate()
                    .filter(|(_, &v)| v > 0.0)
                    .map(|(i, &v)| (i as u32, v)),
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
    pre.relu()
}


/// The ReLU+L1 SAE.
pub struct ReluL1 {
    cfg: Config,
    d: usize,
    f: usize,
    params: Vec<Param>,
    norms: Vec<f32>,
}

impl ReluL1 {
    /// Initialise (§2.2 "Init").
    pub fn new(cfg: Config, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        if !(cfg.l1_coefficient >= 0.0 && cfg.decoder_init_norm > 0.0) {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!(
                    "l1_coefficient ({}) must be >= 0 and decoder_init_norm ({}) > 0",
                    cfg.l1_coefficient, cfg.decoder_init_norm
                ),
            });
        }
        let w_dec = c::random_rows(rng, f, d, cfg.decoder_init_norm);
        let params = vec![
            Param::new("W_enc", vec![f, d], w_dec.clone()),
            Param::new("b_enc", vec![f], vec![0.0; f]),
            Param::new("W_dec", vec![f, d], w_dec),
            Param::new("b_dec", vec![d], vec![0.0; d]),
        ];
        Ok(Self {
            cfg,
            d,
            f,
            params,
            norms: Vec::new(),
        })
    }
}

impl Sae for ReluL1 {
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
                        .enumerate()
                        .filter(|(_, &v)| v > 0.0)
                        .map(|(i, &v)| (i as u32, v)),
                );
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
        let lambda = self.cfg.l1_coefficient * input.sparsity_scale;
        // 1. f = ReLU(W_enc x + b_enc): [n, d_sae] sparse
        self.encode(input.x, n, ws)?;
        let p = &self.params;
        // 2. x̂ = W_dec f + b_dec: [n, d]; g = 2(x̂ − x)/B
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
        // 3. penalty Σ f_i ‖d_i‖ and G = d_i·g per active entry
        c::row_norms(&p[W_DEC].data, d, &mut self.norms);
        let penalty: f64 = ws
            .codes
            .idx
            .iter()
            .zip(&ws.codes.val)
            .map(|(&i, &v)| v as f64 * self.norms[i as usize] as f64)
            .sum();
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
        // 4. δ = ∂L/∂π = G + λ‖d_i‖/B on active entries
        let lb = lambda / n as f32;
        c::resize(&mut ws.coef, ws.codes.nnz());
        for ((cf, &g), &i) in ws.coef.iter_mut().zip(&ws.gvals).zip(&ws.codes.idx) {
            *cf = g + lb * self.norms[i as usize];
        }
        // 5. parameter gradients
        let (ge, rest) = grads.split_at_mut(B_ENC);
        c::accumulate_rows(
            &mut ws.scratch,
            &ws.codes,
            &ws.coef,
            &ws.xt,
            d,
            f,
            &mut ge[W_ENC],
        );
        c::scatter_add(&ws.codes, &ws.coef, &mut rest[0]);
        let gd = &mut grads[W_DEC];
        // penalty gradient on the decoder: λ/B (Σ_b f_{b,i}) d_i/‖d_i‖
        c::resize(&mut ws.lat, f);
        ws.lat.fill(0.0);
        c::scatter_add(&ws.codes, &ws.codes.val, &mut ws.lat);
        let (lat, norms) = (&ws.lat, &self.norms);
        gd.par_chunks_mut(d)
            .zip(p[W_DEC].data.par_chunks(d))
            .enumerate()
            .for_each(|(i, (g, w))| {
                if lat[i] != 0.0 && norms[i] > 0.0 {
                    c::axpy(lb * lat[i] / norms[i], w, g);
                }
            });
        c::col_sums(&ws.resid, n, d, &mut grads[B_DEC]);
        let mse = sse / n as f64;
        let l1 = lambda as f64 * penalty / n as f64;
        Ok(StepOutput {
            loss: mse + l1,
            losses: vec![("mse", mse), ("l1", l1)],
            metrics: vec![],
        })
    }

    /// The same loss on tensors: `π = x W_encᵀ + b_enc`, `f = π ⊙ 1[π > 0]`,
    /// `x̂ = f W_dec + b_dec`, `L = ‖x − x̂‖²/B + λ_t Σ f ‖d‖ / B`.
    fn tensor_forward(
        &self,
        params: &[Tensor],
        input: &TensorInput,
    ) -> Result<TensorForward, SaeError> {
        let lambda = (self.cfg.l1_coefficient * input.sparsity_scale) as f64;
        let run = || -> candle_core::Result<TensorForward> {
            let (w_enc, b_enc, w_dec, b_dec) = (
                &params[W_ENC],
                &params[B_ENC],
                &params[W_DEC],
                &params[B_DEC],
            );
            let (x, n) = (input.x, input.n as f64);
            // 1. f = ReLU(π): [n, d_sae]
            let pre = tensor::mm(x, &w_enc.t()?, input.gemm)?.broadcast_add(b_enc)?;
            let f = (&pre * tensor::positive(&pre)?)?;
            // 2. x̂ = f W_dec + b_dec: [n, d]
            let recon = tensor::mm(&f, w_dec, input.gemm)?.broadcast_add(b_dec)?;
            let mse = (tensor::sse(&recon, x)? / n)?;
            // 3. λ Σ_b Σ_i f_{b,i} ‖d_i‖ / B
            let norms = w_dec.sqr()?.sum_keepdim(1)?.sqrt()?; // [d_sae, 1]
            let l1 = (f.matmul(&norms)?.sum_all()? * (lambda / n))?;
            Ok(TensorForward {
                losses: vec![("mse", mse), ("l1", l1)],
                metrics: vec![],
                codes: f.detach(),
            })
        };
        run().map_err(|e| SaeError::tensor(ARCH, e))
    }

    /// PAM-SGD: unit rows with the norms moved into the encoder, an exact symmetry of the
    /// whole loss (ReLU is positively homogeneous and the penalty is `Σ f_i ‖d_i‖`).
    fn install_decoder(&mut self, w_dec: &[f32], b_dec: &[f32]) -> Result<(), SaeError> {
        let d = self.d;
        let (enc, rest) = self.params.split_at_mut(B_ENC);
        let (be, rest) = rest.split_at_mut(1);
        let (wd, bd) = rest.split_at_mut(1);
        c::install_unit_decoder(
            w_dec,
            &mut wd[0].data,
            &mut enc[W_ENC].data,
            &mut be[0].data,
            d,
        );
        bd[0].data.copy_from_slice(b_dec);
        Ok(())
    }

    fn export_parts(&self) -> ExportParts {
        let p = &self.params;
        ExportParts {
            architecture: "standard",
            w_enc: p[W_ENC].data.clone(),
            w_dec: p[W_DEC].data.clone(),
            b_dec: p[B_DEC].data.clone(),
            per_latent: vec![("b_enc", p[B_ENC].data.clone(), Fold::ByDecoderNorm)],
            apply_b_dec_to_input: false,
            extra_cfg: vec![],
        }
    }
}
