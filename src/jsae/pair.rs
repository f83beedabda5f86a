//! A Jacobian SAE pair: two TopK SAEs around one MLP, trained jointly with the Jacobian
//! sparsity penalty (`../shared/specs/jsae_pamsgd.md` §1.1–§1.5, §1.10).
//!
//! ```text
//! x' = c_x x,  y' = c_y y          fixed scalars with E‖x'‖ = √d (spec §1.8)
//! L = ‖x' − x̂'‖²/B + ‖y' − ŷ'‖²/B + λ_t · d/(B k²) · Σ_t Σ_{j,i} |J_t[j, i]|
//! λ_t = λ · min(1, (t+1)/T_λ),     T_λ = 5% of the steps
//! ```
//!
//! Each SAE is the crate's TopK variant (`crate::sae::topk`): ReLU∘TopK, unit-norm decoder
//! rows, `W_enc = W_decᵀ` at init, its exact backward pass. AuxK is off (coefficient 0, as
//! in the authors' code). The Jacobian term and its gradient come from [`super::jacobian`].
//!
//! The pair is a [`Model`] of the training engine (`crate::train::Trainer`), which does
//! everything else as for any SAE: input scales, `b_dec` init, Adam, unit-norm decoders,
//! clipping, schedules (λ warms up with the engine's sparsity warmup), checkpoints.
//!
//! Decision: the losses use the crate's SumD-MeanB convention (`‖·‖²` summed over `d`,
//! averaged over tokens) instead of the spec's element-wise mean; the Jacobian coefficient
//! is multiplied by `d` so that the ratio of the terms, hence λ, means the same as in the
//! authors' code (`λ ≈ 0.5 k²/d`).
//! Decision: the TopK SAEs subtract `b_dec` before encoding (`apply_b_dec_to_input = true`)
//! where the authors' SAEs do not; this moves no Jacobian entry (`∂s_y/∂y = W_enc` either
//! way) and lets the exported SAEs be the crate's standard TopK ones.
//! Decision: `b_dec` starts at the mean of the init sample (the spec's code uses 0);
//! `b_dec_init = "zeros"` restores that.
//! Decision: the Jacobian is evaluated at the true MLP input by default (`jac_at =
//! "true_input"`, the authors' training and offline evaluation: gains at `x`, output
//! latents `A_y` = TopK of the output SAE on the true `y`); `"reconstruction"` is the
//! paper's `e_y∘f∘d_x` at the reconstruction: gains at `x̂`, and `A_y` re-selected as TopK
//! of the output SAE on `f(x̂)`; `"reconstruction_true_latents"` keeps the gains at `x̂` but
//! `A_y` of the true `y` (a hybrid, kept only to compare with runs made before the
//! re-selection).
//! Decision: the evaluation's Jacobian statistics ([`JsaePair::evaluate`], hence the
//! metrics rows) and the training step's `jac_*` metrics are in the units of the exported
//! SAELens folders: `J_export = J / r` with `r = c_y/c_x` (the export folds `c` into the
//! weights, which rescales each SAE's codes by `1/c`), so `J` recomputed from the exported
//! `W_enc`/`b_enc`/`W_dec`/`b_dec` and the model's MLP is the number we report. The loss
//! and its gradient stay in the scaled (training) units, which is what λ is tuned for.

use serde::{Deserialize, Serialize};

use candle_core::{DType, Tensor};

use super::jacobian::{self, JacGrads, JacStats, JacTables};
use super::tensor::{self as jt, DeviceMlp};
use crate::eval::{ReconStats, SparsityStats};
use crate::models::MlpWeights;
use crate::sae::tensor::TensorInput;
use crate::sae::topk::{self, TopK};
use crate::sae::{Sae, SaeError, StepInput, Workspace};
use crate::train::model::TensorStep;
use crate::train::tensor::TensorBackend;
use crate::train::{Model, ModelOutput, StepCtx, TrainError};
use crate::util::rng::Rng;

/// Where the MLP gains of the Jacobian are evaluated (spec §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JacAt {
    /// At the true MLP input `x` (the authors' training and offline evaluation).
    #[default]
    TrueInput,
    /// The paper's `e_y∘f∘d_x` at the input SAE's reconstruction `x̂`: MLP gains at `x̂`,
    /// output latents re-selected as TopK of the output SAE on `f(x̂)`.
    Reconstruction,
    /// MLP gains at `x̂`, but the output latents chosen on the true MLP output `y` (the
    /// behaviour of `"reconstruction"` before issue 17; not the paper's definition).
    ReconstructionTrueLatents,
}

impl JacAt {
    /// Whether the MLP gains are taken at the reconstruction `x̂`.
    pub fn at_reconstruction(self) -> bool {
        self != JacAt::TrueInput
    }
}

/// One token's Jacobian block: input-SAE latents, output-SAE latents, `[k_out, k_in]` values.
pub type TokenJacobian = (Vec<u32>, Vec<u32>, Vec<f32>);

/// What makes a pair (the engine's `[train]` settings do the rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairConfig {
    /// Active latents per token of both SAEs.
    pub k: usize,
    /// Latents of each SAE.
    pub d_sae: usize,
    /// Jacobian coefficient λ (0: a plain TopK pair trained on the same data).
    pub lambda: f32,
    /// Where the Jacobian is evaluated.
    pub jac_at: JacAt,
    /// Adam learning rate when the training config sets none (the authors' 5e-4).
    pub lr: f32,
    /// Seed of both SAEs' initialisation.
    pub seed: u64,
}

/// Errors of a pair.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// An SAE rejected its configuration or input.
    #[error(transparent)]
    Sae(#[from] SaeError),
    /// Data of the wrong shape.
    #[error("JSAE pair: {0}")]
    Shape(String),
}

impl From<PairError> for TrainError {
    fn from(e: PairError) -> Self {
        match e {
            PairError::Sae(s) => TrainError::Sae(s),
            PairError::Shape(s) => TrainError::Config(format!("JSAE pair: {s}")),
        }
    }
}

/// Accumulated evaluation of a pair.
#[derive(Debug, Clone)]
pub struct PairEval {
    /// Input SAE reconstruction (raw activation space).
    pub recon_x: ReconStats,
    /// Output SAE reconstruction.
    pub recon_y: ReconStats,
    /// Input SAE sparsity.
    pub sparsity_x: SparsityStats,
    /// Output SAE sparsity.
    pub sparsity_y: SparsityStats,
    /// Jacobian sparsity.
    pub jac: JacStats,
}

/// A JSAE pair: two TopK SAEs around an MLP.
pub struct JsaePair {
    cfg: PairConfig,
    mlp: MlpWeights,
    /// Input SAE (on `mlp_in`).
    pub sae_x: TopK,
    /// Output SAE (on `mlp_out`).
    pub sae_y: TopK,
    /// `c_x` (set by the engine).
    pub scale_x: f32,
    /// `c_y` (set by the engine).
    pub scale_y: f32,
    ws: [Workspace; 2],
    jg: JacGrads,
    xs: Vec<f32>,
    gains: Vec<f32>,
    raw: Vec<f32>,
    fy: Vec<f32>,
    /// The MLP on the tensor backend's device (uploaded at its first tensor step).
    dev_mlp: Option<DeviceMlp>,
}

fn scaled(x: &[f32], s: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend(x.iter().map(|v| v * s));
}

impl JsaePair {
    /// A fresh pair around `mlp` (both SAEs initialised from `cfg.seed`, input first).
    pub fn new(cfg: PairConfig, mlp: MlpWeights) -> Result<Self, PairError> {
        let d = mlp.d;
        let mut rng = Rng::new(cfg.seed);
        let tk = topk::Config {
            k: cfg.k,
            aux_k: None,
            aux_coefficient: 0.0,
        };
        let sae_x = TopK::new(tk.clone(), d, cfg.d_sae, &mut rng)?;
        let sae_y = TopK::new(tk, d, cfg.d_sae, &mut rng)?;
        Ok(Self {
            ws: [Workspace::default(), Workspace::default()],
            sae_x,
            sae_y,
            scale_x: 1.0,
            scale_y: 1.0,
            cfg,
            mlp,
            jg: JacGrads::default(),
            xs: Vec::new(),
            gains: Vec::new(),
            raw: Vec::new(),
            fy: Vec::new(),
            dev_mlp: None,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PairConfig {
        &self.cfg
    }

    /// The MLP the pair sits around.
    pub fn mlp(&self) -> &MlpWeights {
        &self.mlp
    }

    /// This step's path-P tables from the current decoder of the input SAE and encoder of
    /// the output SAE.
    fn tables(&self) -> JacTables {
        let f = self.cfg.d_sae;
        JacTables::build(&self.mlp, self.sae_x.w_dec(), f, self.sae_y.w_enc(), f)
    }

    /// `r = c_y / c_x`: the factor that puts `J` in the SAE latents' units.
    fn ratio(&self) -> f32 {
        self.scale_y / self.scale_x
    }

    fn k2(&self) -> f64 {
        (self.cfg.k * self.cfg.k) as f64
    }

    /// The paper's output latents at the reconstruction: encode `f(x̂)` (raw `x̂: [n, d]` in
    /// `self.raw`) with the output SAE into `self.ws[1]`, whose codes are then TopK of
    /// `encode(c_y · MLP(x̂))`.
    fn select_y_at_mlp_of_raw(&mut self, n: usize) -> Result<(), PairError> {
        jacobian::mlp_outputs(&self.mlp, &self.raw, n, &mut self.fy);
        scaled(&self.fy, self.scale_y, &mut self.xs);
        self.sae_y.encode(&self.xs, n, &mut self.ws[1])?;
        Ok(())
    }
}

impl Model for JsaePair {
    fn name(&self) -> &'static str {
        "jsae_pair"
    }
    fn n_saes(&self) -> usize {
        2
    }
    fn sae(&self, i: usize) -> &dyn Sae {
        if i == 0 {
            &self.sae_x
        } else {
            &self.sae_y
        }
    }
    fn sae_mut(&mut self, i: usize) -> &mut dyn Sae {
        if i == 0 {
            &mut self.sae_x
        } else {
            &mut self.sae_y
        }
    }
    fn config_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.cfg).unwrap_or(serde_json::Value::Null)
    }
    fn recommended_adam(&self, _steps: u64) -> (f32, f32, f32) {
        (self.cfg.lr, 0.9, 0.999)
    }
    fn set_scales(&mut self, scales: &[f32]) {
        if let [x, y] = scales {
            self.scale_x = *x;
            self.scale_y = *y;
        }
    }
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn supports_tensor(&self) -> bool {
        true
    }
    fn tensor_resident(&self) -> bool {
        true
    }
    fn forward_backward_tensor(
        &mut self,
        ctx: &StepCtx,
        grads: &mut [Vec<Vec<f32>>],
        ws: &mut [Workspace],
        backend: &TensorBackend,
    ) -> Result<ModelOutput, TrainError> {
        crate::train::model::round_trip(self, ctx, grads, ws, backend)
    }

    /// [`Model::forward_backward`] on tensors: both SAEs' tensor forwards, then the
    /// Jacobian term of [`super::tensor::penalty`] (its gradient by autograd) at the point
    /// and with the output latents `jac_at` says.
    fn tensor_step(
        &mut self,
        ctx: &StepCtx,
        x: &[Tensor],
        params: &[Vec<Tensor>],
        _ws: &mut [Workspace],
    ) -> Result<TensorStep, TrainError> {
        let terr = |e| TrainError::Sae(SaeError::tensor("jsae_pair", e));
        let (d, n) = (self.mlp.d, ctx.n);
        let input = |x| TensorInput {
            x,
            n,
            step: ctx.step,
            sparsity_scale: 1.0,
            dead: &[],
            gemm: ctx.gemm,
        };
        let out_x = self.sae_x.tensor_forward(&params[0], &input(&x[0]))?;
        self.sae_x.tensor_update_state(&out_x.codes)?;
        let out_y = self.sae_y.tensor_forward(&params[1], &input(&x[1]))?;
        self.sae_y.tensor_update_state(&out_y.codes)?;
        let dev = x[0].device().clone();
        let sum = |ls: &[(&'static str, Tensor)]| -> Result<Tensor, TrainError> {
            let mut t = Tensor::zeros((), DType::F32, &dev).map_err(terr)?;
            for (_, l) in ls {
                t = (t + l.to_dtype(DType::F32).map_err(terr)?).map_err(terr)?;
            }
            Ok(t)
        };
        let (mse_x, mse_y) = (sum(&out_x.losses)?, sum(&out_y.losses)?);
        let mut metrics = Vec::new();
        let jac_loss = if self.cfg.lambda == 0.0 {
            Tensor::zeros((), DType::F32, &dev).map_err(terr)?
        } else {
            if !self
                .dev_mlp
                .as_ref()
                .is_some_and(|m| m.device().same_device(&dev))
            {
                self.dev_mlp = Some(DeviceMlp::new(&self.mlp, &dev).map_err(terr)?);
            }
            let Some(mlp) = self.dev_mlp.as_ref() else {
                return Err(TrainError::Config("JSAE pair: no device MLP".into()));
            };
            let find = |s: &dyn Sae, name: &str| {
                s.params()
                    .iter()
                    .position(|p| p.name == name)
                    .ok_or_else(|| {
                        TrainError::Config(format!("JSAE pair: the TopK SAE has no `{name}`"))
                    })
            };
            let w_dec_x = &params[0][find(&self.sae_x, "W_dec")?];
            let b_dec_x = &params[0][find(&self.sae_x, "b_dec")?];
            let w_enc_y = &params[1][find(&self.sae_y, "W_enc")?];
            let at = self.cfg.jac_at;
            let selected;
            let (gains, codes_y) = if at.at_reconstruction() {
                // x̂ in raw units, detached (the gains depend on data only)
                let raw_hat = out_x
                    .codes
                    .matmul(&w_dec_x.detach())
                    .and_then(|r| r.broadcast_add(&b_dec_x.detach()))
                    .and_then(|r| r.affine(1.0 / self.scale_x as f64, 0.0))
                    .map_err(terr)?;
                let gains = mlp.gains(&raw_hat).map_err(terr)?;
                if at == JacAt::Reconstruction {
                    let ys = mlp
                        .forward(&raw_hat)
                        .and_then(|y| y.affine(self.scale_y as f64, 0.0))
                        .map_err(terr)?;
                    let detached: Vec<Tensor> = params[1].iter().map(|p| p.detach()).collect();
                    selected = self.sae_y.tensor_forward(&detached, &input(&ys))?.codes;
                    (gains, &selected)
                } else {
                    (gains, &out_y.codes)
                }
            } else {
                let raw = Tensor::from_slice(ctx.raw[0], (n, d), &dev).map_err(terr)?;
                (mlp.gains(&raw).map_err(terr)?, &out_y.codes)
            };
            let lam = self.cfg.lambda * ctx.sparsity_scale;
            let coef = lam * d as f32 / (n as f64 * self.k2()) as f32;
            let p = jt::penalty(
                mlp,
                w_dec_x,
                w_enc_y,
                &out_x.codes,
                codes_y,
                &gains,
                self.cfg.k,
                self.ratio(),
                coef,
            )
            .map_err(terr)?;
            let denom = (n as f64 * self.k2()).max(1.0);
            let host = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .and_then(|t| t.to_scalar::<f64>())
                    .map_err(terr)
            };
            metrics.extend([
                ("jac_mean_abs", host(&p.sum_abs_export)? / denom),
                ("jac_frac_0_01", host(&p.above_0_01)? / denom),
            ]);
            p.loss
        };
        Ok(TensorStep {
            losses: vec![("mse_x", mse_x), ("mse_y", mse_y), ("jacobian", jac_loss)],
            metrics,
            codes: vec![out_x.codes, out_y.codes],
        })
    }

    /// Both SAEs' reconstruction losses and gradients, then the Jacobian term on the active
    /// blocks with λ·(the engine's sparsity warmup).
    fn forward_backward(
        &mut self,
        ctx: &StepCtx,
        grads: &mut [Vec<Vec<f32>>],
        ws: &mut [Workspace],
    ) -> Result<ModelOutput, TrainError> {
        let (d, n) = (self.mlp.d, ctx.n);
        // 1. Both SAEs' reconstruction losses, gradients and active sets.
        let input_x = StepInput {
            x: &ctx.inputs[0],
            n,
            step: ctx.step,
            sparsity_scale: 1.0,
            dead: &[],
        };
        let input_y = StepInput {
            x: &ctx.inputs[1],
            ..input_x
        };
        let (wx, wy) = ws.split_at_mut(1);
        let (gx, gy) = grads.split_at_mut(1);
        let out_x = self
            .sae_x
            .forward_backward(&input_x, &mut gx[0], &mut wx[0])?;
        self.sae_x.update_state(&input_x, &wx[0]);
        let out_y = self
            .sae_y
            .forward_backward(&input_y, &mut gy[0], &mut wy[0])?;
        self.sae_y.update_state(&input_y, &wy[0]);
        // 2. The Jacobian term on the active blocks (skipped for the plain pair, λ = 0:
        //    the pair's training is then two independent TopK SAEs).
        let mut stats = JacStats::new(self.cfg.k, self.cfg.k);
        let jac_loss = if self.cfg.lambda == 0.0 {
            stats.sum_abs = f64::NAN;
            0.0
        } else {
            // Gains at x, or at x̂; the output latents of the true y, or (the paper's
            // reconstruction) re-selected on f(x̂) into self.ws[1].
            let at = self.cfg.jac_at;
            if at.at_reconstruction() {
                scaled(&wx[0].recon, 1.0 / self.scale_x, &mut self.raw);
                jacobian::gains_of(&self.mlp, &self.raw, n, &mut self.gains);
                if at == JacAt::Reconstruction {
                    self.select_y_at_mlp_of_raw(n)?;
                }
            } else {
                jacobian::gains_of(&self.mlp, ctx.raw[0], n, &mut self.gains);
            }
            let codes_y = if at == JacAt::Reconstruction {
                &self.ws[1].codes
            } else {
                &wy[0].codes
            };
            let lam = self.cfg.lambda * ctx.sparsity_scale;
            let coef = lam * d as f32 / (n as f64 * self.k2()) as f32;
            let tables = self.tables();
            let r = self.ratio();
            let sum_j = jacobian::penalty_step(
                &self.mlp,
                &tables,
                &wx[0].codes,
                codes_y,
                &self.gains,
                r,
                coef,
                TopK::grad_w_dec(&mut gx[0]),
                TopK::grad_w_enc(&mut gy[0]),
                &mut self.jg,
                &mut stats,
            );
            coef as f64 * sum_j
        };
        let jac_frac = if self.cfg.lambda == 0.0 {
            f64::NAN
        } else {
            stats.frac_above(0.01)
        };
        let mut metrics = Vec::new();
        if self.cfg.lambda != 0.0 {
            metrics.extend([
                ("jac_mean_abs", stats.mean_abs()),
                ("jac_frac_0_01", jac_frac),
            ]);
        }
        Ok(ModelOutput {
            loss: out_x.loss + out_y.loss + jac_loss,
            losses: vec![
                ("mse_x", out_x.loss),
                ("mse_y", out_y.loss),
                ("jacobian", jac_loss),
            ],
            metrics,
        })
    }
}

impl JsaePair {
    /// A fresh evaluation accumulator.
    pub fn new_eval(&self) -> PairEval {
        let (d, f) = (self.mlp.d, self.cfg.d_sae);
        PairEval {
            recon_x: ReconStats::new(d),
            recon_y: ReconStats::new(d),
            sparsity_x: SparsityStats::new(f),
            sparsity_y: SparsityStats::new(f),
            jac: JacStats::new(self.cfg.k, self.cfg.k),
        }
    }

    /// Encode and decode raw rows `x: [n, d]` with SAE `side` (0 input, 1 output); the codes
    /// stay in the workspace and the raw reconstruction is written to `out`.
    pub fn reconstruct(
        &mut self,
        side: usize,
        x: &[f32],
        n: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), PairError> {
        let (sae, s) = if side == 0 {
            (&self.sae_x, self.scale_x)
        } else {
            (&self.sae_y, self.scale_y)
        };
        scaled(x, s, &mut self.xs);
        let ws = &mut self.ws[side];
        sae.encode(&self.xs, n, ws)?;
        let codes = std::mem::take(&mut ws.codes);
        sae.decode(&codes, out, ws);
        ws.codes = codes;
        out.iter_mut().for_each(|v| *v /= s);
        Ok(())
    }

    /// Add `n` held-out paired raw rows to `acc`: both SAEs' reconstruction and sparsity and
    /// the Jacobian sparsity of the frozen pair (tables built once per call).
    pub fn evaluate(
        &mut self,
        x: &[f32],
        y: &[f32],
        n: usize,
        acc: &mut PairEval,
    ) -> Result<(), PairError> {
        let mut rx = Vec::new();
        let mut ry = Vec::new();
        self.reconstruct(0, x, n, &mut rx)?;
        self.reconstruct(1, y, n, &mut ry)?;
        acc.recon_x.update(x, &rx);
        acc.recon_y.update(y, &ry);
        acc.sparsity_x.update(&self.ws[0].codes);
        acc.sparsity_y.update(&self.ws[1].codes);
        self.jacobian_inputs(x, &rx, n)?;
        let tables = self.tables();
        let gw = self.mlp.n_proj() * self.mlp.h;
        // r = 1, not c_y/c_x: J / (c_y/c_x) is J in the units of the exported SAEs (module
        // docs), the units of every reported Jacobian figure.
        jacobian::accumulate_stats(
            &tables,
            &self.ws[0].codes,
            &self.ws[1].codes,
            &self.gains,
            gw,
            1.0,
            &mut acc.jac,
        );
        Ok(())
    }

    /// After [`Self::reconstruct`] of both sides on raw `x` (reconstruction `rx`) and `y`:
    /// the gains where `jac_at` takes them, and, for the paper's reconstruction, the output
    /// codes in `self.ws[1]` re-selected on `f(x̂)`.
    fn jacobian_inputs(&mut self, x: &[f32], rx: &[f32], n: usize) -> Result<(), PairError> {
        let at = self.cfg.jac_at;
        let gx = if at.at_reconstruction() { rx } else { x };
        jacobian::gains_of(&self.mlp, gx, n, &mut self.gains);
        if at == JacAt::Reconstruction {
            self.raw.clear();
            self.raw.extend_from_slice(rx);
            self.select_y_at_mlp_of_raw(n)?;
        }
        Ok(())
    }

    /// The Jacobian blocks of `n` raw rows as computed in training (for tests): per token,
    /// `(A_x, A_y, J)` with `J[j·|A_x| + i]`, at the point and with the output latents
    /// `jac_at` says, in the scaled (training) units (`J_export = J / (c_y/c_x)`).
    pub fn blocks(
        &mut self,
        x: &[f32],
        y: &[f32],
        n: usize,
    ) -> Result<Vec<TokenJacobian>, PairError> {
        let mut rx = Vec::new();
        self.reconstruct(0, x, n, &mut rx)?;
        let mut ry = Vec::new();
        self.reconstruct(1, y, n, &mut ry)?;
        self.jacobian_inputs(x, &rx, n)?;
        let tables = self.tables();
        let gw = self.mlp.n_proj() * self.mlp.h;
        let (mut m, mut j) = (Vec::new(), Vec::new());
        let mut out = Vec::with_capacity(n);
        for t in 0..n {
            let (ax, _) = self.ws[0].codes.row(t);
            let (ay, _) = self.ws[1].codes.row(t);
            tables.block(
                ax,
                ay,
                &self.gains[t * gw..(t + 1) * gw],
                self.ratio(),
                &mut m,
                &mut j,
            );
            out.push((ax.to_vec(), ay.to_vec(), j.clone()));
        }
        Ok(out)
    }
}
