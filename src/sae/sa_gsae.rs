//! Sign-Aware Gated SAE (SA-GSAE) with the Bi-Jump-ReLU activation (arXiv 2605.28149), as
//! reconstructed in sae_variants.md §6.2–6.6 (the paper's method section was not available;
//! every formula here is the spec's [R] reconstruction).
//!
//! ```text
//! x̃  = x − b_dec                                   (pre_encoder_bias; else x̃ = x)
//! u  = W_enc x̃                                     (one dense GEMM, shared by gate and magnitude)
//! π  = u + b_gate                                   (signed gate pre-activation)
//! θ± = exp(t±)                                      (tied: t⁺ = t⁻ = t)
//! g⁺ = H(π − θ⁺),  g⁻ = H(−π − θ⁻)                  (two-sided gate; exclusive since θ± > 0)
//! m± = exp(r±) ⊙ u + b_mag±                         (tied: r⁺ = r⁻, b_mag⁺ = b_mag⁻)
//! f  = g⁺ ReLU(m⁺) − g⁻ ReLU(−m⁻)                   (output = "sign_consistent"; "raw": f = g⁺m⁺ + g⁻m⁻)
//! x̂  = Σ f_i d_i + b_dec
//! s  = ReLU(π − θ⁺) − ReLU(−π − θ⁻)                 (signed soft threshold of the gate)
//! L  = (1/B) Σ_b [ ‖x − x̂‖² + λ_t Σ_i n_i |s_i| + ‖x − (sg(W_dec) s + sg(b_dec))‖² ]
//!      n_i = 1 (unit decoder) or ‖d_i‖ (decoder_norm = "penalty", aux decoder then live)
//! ```
//! Gradients (§6.4), with `G = d_i·2(x̂ − x)/B` and `A = d_i·2(x̂_aux − x)/B`:
//! - magnitude path (main reconstruction only) on active entries of side σ:
//!   `∂u += a_σ G`, `∂r_σ += G (m − b_mag_σ)`, `∂b_mag_σ += G`;
//! - gate (no gradient through H in the main reconstruction) on open gates:
//!   `∂π = sgn(s)·λ n_i/B + A`, flowing to `b_gate` and `u`;
//! - thresholds (exact terms): `∂θ_σ = −sgn(s)·∂π`; with `threshold_ste` the main
//!   reconstruction adds `G·(−J_σ/ε)·K((±π − θ_σ)/ε)` with `J_σ` the code just outside the
//!   boundary (the magnitude at the boundary); `∂t = θ ∂θ`.
//!
//! With `negative_side = false` this is the Gated SAE of §4 with a learnable (redundant)
//! gate threshold: from the same parameters and `b_gate = b_gate^Gated + θ` the codes, loss
//! and gradients are those of [`super::gated`] (tested below).
//!
//! Inference form (§6.3, exported as architecture `bi_jumprelu` when magnitudes are tied):
//! `f = m·(1[m > τ⁺] + 1[m < τ⁻])`, `m = W' x + b'`, `W' = diag(a) W_enc`,
//! `b' = b_mag − a⊙(W_enc b_dec)`, `τ̃⁺ = a(θ⁺ − b_gate) + b_mag`, `τ̃⁻ = a(−θ⁻ − b_gate) + b_mag`,
//! `τ⁺ = max(τ̃⁺, 0)`, `τ⁻ = min(τ̃⁻, 0)` (sign-consistent; raw keeps τ̃±). Untied magnitudes
//! need two affine maps per latent and are exported in the gate form (architecture `sa_gsae`).
//!
//! Decisions (the open choices of §6.6, each a [`Config`] key, recommended default first):
//! 1. `output`: `sign_consistent` (f's sign is the gate's) | `raw` (f = m when a gate is open).
//! 2. `tied_thresholds`: true (one θ per latent) | false (θ⁺, θ⁻).
//! 3. `tied_magnitudes`: true (one r, b_mag; the paper's recommendation) | false (per polarity).
//! 4. `sparsity`: `l1_gate` (λ|s|) | `l0` (λ[g⁺ + g⁻] with rectangle-kernel θ-gradients, no
//!    gradient to π, JumpReLU style). The spec's third form, L1 on |π| with no threshold, is
//!    not offered: it penalises every (token, latent) pair densely and the spec itself notes
//!    that thresholds are still needed with it.
//! 5. (and 7.) `decoder_norm`: `unit` (unit-norm decoder rows, frozen decoder in the aux term) |
//!    `penalty` (no constraint, λ Σ ‖d_i‖|s_i|, aux term through the live decoder, SAELens
//!    convention; norms are folded at export).
//! 6. `threshold_ste`: false (θ learns only from the sparsity and aux terms; §6.8 prototype) |
//!    true (adds the STE through the main reconstruction).
//! 8. Dead-latent revival: threshold reset only (`threshold_reset_every` steps, latents dead
//!    by the trainer's `dead_after_tokens` get `t ← ln θ_init`, optionally `b_gate ← 0`, and
//!    zeroed Adam moments). The AuxK-style addition is not offered (not in the abstract).
//! 9. `pre_encoder_bias`: true (x̃ = x − b_dec, as Gated) | false.
//!
//! Decision (initialisation, `init_l0`, default 64): §6.5's small θ opens nearly every gate
//! on both sides at step 0 (L0 ≈ d_sae; measured ~2000 of 2304 on SmolLM2 after 16 steps),
//! the same start that kept the Gated SAE from learning in a few hundred steps. As for
//! Gated ([`super::gated`]), the trainer's init sample sets θ_i to the `1 − init_l0/d_sae`
//! quantile of |π_i| (so `E[L0] = min(init_l0, d_in/4)`) and `r = ln c`, `c` the least-squares scale of
//! the first reconstruction. `init_l0 = 0` keeps §6.5 exactly.
//!
//! Further decisions: λ default 1.0 (the Gated default, SumD-MeanB, `E‖x‖ = √d`); θ_init =
//! bandwidth = 0.05 in those units (§6.5: 0.05·σ_u with σ_u ≈ 1); optional per-latent
//! calibration `init_threshold_quantile` (θ_i = that quantile of |π_i| on the first ≤ 1024
//! tokens of step 0). Closed gates inside the STE/L0 band are carried in the workspace's aux
//! list with value ±0.0 (the sign bit names the side); they add nothing to the aux
//! reconstruction. The cumulative count of reset latents is a non-trainable parameter
//! `revived` (so it survives checkpoints) and is logged as the term `revived`.

use serde::{Deserialize, Serialize};

use super::{
    check_width, ArchConfig, ExportParts, Fold, Param, Sae, SaeError, StepInput, StepOutput,
};
use crate::kernels::{self as c, Codes, TaskBuf, Workspace};
use crate::util::rng::Rng;

/// Variant name.
pub const ARCH: &str = "sa_gsae";
/// Architecture name of the tied-magnitude export (one linear map, two thresholds).
pub const EXPORT_BI_JUMPRELU: &str = "bi_jumprelu";

/// Choice 1: the sign of the output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OutputSign {
    /// `f = g⁺ReLU(m⁺) − g⁻ReLU(−m⁻)`: the sign always matches the open gate.
    #[default]
    SignConsistent,
    /// `f = (g⁺ + g⁻)·m`: the raw signed magnitude.
    Raw,
}

/// Choice 4: the sparsity penalty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SparsityPenalty {
    /// `λ Σ n_i |s_θ(π)_i|` (L1 on the gate's soft threshold).
    #[default]
    L1Gate,
    /// `λ Σ [g⁺ + g⁻]` with rectangle-kernel threshold gradients.
    L0,
}

/// Choices 5 and 7: decoder norm handling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DecoderNorm {
    /// Unit-norm decoder rows; the aux reconstruction uses a frozen decoder.
    #[default]
    Unit,
    /// No constraint; norm-weighted penalty; the aux reconstruction uses the live decoder.
    Penalty,
}

/// SA-GSAE hyperparameters (`[sae] arch = { kind = "sa_gsae", ... }`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// λ of the sparsity penalty (SumD-MeanB, `E‖x‖ = √d` inputs). Default 1.0.
    pub l1_coefficient: f32,
    /// Use the negative gate; false reduces the model to the Gated SAE. Default true.
    pub negative_side: bool,
    /// One threshold per latent (else θ⁺, θ⁻). Default true.
    pub tied_thresholds: bool,
    /// One `r_mag`, `b_mag` per latent (else per polarity). Default true.
    pub tied_magnitudes: bool,
    /// Output sign rule. Default `"sign_consistent"`.
    pub output: OutputSign,
    /// Sparsity penalty. Default `"l1_gate"`.
    pub sparsity: SparsityPenalty,
    /// Decoder norm handling. Default `"unit"`.
    pub decoder_norm: DecoderNorm,
    /// Straight-through estimator for θ through the main reconstruction. Default false.
    pub threshold_ste: bool,
    /// Rectangle-kernel bandwidth ε (STE and L0 penalty). Default 0.05.
    pub bandwidth: f32,
    /// Initial (and reset) gate threshold θ_init. Default 0.05.
    pub init_threshold: f32,
    /// If set, θ_i starts at this quantile of |π_i| on the first batch instead. Default unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_threshold_quantile: Option<f32>,
    /// Reset the thresholds of dead latents every this many steps (0 = never). Default 1000.
    pub threshold_reset_every: u64,
    /// Also zero `b_gate` of reset latents. Default false.
    pub reset_b_gate: bool,
    /// Subtract `b_dec` before the encoder. Default true.
    pub pre_encoder_bias: bool,
    /// Expected L0 of the data-dependent initialisation (as the Gated SAE's, see
    /// [`Sae::init_from_sample`] below); 0 keeps §6.5's `θ = θ_init`, `r = 0`. Default 64.
    pub init_l0: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            l1_coefficient: 1.0,
            negative_side: true,
            tied_thresholds: true,
            tied_magnitudes: true,
            output: OutputSign::SignConsistent,
            sparsity: SparsityPenalty::L1Gate,
            decoder_norm: DecoderNorm::Unit,
            threshold_ste: false,
            bandwidth: 0.05,
            init_threshold: 0.05,
            init_threshold_quantile: None,
            threshold_reset_every: 1000,
            reset_b_gate: false,
            pre_encoder_bias: true,
            init_l0: 64.0,
        }
    }
}

/// Parameter indices; `[positive, negative]` pairs point at the same parameter when tied.
#[derive(Debug, Clone, Copy)]
struct Ix {
    w_enc: usize,
    b_gate: usize,
    t: [usize; 2],
    r: [usize; 2],
    bm: [usize; 2],
    w_dec: usize,
    b_dec: usize,
    revived: usize,
}

/// The SA-GSAE.
pub struct SaGsae {
    cfg: Config,
    d: usize,
    f: usize,
    params: Vec<Param>,
    ix: Ix,
    /// Per-step derived values: θ±, exp(r±), decoder row norms, boundary jumps J±.
    th: [Vec<f32>; 2],
    a: [Vec<f32>; 2],
    norms: Vec<f32>,
    jump: [Vec<f32>; 2],
    /// Side (0 = positive, 1 = negative) of each main entry.
    side: Vec<u8>,
    /// G on aux entries (STE only).
    band_g: Vec<f32>,
}

/// Everything the per-token gate needs, borrowed from the parameters.
struct Gate<'a> {
    bg: &'a [f32],
    th: [&'a [f32]; 2],
    a: [&'a [f32]; 2],
    bm: [&'a [f32]; 2],
    neg: bool,
    raw: bool,
    /// Half bandwidth when closed gates inside the band must be collected.
    half: Option<f32>,
}

impl Gate<'_> {
    /// One token: active latents → `buf.main` (value f); with `train`, open gates →
    /// `buf.aux` (value s) and closed band entries (value ±0.0).
    #[inline]
    fn row(&self, row: &[f32], buf: &mut TaskBuf, train: bool) {
        for (i, &u) in row.iter().enumerate() {
            let pi = u + self.bg[i];
            let side = if pi > self.th[0][i] {
                0
            } else if self.neg && -pi > self.th[1][i] {
                1
            } else {
                if let (true, Some(h)) = (train, self.half) {
                    if self.th[0][i] - pi < h {
                        buf.aux.push((i as u32, 0.0));
                    } else if self.neg && self.th[1][i] + pi < h {
                        buf.aux.push((i as u32, -0.0));
                    }
                }
                continue;
            };
            let m = self.a[side][i] * u + self.bm[side][i];
            let keep = if self.raw {
                m != 0.0
            } else if side == 0 {
                m > 0.0
            } else {
                m < 0.0
            };
            if keep {
                buf.main.push((i as u32, m));
            }
            if train {
                let s = if side == 0 {
                    pi - self.th[0][i]
                } else {
                    pi + self.th[1][i]
                };
                buf.aux.push((i as u32, s));
            }
        }
    }
}

/// Side of an aux entry: negative when `s < 0`, or `s = −0.0` for a closed band entry.
#[inline]
fn aux_side(s: f32) -> usize {
    s.is_sign_negative() as usize
}

impl SaGsae {
    /// Initialise (§6.5): unit decoder rows, `W_enc = W_decᵀ`, `b_gate = b_mag = r = 0`,
    /// `θ = θ_init` (`b_dec` is set by the trainer).
    pub fn new(cfg: Config, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        let q_ok = cfg
            .init_threshold_quantile
            .is_none_or(|q| q > 0.0 && q < 1.0);
        if !(cfg.l1_coefficient >= 0.0
            && cfg.bandwidth > 0.0
            && cfg.init_threshold > 0.0
            && cfg.init_threshold.is_finite()
            && q_ok
            && cfg.init_l0 >= 0.0
            && cfg.init_l0.is_finite())
        {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!(
                    "l1_coefficient ({}) must be >= 0, bandwidth ({}) and init_threshold ({}) > 0, init_threshold_quantile ({:?}) in (0, 1), init_l0 ({}) finite and >= 0",
                    cfg.l1_coefficient, cfg.bandwidth, cfg.init_threshold, cfg.init_threshold_quantile, cfg.init_l0
                ),
            });
        }
        let w_dec = c::random_rows(rng, f, d, 1.0);
        let lt = cfg.init_threshold.ln();
        let mut params = vec![
            Param::new("W_enc", vec![f, d], w_dec.clone()),
            Param::new("b_gate", vec![f], vec![0.0; f]),
        ];
        let mut pair = |tied: bool, names: [&'static str; 3], init: f32| -> [usize; 2] {
            if tied {
                params.push(Param::new(names[0], vec![f], vec![init; f]));
                [params.len() - 1; 2]
            } else {
                params.push(Param::new(names[1], vec![f], vec![init; f]));
                params.push(Param::new(names[2], vec![f], vec![init; f]));
                [params.len() - 2, params.len() - 1]
            }
        };
        let t = pair(
            cfg.tied_thresholds,
            ["log_threshold", "log_threshold_pos", "log_threshold_neg"],
            lt,
        );
        let r = pair(
            cfg.tied_magnitudes,
            ["r_mag", "r_mag_pos", "r_mag_neg"],
            0.0,
        );
        let bm = pair(
            cfg.tied_magnitudes,
            ["b_mag", "b_mag_pos", "b_mag_neg"],
            0.0,
        );
        let mut dec = Param::new("W_dec", vec![f, d], w_dec);
        dec.unit_rows = cfg.decoder_norm == DecoderNorm::Unit;
        params.push(dec);
        params.push(Param::new("b_dec", vec![d], vec![0.0; d]));
        let mut revived = Param::new("revived", vec![1], vec![0.0]);
        revived.trainable = false;
        params.push(revived);
        let n = params.len();
        let ix = Ix {
            w_enc: 0,
            b_gate: 1,
            t,
            r,
            bm,
            w_dec: n - 3,
            b_dec: n - 2,
            revived: n - 1,
        };
        Ok(Self {
            cfg,
            d,
            f,
            params,
            ix,
            th: [Vec::new(), Vec::new()],
            a: [Vec::new(), Vec::new()],
            norms: Vec::new(),
            jump: [Vec::new(), Vec::new()],
            side: Vec::new(),
            band_g: Vec::new(),
        })
    }

    /// Recompute θ±, exp(r±) and the decoder norms from the parameters.
    fn derive(&mut self) {
        let p = &self.params;
        for s in 0..2 {
            self.th[s].clear();
            self.th[s].extend(p[self.ix.t[s]].data.iter().map(|t| t.exp()));
            self.a[s].clear();
            self.a[s].extend(p[self.ix.r[s]].data.iter().map(|r| r.exp()));
        }
        match self.cfg.decoder_norm {
            DecoderNorm::Unit => {
                self.norms.clear();
                self.norms.resize(self.f, 1.0);
            }
            DecoderNorm::Penalty => c::row_norms(&p[self.ix.w_dec].data, self.d, &mut self.norms),
        }
    }

    fn gate<'a>(&'a self, th: &'a [Vec<f32>; 2], a: &'a [Vec<f32>; 2], train: bool) -> Gate<'a> {
        let p = &self.params;
        let banded = self.cfg.threshold_ste || self.cfg.sparsity == SparsityPenalty::L0;
        Gate {
            bg: &p[self.ix.b_gate].data,
            th: [&th[0], &th[1]],
            a: [&a[0], &a[1]],
            bm: [&p[self.ix.bm[0]].data, &p[self.ix.bm[1]].data],
            neg: self.cfg.negative_side,
            raw: self.cfg.output == OutputSign::Raw,
            half: (train && banded).then_some(0.5 * self.cfg.bandwidth),
        }
    }

    fn pre_sub(&self) -> Option<&[f32]> {
        self.cfg
            .pre_encoder_bias
            .then_some(&self.params[self.ix.b_dec].data[..])
    }

    /// θ_i ← quantile `q` of |π_i| over the first ≤ [`c::CHUNK`] tokens of `x` (step 0).
    fn calibrate_thresholds(&mut self, x: &[f32], n: usize, q: f32) {
        let (d, f) = (self.d, self.f);
        let rows = n.min(c::CHUNK);
        let mut xt = Vec::new();
        c::prepare_input(&x[..rows * d], d, self.pre_sub(), &mut xt);
        let mut pre = vec![0.0; rows * f];
        let p = &self.params;
        c::gemm_xwt(
            &xt,
            rows,
            d,
            &p[self.ix.w_enc].data,
            f,
            Some(&p[self.ix.b_gate].data),
            &mut pre,
        );
        let k = ((q as f64 * rows as f64) as usize).min(rows - 1);
        let mut col = vec![0.0f32; rows];
        let mut t = vec![0.0f32; f];
        for (i, ti) in t.iter_mut().enumerate() {
            for (b, v) in col.iter_mut().enumerate() {
                *v = pre[b * f + i].abs();
            }
            col.select_nth_unstable_by(k, f32::total_cmp);
            *ti = col[k].max(1e-6).ln();
        }
        for s in 0..2 {
            self.params[self.ix.t[s]].data.copy_from_slice(&t);
        }
    }

    /// Side of each main entry: from the sign of f (sign-consistent) or, for raw outputs,
    /// from the matching open-gate entry (both lists are in latent order per token).
    fn main_sides(&mut self, codes: &Codes, aux: &Codes) {
        self.side.clear();
        if self.cfg.output == OutputSign::SignConsistent {
            self.side.extend(codes.val.iter().map(|&v| (v < 0.0) as u8));
            return;
        }
        for b in 0..codes.n() {
            let (ai, av) = aux.row(b);
            let mut j = 0;
            for &i in codes.row(b).0 {
                while ai[j] != i {
                    j += 1;
                }
                self.side.push(aux_side(av[j]) as u8);
            }
        }
    }
}

impl Sae for SaGsae {
    fn arch(&self) -> &'static str {
        ARCH
    }
    fn config(&self) -> ArchConfig {
        ArchConfig::SaGsae(self.cfg.clone())
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
        let th = [0, 1].map(|s| p[self.ix.t[s]].data.iter().map(|t| t.exp()).collect());
        let a = [0, 1].map(|s| p[self.ix.r[s]].data.iter().map(|r| r.exp()).collect());
        let gate = self.gate(&th, &a, false);
        c::prepare_input(x, self.d, self.pre_sub(), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            self.d,
            &p[self.ix.w_enc].data,
            self.f,
            None,
            |_, row, buf| gate.row(row, buf, false),
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
        if let (0, Some(q)) = (input.step, self.cfg.init_threshold_quantile) {
            self.calibrate_thresholds(input.x, n, q);
        }
        let lambda = self.cfg.l1_coefficient * input.sparsity_scale;
        let (eps, half) = (self.cfg.bandwidth, 0.5 * self.cfg.bandwidth);
        let unit = self.cfg.decoder_norm == DecoderNorm::Unit;
        let l0 = self.cfg.sparsity == SparsityPenalty::L0;
        let ste = self.cfg.threshold_ste;
        self.derive();
        let ix = self.ix;
        // 1. u = W_enc x̃; active → codes (f), open gates → aux (s), closed band → aux (±0)
        {
            let (th, a) = (std::mem::take(&mut self.th), std::mem::take(&mut self.a));
            let gate = self.gate(&th, &a, true);
            c::prepare_input(input.x, d, self.pre_sub(), &mut ws.xt);
            c::encode_collect(
                ws,
                n,
                d,
                &self.params[ix.w_enc].data,
                f,
                None,
                |_, row, buf| gate.row(row, buf, true),
            );
            self.th = th;
            self.a = a;
        }
        let codes = std::mem::take(&mut ws.codes);
        let aux = std::mem::take(&mut ws.aux);
        self.main_sides(&codes, &aux);
        let p = &self.params;
        let w_dec = &p[ix.w_dec].data;
        let b_dec = &p[ix.b_dec].data;
        // 2. main reconstruction: g = 2(x̂ − x)/B, G = d_i·g on active (and, STE, aux) entries
        c::decode(
            &mut ws.scratch,
            &codes,
            w_dec,
            d,
            f,
            Some(b_dec),
            &mut ws.recon,
        );
        let sse = c::residual(&ws.recon, input.x, d, 2.0 / n as f32, &mut ws.resid);
        c::entry_dots(
            &mut ws.scratch,
            &codes,
            w_dec,
            d,
            f,
            &ws.resid,
            &mut ws.gvals,
        );
        if ste {
            c::entry_dots(
                &mut ws.scratch,
                &aux,
                w_dec,
                d,
                f,
                &ws.resid,
                &mut self.band_g,
            );
        }
        // 3. aux reconstruction through the gate: h = 2(x̂_aux − x)/B, A = d_i·h
        c::decode(
            &mut ws.scratch,
            &aux,
            w_dec,
            d,
            f,
            Some(b_dec),
            &mut ws.aux_recon,
        );
        let sse_aux = c::residual(&ws.aux_recon, input.x, d, 2.0 / n as f32, &mut ws.aux_resid);
        c::entry_dots(
            &mut ws.scratch,
            &aux,
            w_dec,
            d,
            f,
            &ws.aux_resid,
            &mut ws.aux_gvals,
        );
        // 4. magnitude path on active entries: ∂u = a_σ G, ∂r_σ = G (m − b_mag_σ), ∂b_mag_σ = G
        c::resize(&mut ws.coef, codes.nnz());
        for e in 0..codes.nnz() {
            let (i, s, g) = (codes.idx[e] as usize, self.side[e] as usize, ws.gvals[e]);
            ws.coef[e] = self.a[s][i] * g;
            let bm = p[ix.bm[s]].data[i];
            grads[ix.r[s]][i] += g * (codes.val[e] - bm);
            grads[ix.bm[s]][i] += g;
        }
        // 5. gate path on aux entries: ∂π (→ u, b_gate) and ∂θ (→ t = ln θ)
        if ste {
            for s in 0..2 {
                let (bg, bm) = (&p[ix.b_gate].data, &p[ix.bm[s]].data);
                self.jump[s].clear();
                self.jump[s].extend((0..f).map(|i| {
                    let u = if s == 0 {
                        self.th[0][i] - bg[i]
                    } else {
                        -self.th[1][i] - bg[i]
                    };
                    let m = self.a[s][i] * u + bm[i];
                    match (self.cfg.output, s) {
                        (OutputSign::Raw, _) => m,
                        (_, 0) => m.max(0.0),
                        _ => m.min(0.0),
                    }
                }));
            }
        }
        let lb = lambda / n as f32;
        let mut n_open = 0usize;
        let mut l1_sum = 0.0f64;
        c::resize(&mut ws.aux_coef, aux.nnz());
        for e in 0..aux.nnz() {
            let (i, sv) = (aux.idx[e] as usize, aux.val[e]);
            let side = aux_side(sv);
            let open = sv != 0.0;
            let sgn = if side == 0 { 1.0 } else { -1.0 };
            let a_val = ws.aux_gvals[e];
            let (mut dpi, mut dth) = (0.0f32, 0.0f32);
            if open {
                n_open += 1;
                if l0 {
                    dpi = a_val;
                } else {
                    dpi = sgn * lb * self.norms[i] + a_val;
                    l1_sum += (self.norms[i] * sv.abs()) as f64;
                }
                dth = -sgn * dpi;
            }
            let in_band = !open || sv.abs() < half;
            if in_band && (l0 || ste) {
                if l0 {
                    dth -= lb / eps;
                }
                if ste {
                    dth -= self.band_g[e] * self.jump[side][i] / eps;
                }
            }
            ws.aux_coef[e] = dpi;
            grads[ix.t[side]][i] += self.th[side][i] * dth;
        }
        // 6. encoder rows, b_gate
        c::accumulate_rows(
            &mut ws.scratch,
            &codes,
            &ws.coef,
            &ws.xt,
            d,
            f,
            &mut grads[ix.w_enc],
        );
        c::accumulate_rows(
            &mut ws.scratch,
            &aux,
            &ws.aux_coef,
            &ws.xt,
            d,
            f,
            &mut grads[ix.w_enc],
        );
        c::scatter_add(&aux, &ws.aux_coef, &mut grads[ix.b_gate]);
        // 7. decoder and b_dec
        c::accumulate_rows(
            &mut ws.scratch,
            &codes,
            &codes.val,
            &ws.resid,
            d,
            f,
            &mut grads[ix.w_dec],
        );
        c::col_sums(&ws.resid, n, d, &mut grads[ix.b_dec]);
        if !unit {
            // live decoder in the aux term, and the norm-weighted penalty λ/B Σ|s| d_i/‖d_i‖
            c::accumulate_rows(
                &mut ws.scratch,
                &aux,
                &aux.val,
                &ws.aux_resid,
                d,
                f,
                &mut grads[ix.w_dec],
            );
            let mut bsum = vec![0.0f32; d];
            c::col_sums(&ws.aux_resid, n, d, &mut bsum);
            grads[ix.b_dec]
                .iter_mut()
                .zip(&bsum)
                .for_each(|(g, v)| *g += v);
            if !l0 {
                c::resize(&mut ws.lat2, f);
                ws.lat2.fill(0.0);
                for (&i, &sv) in aux.idx.iter().zip(&aux.val) {
                    ws.lat2[i as usize] += sv.abs();
                }
                let gw = &mut grads[ix.w_dec];
                for i in 0..f {
                    let k = ws.lat2[i] * lb / self.norms[i].max(1e-12);
                    if k != 0.0 {
                        c::axpy(k, &w_dec[i * d..(i + 1) * d], &mut gw[i * d..(i + 1) * d]);
                    }
                }
            }
        }
        if self.cfg.pre_encoder_bias {
            c::resize(&mut ws.lat, f);
            ws.lat.fill(0.0);
            c::scatter_add(&codes, &ws.coef, &mut ws.lat);
            c::scatter_add(&aux, &ws.aux_coef, &mut ws.lat);
            ws.lat.iter_mut().for_each(|v| *v = -*v);
            c::add_weighted_rows(
                &mut ws.scratch,
                &ws.lat,
                &p[ix.w_enc].data,
                d,
                &mut grads[ix.b_dec],
            );
        }
        ws.codes = codes;
        ws.aux = aux;
        let mse = sse / n as f64;
        let sparsity = if l0 {
            lambda as f64 * n_open as f64 / n as f64
        } else {
            lambda as f64 * l1_sum / n as f64
        };
        let aux_loss = sse_aux / n as f64;
        Ok(StepOutput {
            loss: mse + sparsity + aux_loss,
            terms: vec![
                ("mse", mse),
                (if l0 { "l0_penalty" } else { "l1" }, sparsity),
                ("aux", aux_loss),
                ("revived", p[ix.revived].data[0] as f64),
            ],
        })
    }

    fn revive_dead(&mut self, steps_done: u64, dead: &[bool]) -> Vec<(usize, usize)> {
        let every = self.cfg.threshold_reset_every;
        if every == 0 || steps_done == 0 || !steps_done.is_multiple_of(every) {
            return Vec::new();
        }
        let ix = self.ix;
        let lt = self.cfg.init_threshold.ln();
        let mut reset = Vec::new();
        let mut count = 0usize;
        for (i, _) in dead.iter().enumerate().filter(|(_, &d)| d) {
            count += 1;
            let mut targets = vec![ix.t[0]];
            if ix.t[1] != ix.t[0] {
                targets.push(ix.t[1]);
            }
            if self.cfg.reset_b_gate {
                targets.push(ix.b_gate);
            }
            for pi in targets {
                self.params[pi].data[i] = if pi == ix.b_gate { 0.0 } else { lt };
                reset.push((pi, i));
            }
        }
        self.params[ix.revived].data[0] += count as f32;
        reset
    }

    fn init_from_sample(&mut self, x: &[f32], n: usize) -> Result<(), SaeError> {
        check_width(ARCH, self.d, x, n)?;
        if self.cfg.init_l0 == 0.0 {
            return Ok(());
        }
        let (d, f) = (self.d, self.f);
        // 1. θ_i: two-sided gates open on a share init_l0/d_sae of the sample's tokens
        let q = (1.0 - super::gated::init_l0(self.cfg.init_l0, d) / f as f32).clamp(0.0, 1.0);
        self.calibrate_thresholds(x, n, q);
        // 2. r = ln c, c the least-squares scale of x̂₀ = Σ f_i d_i (r = b_mag = 0)
        for s in 0..2 {
            self.params[self.ix.r[s]].data.fill(0.0);
        }
        let m = n.min(c::CHUNK);
        let mut ws = Workspace::default();
        self.encode(&x[..m * d], m, &mut ws)?;
        let mut r = Vec::new();
        c::decode(
            &mut ws.scratch,
            &ws.codes,
            &self.params[self.ix.w_dec].data,
            d,
            f,
            None,
            &mut r,
        );
        let mut xt = Vec::new();
        c::prepare_input(&x[..m * d], d, self.pre_sub(), &mut xt);
        if let Some(ln_c) = c::ln_lsq_scale(&r, &xt) {
            for s in 0..2 {
                self.params[self.ix.r[s]].data.fill(ln_c);
            }
        }
        Ok(())
    }

    fn export_parts(&self) -> ExportParts {
        let (d, f) = (self.d, self.f);
        let p = &self.params;
        let ix = self.ix;
        let th: [Vec<f32>; 2] = [0, 1].map(|s| {
            if s == 1 && !self.cfg.negative_side {
                vec![f32::INFINITY; f]
            } else {
                p[ix.t[s]].data.iter().map(|t| t.exp()).collect()
            }
        });
        let raw = self.cfg.output == OutputSign::Raw;
        if !self.cfg.tied_magnitudes {
            return ExportParts {
                architecture: ARCH,
                w_enc: p[ix.w_enc].data.clone(),
                w_dec: p[ix.w_dec].data.clone(),
                b_dec: p[ix.b_dec].data.clone(),
                per_latent: vec![
                    ("b_gate", p[ix.b_gate].data.clone(), Fold::ByDecoderNorm),
                    ("threshold_pos", th[0].clone(), Fold::ByDecoderNorm),
                    ("threshold_neg", th[1].clone(), Fold::ByDecoderNorm),
                    ("r_mag_pos", p[ix.r[0]].data.clone(), Fold::Keep),
                    ("r_mag_neg", p[ix.r[1]].data.clone(), Fold::Keep),
                    ("b_mag_pos", p[ix.bm[0]].data.clone(), Fold::ByDecoderNorm),
                    ("b_mag_neg", p[ix.bm[1]].data.clone(), Fold::ByDecoderNorm),
                ],
                apply_b_dec_to_input: self.cfg.pre_encoder_bias,
                extra_cfg: vec![("sign_consistent", serde_json::Value::Bool(!raw))],
            };
        }
        // Bi-Jump-ReLU (§6.3): m = W'x + b', f = m (1[m > τ⁺] + 1[m < τ⁻]).
        let (w, bg, bm, r) = (
            &p[ix.w_enc].data,
            &p[ix.b_gate].data,
            &p[ix.bm[0]].data,
            &p[ix.r[0]].data,
        );
        let bd = &p[ix.b_dec].data;
        let mut w2 = w.clone();
        let mut b2 = bm.clone();
        let mut tp = vec![0.0; f];
        let mut tn = vec![0.0; f];
        for i in 0..f {
            let a = r[i].exp();
            let row = &mut w2[i * d..(i + 1) * d];
            if self.cfg.pre_encoder_bias {
                b2[i] -= a * c::dot(row, bd);
            }
            row.iter_mut().for_each(|v| *v *= a);
            let up = a * (th[0][i] - bg[i]) + bm[i];
            let un = if self.cfg.negative_side {
                a * (-th[1][i] - bg[i]) + bm[i]
            } else {
                f32::NEG_INFINITY
            };
            (tp[i], tn[i]) = if raw {
                (up, un)
            } else {
                (up.max(0.0), un.min(0.0))
            };
        }
        ExportParts {
            architecture: EXPORT_BI_JUMPRELU,
            w_enc: w2,
            w_dec: p[ix.w_dec].data.clone(),
            b_dec: bd.clone(),
            per_latent: vec![
                ("b_enc", b2, Fold::ByDecoderNorm),
                ("threshold_pos", tp, Fold::ByDecoderNorm),
                ("threshold_neg", tn, Fold::ByDecoderNorm),
            ],
            apply_b_dec_to_input: false,
            extra_cfg: vec![],
        }
    }
}

#[cfg(test)]
mod tests;
