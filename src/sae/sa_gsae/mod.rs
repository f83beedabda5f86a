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
//! `revived` (so it survives checkpoints) and is logged as the metric `revived`.
//!
//! Files: this one (config, parameters, `impl Sae`), `gate.rs` (the per-token gate),
//! `train.rs` (the training step), `export.rs` (export and its two formats), `tests.rs`.

use serde::{Deserialize, Serialize};

mod export;
mod gate;
mod tensor_step;
mod train;

use gate::aux_side;

use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Fold, Param, Sae, SaeError, StepInput,
    StepOutput, Variant,
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

/// The registration (see [`super::registry`]).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || Config::default().into(),
    formats: export::FORMATS,
};

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        Ok(Box::new(SaGsae::new(self.clone(), d, f, rng)?))
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
    /// mlp_out, 4×, λ 3: R² 0.688 at L0 85, no dead latents).
    fn recommended_adam(&self, _d_sae: usize, steps: u64) -> (f32, f32, f32) {
        (crate::sae::registry::budget_lr(3e-4, 1e-3, steps), 0.0, 0.999)
    }
    fn problems(&self, _d_sae: Option<usize>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        crate::sae::registry::check_nonneg(&mut out, "l1_coefficient", self.l1_coefficient);
        crate::sae::registry::check_positive(&mut out, "bandwidth", self.bandwidth);
        crate::sae::registry::check_positive(&mut out, "init_threshold", self.init_threshold);
        crate::sae::registry::check_nonneg(&mut out, "init_l0", self.init_l0);
        if let Some(q) = self.init_threshold_quantile.filter(|q| !(*q > 0.0 && *q < 1.0)) {
            out.push(("init_threshold_quantile", format!("{q} must be in (0, 1)")));
        }
        out
    }
    /// Every option (`init_threshold_quantile`: `tensor_step.rs`).
    fn supports_tensor(&self) -> bool {
        true
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
    /// `init_threshold_quantile` on the tensor backend: the log-thresholds calibrated by
    /// the step-0 tensor forward, installed by [`Sae::update_state`] (`tensor_step.rs`).
    calibrated: std::sync::Mutex<Option<Vec<f32>>>,
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
            calibrated: std::sync::Mutex::new(None),
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

    fn pre_sub(&self) -> Option<&[f32]> {
        self.cfg
            .pre_encoder_bias
            .then_some(&self.params[self.ix.b_dec].data[..])
    }

}

impl Sae for SaGsae {
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
        self.train_step(input, grads, ws)
    }

    fn tensor_forward(
        &self,
        params: &[candle_core::Tensor],
        input: &crate::sae::tensor::TensorInput,
    ) -> Result<crate::sae::tensor::TensorForward, SaeError> {
        self.tensor_calibrated_step(params, input)
            .map_err(|e| SaeError::tensor(ARCH, e))
    }

    /// Device-resident unless `init_threshold_quantile` is set: the `revived` counter is
    /// [`Sae::revive_dead`]'s, and the step-0 calibration is installed by
    /// [`Sae::update_state`] on the host round trip.
    fn tensor_state_resident(&self) -> bool {
        self.cfg.init_threshold_quantile.is_none()
    }

    /// Installs the thresholds a step-0 tensor forward calibrated
    /// (`init_threshold_quantile`); nothing else of SA-GSAE is state.
    fn update_state(&mut self, input: &StepInput, _ws: &Workspace) {
        let cal = self
            .calibrated
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let (0, Some(t)) = (input.step, cal) {
            for s in 0..2 {
                self.params[self.ix.t[s]].data.copy_from_slice(&t);
            }
        }
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
        self.export()
    }
}

#[cfg(test)]
mod tests;
