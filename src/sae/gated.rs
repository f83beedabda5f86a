//! Gated SAE with `r_mag` weight sharing (Rajamanoharan et al. 2024, arXiv 2404.16014),
//! sae_variants.md §4.
//!
//! ```text
//! x̃      = x − b_dec
//! u      = W_gate x̃                        (one GEMM shared by both paths)
//! π_gate = u + b_gate
//! π_mag  = exp(r_mag) ⊙ u + b_mag
//! f      = H(π_gate) ⊙ ReLU(π_mag)
//! x̂      = Σ f_i d_i + b_dec
//! L = (1/B) Σ_b [ ‖x − x̂‖² + λ_t ‖ReLU(π_gate)‖₁ + ‖x − (sg(W_dec) ReLU(π_gate) + sg(b_dec))‖² ]
//! ```
//! No gradient flows through `H(π_gate)`: the gate learns from the L1 and auxiliary terms, the
//! magnitude path from the main reconstruction. Unit-norm decoder rows (§1.3 A). The encoder
//! matrix is stored under the SAELens name `W_enc`.
//!
//! Decision: the dictionary_learning form (frozen decoder and `b_dec` in the aux term, unit
//! decoder), not SAELens's norm-weighted one. λ default 1.0 (SumD-MeanB, `E‖x‖ = √d`).
//!
//! Decision (initialisation, configurable by `init_l0`): §4.3's init (`b_gate = 0`,
//! `r_mag = 0`, `W_gate = W_decᵀ`) opens about half the gates, so at `d_sae = 8·d_in` the first
//! reconstruction is `≈ (d_sae / 2d_in)·x̃` and its error several times the signal energy;
//! with few hundred steps the SAE never recovers from it (measured on SmolLM2 block 15:
//! R² < −3 after 16 steps). We therefore start from data (§1.2's init sample):
//! 1. `b_gate_i = −q_i`, with `q_i` the `1 − init_l0/d_sae` quantile of `u_i` on the sample,
//!    so every latent fires on the same share of tokens and `E[L0] = min(init_l0, d_in/4)`;
//! 2. `r_mag = ln c` for all latents, with `c` the least-squares scale of the resulting
//!    reconstruction (`c = Σ x̃·x̂₀ / Σ ‖x̂₀‖²`), so the first error is below the signal energy.
//!
//! `init_l0 = 0` keeps §4.3's init exactly.

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
use rayon::prelude::*;

/// Variant name.
pub const ARCH: &str = "gated";

/// Gated SAE hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// λ on `‖ReLU(π_gate)‖₁` (SumD-MeanB, `E‖x‖ = √d` inputs). Default 1.0.
    pub l1_coefficient: f32,
    /// Expected L0 of the data-dependent initialisation (see the module doc), capped at
    /// `d_in / 4`; 0 keeps the paper's `b_gate = r_mag = 0`. Default 64.
    pub init_l0: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            l1_coefficient: 1.0,
            init_l0: 64.0,
        }
    }
}

/// The L0 the data-dependent init aims at: `init_l0`, at most `d_in / 4` (a small SAE on
/// low-dimensional data should not start with most of its latents on).
pub(crate) fn init_l0(cfg_l0: f32, d_in: usize) -> f32 {
    cfg_l0.min((d_in as f32 / 4.0).max(1.0))
}

/// Rows of the init sample used by [`Sae::init_from_sample`] (bounds its `[rows, d_sae]`
/// pre-activation buffer).
const INIT_ROWS: usize = 2048;

const W_GATE: usize = 0;
const B_GATE: usize = 1;
const B_MAG: usize = 2;
const R_MAG: usize = 3;
const W_DEC: usize = 4;
const B_DEC: usize = 5;

/// The registration (see [`super::registry`]).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || Config::default().into(),
    formats: &[Format {
        architecture: "gated",
        per_latent: &["b_gate", "b_mag", "r_mag"],
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
        Ok(Box::new(Gated::new(self.clone(), d, f, rng)?))
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
    /// 3e-4 for long runs (§9); 1e-3 at 128 steps. Decision: measured (issue 16; SmolLM2
    /// mlp_out, 8×, λ 3: R² 0.708 at L0 85, no dead latents).
    fn recommended_adam(&self, _d_sae: usize, steps: u64) -> (f32, f32, f32) {
        (crate::sae::registry::budget_lr(3e-4, 1e-3, steps), 0.0, 0.999)
    }
    fn supports_tensor(&self) -> bool {
        true
    }
    fn problems(&self, _d_sae: Option<usize>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        crate::sae::registry::check_nonneg(&mut out, "l1_coefficient", self.l1_coefficient);
        crate::sae::registry::check_nonneg(&mut out, "init_l0", self.init_l0);
        out
    }
}

/// SAELens `gated` encode: `u = x W_enc`; where `u + b_gate > 0`, `ReLU(exp(r_mag)·u + b_mag)`.
fn encode_loaded(t: &Folded, n: usize, ws: &mut Workspace) {
    let (bg, bm, r) = (t.per("b_gate"), t.per("b_mag"), t.per("r_mag"));
    c::encode_collect(ws, n, t.d_in, &t.w_enc, t.d_sae, None, |_, row, buf| {
        for (i, &u) in row.iter().enumerate() {
            if u + bg[i] > 0.0 {
                let m = r[i].exp() * u + bm[i];
                if m > 0.0 {
                    buf.main.push((i as u32, m));
                }
            }
        }
    });
}

/// [`encode_loaded`] on tensors ([`crate::sae::export_tensor`]).
fn tensor_encode_loaded(
    s: &crate::sae::export_tensor::DeviceSae,
    xt: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let u = s.pre(xt, None)?;
    let gate = crate::sae::export_tensor::mask(u.broadcast_add(s.per("b_gate")?)?.gt(0f32)?)?;
    let m = u
        .broadcast_mul(&s.per("r_mag")?.exp()?)?
        .broadcast_add(s.per("b_mag")?)?;
    m.relu()? * gate
}


/// The Gated SAE.
pub struct Gated {
    cfg: Config,
    d: usize,
    f: usize,
    params: Vec<Param>,
    er: Vec<f32>,
}

impl Gated {
    /// Initialise (§4.3): unit decoder rows, `W_gate = W_decᵀ`, `r_mag = b_gate = b_mag = 0`.
    pub fn new(cfg: Config, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        if cfg.l1_coefficient.is_nan() || cfg.l1_coefficient < 0.0 {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!("l1_coefficient = {} must be >= 0", cfg.l1_coefficient),
            });
        }
        if !(cfg.init_l0 >= 0.0 && cfg.init_l0.is_finite()) {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!(
                    "init_l0 = {} must be a finite number >= 0 (0 keeps the paper's init)",
                    cfg.init_l0
                ),
            });
        }
        let w_dec = c::random_rows(rng, f, d, 1.0);
        let mut dec = Param::new("W_dec", vec![f, d], w_dec.clone());
        dec.unit_rows = true;
        let params = vec![
            Param::new("W_enc", vec![f, d], w_dec),
            Param::new("b_gate", vec![f], vec![0.0; f]),
            Param::new("b_mag", vec![f], vec![0.0; f]),
            Param::new("r_mag", vec![f], vec![0.0; f]),
            dec,
            Param::new("b_dec", vec![d], vec![0.0; d]),
        ];
        Ok(Self {
            cfg,
            d,
            f,
            params,
            er: Vec::new(),
        })
    }
}

impl Sae for Gated {
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
        let mut er = std::mem::take(&mut ws.lat2);
        er.clear();
        er.extend(p[R_MAG].data.iter().map(|r| r.exp()));
        let (bg, bm) = (&p[B_GATE].data, &p[B_MAG].data);
        c::prepare_input(x, self.d, Some(&p[B_DEC].data), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            self.d,
            &p[W_GATE].data,
            self.f,
            None,
            |_, row, buf| {
                for (i, &u) in row.iter().enumerate() {
                    if u + bg[i] > 0.0 {
                        let m = er[i] * u + bm[i];
                        if m > 0.0 {
                            buf.main.push((i as u32, m));
                        }
                    }
                }
            },
        );
        ws.lat2 = er;
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
        let lambda = self.cfg.l1_coefficient * input.sparsity_scale;
        let p = &self.params;
        self.er.clear();
        self.er.extend(p[R_MAG].data.iter().map(|r| r.exp()));
        let er = &self.er;
        let (bg, bm) = (&p[B_GATE].data, &p[B_MAG].data);
        // 1. u = W_gate (x − b_dec); open gates → aux (value π_gate), active → codes (value f)
        c::prepare_input(input.x, d, Some(&p[B_DEC].data), &mut ws.xt);
        c::encode_collect(ws, n, d, &p[W_GATE].data, f, None, |_, row, buf| {
            for (i, &u) in row.iter().enumerate() {
                let pg = u + bg[i];
                if pg > 0.0 {
                    buf.aux.push((i as u32, pg));
                    let m = er[i] * u + bm[i];
                    if m > 0.0 {
                        buf.main.push((i as u32, m));
                    }
                }
            }
        });
        let w_dec = &p[W_DEC].data;
        // 2. main reconstruction: g = 2(x̂ − x)/B, G = d_i·g on active entries
        c::decode(
            &mut ws.scratch,
            &ws.codes,
            w_dec,
            d,
            f,
            Some(&p[B_DEC].data),
            &mut ws.recon,
        );
        let sse = c::residual(&ws.recon, input.x, d, 2.0 / n as f32, &mut ws.resid);
        c::dots_and_accumulate(
            &mut ws.scratch,
            &ws.codes,
            w_dec,
            d,
            f,
            &ws.resid,
            &mut ws.gvals,
            &ws.codes.val,
            &mut grads[W_DEC],
        );
        // 3. aux reconstruction through the gate with a frozen decoder: h = 2(x̂_aux − x)/B, A = d_i·h
        c::decode(
            &mut ws.scratch,
            &ws.aux,
            w_dec,
            d,
            f,
            Some(&p[B_DEC].data),
            &mut ws.aux_recon,
        );
        let sse_aux = c::residual(&ws.aux_recon, input.x, d, 2.0 / n as f32, &mut ws.aux_resid);
        c::entry_dots(
            &mut ws.scratch,
            &ws.aux,
            w_dec,
            d,
            f,
            &ws.aux_resid,
            &mut ws.aux_gvals,
        );
        // 4. ∂L/∂u: exp(r)·G on active entries, λ/B + A on open gates
        let lb = lambda / n as f32;
        c::resize(&mut ws.coef, ws.codes.nnz());
        for ((cf, &g), &i) in ws.coef.iter_mut().zip(&ws.gvals).zip(&ws.codes.idx) {
            *cf = er[i as usize] * g;
        }
        c::resize(&mut ws.aux_coef, ws.aux.nnz());
        for (cf, &a) in ws.aux_coef.iter_mut().zip(&ws.aux_gvals) {
            *cf = lb + a;
        }
        // 5. parameter gradients
        c::accumulate_rows(
            &mut ws.scratch,
            &ws.codes,
            &ws.coef,
            &ws.xt,
            d,
            f,
            &mut grads[W_GATE],
        );
        c::accumulate_rows(
            &mut ws.scratch,
            &ws.aux,
            &ws.aux_coef,
            &ws.xt,
            d,
            f,
            &mut grads[W_GATE],
        );
        c::scatter_add(&ws.aux, &ws.aux_coef, &mut grads[B_GATE]);
        c::scatter_add(&ws.codes, &ws.gvals, &mut grads[B_MAG]);
        {
            let gr = &mut grads[R_MAG];
            for ((&i, &v), &g) in ws.codes.idx.iter().zip(&ws.codes.val).zip(&ws.gvals) {
                // ∂π_mag/∂r = exp(r)·u = π_mag − b_mag
                gr[i as usize] += g * (v - bm[i as usize]);
            }
        }
        c::col_sums(&ws.resid, n, d, &mut grads[B_DEC]);
        c::resize(&mut ws.lat, f);
        ws.lat.fill(0.0);
        c::scatter_add(&ws.codes, &ws.coef, &mut ws.lat);
        c::scatter_add(&ws.aux, &ws.aux_coef, &mut ws.lat);
        ws.lat.iter_mut().for_each(|v| *v = -*v);
        c::add_weighted_rows(
            &mut ws.scratch,
            &ws.lat,
            &p[W_GATE].data,
            d,
            &mut grads[B_DEC],
        );
        let mse = sse / n as f64;
        let l1 = lambda as f64 * ws.aux.val.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let aux = sse_aux / n as f64;
        Ok(StepOutput {
            loss: mse + l1 + aux,
            losses: vec![("mse", mse), ("l1", l1), ("aux", aux)],
            metrics: vec![],
        })
    }

    fn init_from_sample(&mut self, x: &[f32], n: usize) -> Result<(), SaeError> {
        check_width(ARCH, self.d, x, n)?;
        if self.cfg.init_l0 == 0.0 {
            return Ok(());
        }
        let (d, f) = (self.d, self.f);
        let m = n.min(INIT_ROWS);
        let x = &x[..m * d];
        // 1. u = W_gate x̃ on the sample, [m, f]; b_gate_i = −(1 − p) quantile of column i
        let mut xt = Vec::new();
        c::prepare_input(x, d, Some(&self.params[B_DEC].data), &mut xt);
        let mut u = vec![0.0; m * f];
        c::gemm_xwt(&xt, m, d, &self.params[W_GATE].data, f, None, &mut u);
        let p_fire = (init_l0(self.cfg.init_l0, d) / f as f32).clamp(0.0, 1.0);
        let rank = (((1.0 - p_fire) * m as f32) as usize).min(m - 1);
        self.params[B_GATE]
            .data
            .par_iter_mut()
            .enumerate()
            .for_each(|(i, bg)| {
                let mut col: Vec<f32> = (0..m).map(|b| u[b * f + i]).collect();
                let (_, q, _) = col.select_nth_unstable_by(rank, f32::total_cmp);
                *bg = -*q;
            });
        drop(u);
        // 2. least-squares scale of the reconstruction x̂₀ = Σ f_i d_i (r_mag = b_mag = 0)
        self.params[R_MAG].data.fill(0.0);
        let mut ws = Workspace::default();
        self.encode(x, m, &mut ws)?;
        let mut r = Vec::new();
        c::decode(
            &mut ws.scratch,
            &ws.codes,
            &self.params[W_DEC].data,
            d,
            f,
            None,
            &mut r,
        );
        if let Some(ln_c) = c::ln_lsq_scale(&r, &xt) {
            self.params[R_MAG].data.fill(ln_c);
        }
        Ok(())
    }

    /// The same loss on tensors: the gate `H(π_gate)` and `1[π_mag > 0]` as detached masks,
    /// the aux reconstruction through detached `W_dec`, `b_dec`.
    fn tensor_forward(
        &self,
        params: &[Tensor],
        input: &TensorInput,
    ) -> Result<TensorForward, SaeError> {
        let lambda = (self.cfg.l1_coefficient * input.sparsity_scale) as f64;
        let run = || -> candle_core::Result<TensorForward> {
            let (w_gate, b_gate, b_mag, r_mag, w_dec, b_dec) = (
                &params[W_GATE],
                &params[B_GATE],
                &params[B_MAG],
                &params[R_MAG],
                &params[W_DEC],
                &params[B_DEC],
            );
            let (x, n) = (input.x, input.n as f64);
            // 1. u = (x − b_dec) W_gateᵀ: [n, d_sae]; both paths
            let u = tensor::mm(&x.broadcast_sub(b_dec)?, &w_gate.t()?, input.gemm)?;
            let pg = u.broadcast_add(b_gate)?;
            let pm = u.broadcast_mul(&r_mag.exp()?)?.broadcast_add(b_mag)?;
            let gate = tensor::positive(&pg)?;
            let on = (&gate * tensor::positive(&pm)?)?;
            // 2. f = H(π_gate) ReLU(π_mag); main reconstruction
            let feat = (&pm * &on)?;
            let recon = tensor::mm(&feat, w_dec, input.gemm)?.broadcast_add(b_dec)?;
            let mse = (tensor::sse(&recon, x)? / n)?;
            // 3. λ ‖ReLU(π_gate)‖₁ / B and the aux reconstruction with a frozen decoder
            let rg = (&pg * &gate)?;
            let l1 = (rg.sum_all()? * (lambda / n))?;
            let aux_recon = rg.matmul(&w_dec.detach())?.broadcast_add(&b_dec.detach())?;
            let aux = (tensor::sse(&aux_recon, x)? / n)?;
            Ok(TensorForward {
                losses: vec![("mse", mse), ("l1", l1), ("aux", aux)],
                metrics: vec![],
                codes: feat.detach(),
            })
        };
        run().map_err(|e| SaeError::tensor(ARCH, e))
    }

    fn export_parts(&self) -> ExportParts {
        let p = &self.params;
        ExportParts {
            architecture: "gated",
            w_enc: p[W_GATE].data.clone(),
            w_dec: p[W_DEC].data.clone(),
            b_dec: p[B_DEC].data.clone(),
            per_latent: vec![
                ("b_gate", p[B_GATE].data.clone(), Fold::ByDecoderNorm),
                ("b_mag", p[B_MAG].data.clone(), Fold::ByDecoderNorm),
                ("r_mag", p[R_MAG].data.clone(), Fold::Keep),
            ],
            apply_b_dec_to_input: true,
            extra_cfg: vec![],
        }
    }
}
