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
//! "true_input"`, the authors' training and offline evaluation); `"reconstruction"`
//! evaluates the MLP gains at `x̂`.

use serde::{Deserialize, Serialize};

use super::jacobian::{self, JacGrads, JacStats, JacTables};
use crate::eval::{ReconStats, SparsityStats};
use crate::kernels as c;
use crate::models::MlpWeights;
use crate::sae::topk::{self, TopK};
use crate::sae::{Sae, SaeError, StepInput, Workspace};
use crate::train::optim::{self, Adam};
use crate::util::rng::Rng;

/// Where the MLP gains of the Jacobian are evaluated (spec §1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum JacAt {
    /// At the true MLP input `x` (the authors' training and offline evaluation).
    #[default]
    TrueInput,
    /// At the input SAE's reconstruction `x̂` (the paper's definition).
    Reconstruction,
}

/// One token's Jacobian block: input-SAE latents, output-SAE latents, `[k_out, k_in]` values.
pub type TokenJacobian = (Vec<u32>, Vec<u32>, Vec<f32>);

/// How a pair is trained.
#[derive(Debug, Clone, PartialEq)]
pub struct PairConfig {
    /// Active latents per token of both SAEs.
    pub k: usize,
    /// Latents of each SAE.
    pub d_sae: usize,
    /// Jacobian coefficient λ (0: a plain TopK pair trained on the same data).
    pub lambda: f32,
    /// Steps of the linear λ warmup.
    pub lambda_warmup_steps: u64,
    /// Where the Jacobian is evaluated.
    pub jac_at: JacAt,
    /// Adam.
    pub adam: Adam,
    /// Steps of linear LR warmup.
    pub lr_warmup_steps: u64,
    /// Fraction of the steps over which the LR decays linearly to 0 at the end.
    pub lr_decay_frac: f32,
    /// Global gradient-norm clip over both SAEs (0: off).
    pub grad_clip: f32,
    /// Start `b_dec` at the mean of the init sample (else 0).
    pub b_dec_mean: bool,
    /// Scale both sides so that E‖x‖ = √d.
    pub scale_inputs: bool,
    /// Total optimiser steps (for the schedules).
    pub total_steps: u64,
    /// Seed of both SAEs' initialisation.
    pub seed: u64,
}

/// Errors of pair training.
#[derive(Debug, thiserror::Error)]
pub enum PairError {
    /// An SAE rejected its configuration or input.
    #[error(transparent)]
    Sae(#[from] SaeError),
    /// Data of the wrong shape.
    #[error("JSAE pair: {0}")]
    Shape(String),
    /// Training diverged.
    #[error(
        "JSAE pair: non-finite {what} at step {step}; lower train.optimizer.lr or jsae.lambda"
    )]
    NonFinite {
        /// What went non-finite.
        what: &'static str,
        /// Step.
        step: u64,
    },
}

/// What one training step reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairStep {
    /// Total loss.
    pub loss: f64,
    /// Input-SAE reconstruction term.
    pub mse_x: f64,
    /// Output-SAE reconstruction term.
    pub mse_y: f64,
    /// Mean `|J|` over the `k²` entries per token (NaN for a plain pair, λ = 0, whose
    /// training does not compute J; evaluate it with [`JsaePair::evaluate`]).
    pub jac_mean_abs: f64,
    /// Share of `|J|` above 0.01 (NaN for a plain pair).
    pub jac_frac: f64,
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

/// A JSAE pair with its optimiser state.
pub struct JsaePair {
    cfg: PairConfig,
    mlp: MlpWeights,
    /// Input SAE (on `mlp_in`).
    pub sae_x: TopK,
    /// Output SAE (on `mlp_out`).
    pub sae_y: TopK,
    /// `c_x`.
    pub scale_x: f32,
    /// `c_y`.
    pub scale_y: f32,
    step: u64,
    grads: [Vec<Vec<f32>>; 2],
    m: [Vec<Vec<f32>>; 2],
    v: [Vec<Vec<f32>>; 2],
    ws: [Workspace; 2],
    jg: JacGrads,
    xs: Vec<f32>,
    ys: Vec<f32>,
    gains: Vec<f32>,
    raw: Vec<f32>,
}

fn scale_of(x: &[f32], d: usize) -> f32 {
    let n = x.len() / d;
    if n == 0 {
        return 1.0;
    }
    let mean_norm: f64 = x
        .chunks(d)
        .map(|r| (c::dot(r, r) as f64).sqrt())
        .sum::<f64>()
        / n as f64;
    if mean_norm > 0.0 {
        ((d as f64).sqrt() / mean_norm) as f32
    } else {
        1.0
    }
}

fn scaled(x: &[f32], s: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend(x.iter().map(|v| v * s));
}

impl JsaePair {
    /// A fresh pair around `mlp`, its input scales and `b_dec` from the init sample
    /// `init_x`, `init_y` (`[n, d]` raw `mlp_in` / `mlp_out` rows).
    pub fn new(
        cfg: PairConfig,
        mlp: MlpWeights,
        init_x: &[f32],
        init_y: &[f32],
    ) -> Result<Self, PairError> {
        let d = mlp.d;
        if init_x.len() != init_y.len() || init_x.is_empty() || !init_x.len().is_multiple_of(d) {
            return Err(PairError::Shape(format!(
                "the init samples must be non-empty [n, {d}] rows of equal length (got {} and {} floats)",
                init_x.len(),
                init_y.len()
            )));
        }
        let mut rng = Rng::new(cfg.seed);
        let tk = topk::Config {
            k: cfg.k,
            aux_k: None,
            aux_coefficient: 0.0,
        };
        let mut sae_x = TopK::new(tk.clone(), d, cfg.d_sae, &mut rng)?;
        let mut sae_y = TopK::new(tk, d, cfg.d_sae, &mut rng)?;
        let (scale_x, scale_y) = if cfg.scale_inputs {
            (scale_of(init_x, d), scale_of(init_y, d))
        } else {
            (1.0, 1.0)
        };
        if cfg.b_dec_mean {
            for (sae, x, s) in [(&mut sae_x, init_x, scale_x), (&mut sae_y, init_y, scale_y)] {
                let n = (x.len() / d) as f32;
                let b = sae.b_dec_mut();
                b.fill(0.0);
                for r in x.chunks(d) {
                    for (bb, v) in b.iter_mut().zip(r) {
                        *bb += v * s / n;
                    }
                }
            }
        }
        let zeros = |s: &TopK| -> Vec<Vec<f32>> {
            s.params().iter().map(|p| vec![0.0; p.data.len()]).collect()
        };
        Ok(Self {
            grads: [zeros(&sae_x), zeros(&sae_y)],
            m: [zeros(&sae_x), zeros(&sae_y)],
            v: [zeros(&sae_x), zeros(&sae_y)],
            ws: [Workspace::default(), Workspace::default()],
            sae_x,
            sae_y,
            scale_x,
            scale_y,
            step: 0,
            cfg,
            mlp,
            jg: JacGrads::default(),
            xs: Vec::new(),
            ys: Vec::new(),
            gains: Vec::new(),
            raw: Vec::new(),
        })
    }

    /// The training configuration.
    pub fn config(&self) -> &PairConfig {
        &self.cfg
    }

    /// The MLP the pair sits around.
    pub fn mlp(&self) -> &MlpWeights {
        &self.mlp
    }

    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Every tensor the next step depends on, by name: `{x,y}.param.<name>` (both SAEs'
    /// parameters) and `{x,y}.adam_m.<name>`, `{x,y}.adam_v.<name>` (their Adam moments).
    /// With [`Self::step_count`] and the input scales (recomputed from the same init sample
    /// by [`Self::new`]), this is the whole training state.
    pub fn state(&self) -> Vec<(String, &[f32])> {
        let mut out = Vec::new();
        for (s, side) in [(0usize, "x"), (1, "y")] {
            let sae = if s == 0 { &self.sae_x } else { &self.sae_y };
            for (i, p) in sae.params().iter().enumerate() {
                out.push((format!("{side}.param.{}", p.name), p.data.as_slice()));
                out.push((format!("{side}.adam_m.{}", p.name), self.m[s][i].as_slice()));
                out.push((format!("{side}.adam_v.{}", p.name), self.v[s][i].as_slice()));
            }
        }
        out
    }

    /// Put back a state written by [`Self::state`] after `step` steps. Every tensor must be
    /// present with its length; on error the pair is left unchanged.
    pub fn restore(
        &mut self,
        step: u64,
        tensors: &std::collections::HashMap<String, Vec<f32>>,
    ) -> Result<(), PairError> {
        let names = self
            .state()
            .into_iter()
            .map(|(n, v)| (n, v.len()))
            .collect::<Vec<_>>();
        for (name, len) in &names {
            match tensors.get(name) {
                Some(t) if t.len() == *len => {}
                Some(t) => {
                    return Err(PairError::Shape(format!(
                        "checkpoint tensor {name} has {} values, the pair needs {len}",
                        t.len()
                    )))
                }
                None => return Err(PairError::Shape(format!("checkpoint has no tensor {name}"))),
            }
        }
        let get = |name: String| &tensors[&name];
        for (s, side) in [(0usize, "x"), (1, "y")] {
            let sae = if s == 0 {
                &mut self.sae_x
            } else {
                &mut self.sae_y
            };
            for (i, p) in sae.params_mut().iter_mut().enumerate() {
                p.data
                    .copy_from_slice(get(format!("{side}.param.{}", p.name)));
                self.m[s][i].copy_from_slice(get(format!("{side}.adam_m.{}", p.name)));
                self.v[s][i].copy_from_slice(get(format!("{side}.adam_v.{}", p.name)));
            }
        }
        self.step = step;
        Ok(())
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

    /// The Jacobian gains of a batch: at `x` or at the input SAE's reconstruction (which
    /// must be in `ws[0].recon`, scaled).
    fn fill_gains(&mut self, x: &[f32], n: usize) {
        match self.cfg.jac_at {
            JacAt::TrueInput => jacobian::gains_of(&self.mlp, x, n, &mut self.gains),
            JacAt::Reconstruction => {
                scaled(&self.ws[0].recon, 1.0 / self.scale_x, &mut self.raw);
                jacobian::gains_of(&self.mlp, &self.raw, n, &mut self.gains);
            }
        }
    }

    /// One optimiser step on `n` paired raw rows `x = mlp_in`, `y = mlp_out`.
    pub fn step(&mut self, x: &[f32], y: &[f32], n: usize) -> Result<PairStep, PairError> {
        let d = self.mlp.d;
        if x.len() != n * d || y.len() != n * d || n == 0 {
            return Err(PairError::Shape(format!(
                "a step needs two [{n}, {d}] batches (got {} and {} floats)",
                x.len(),
                y.len()
            )));
        }
        let t = self.step;
        scaled(x, self.scale_x, &mut self.xs);
        scaled(y, self.scale_y, &mut self.ys);
        // 1. Both SAEs' reconstruction losses, gradients and active sets.
        for g in self.grads.iter_mut().flatten() {
            c::zero(g);
        }
        let input_x = StepInput {
            x: &self.xs,
            n,
            step: t,
            sparsity_scale: 1.0,
            dead: &[],
        };
        let input_y = StepInput {
            x: &self.ys,
            ..input_x
        };
        let out_x = self
            .sae_x
            .forward_backward(&input_x, &mut self.grads[0], &mut self.ws[0])?;
        self.sae_x.update_state(&input_x, &self.ws[0]);
        let out_y = self
            .sae_y
            .forward_backward(&input_y, &mut self.grads[1], &mut self.ws[1])?;
        self.sae_y.update_state(&input_y, &self.ws[1]);
        // 2. The Jacobian term on the active blocks (skipped for the plain pair, λ = 0:
        //    the pair's training is then two independent TopK SAEs).
        let mut stats = JacStats::new(self.cfg.k, self.cfg.k);
        let jac_loss = if self.cfg.lambda == 0.0 {
            stats.sum_abs = f64::NAN;
            0.0
        } else {
            self.fill_gains(x, n);
            let lam = self.cfg.lambda * optim::sparsity_factor(t, self.cfg.lambda_warmup_steps);
            let coef = lam * d as f32 / (n as f64 * self.k2()) as f32;
            let tables = self.tables();
            let r = self.ratio();
            let (gx, gy) = self.grads.split_at_mut(1);
            let sum_j = jacobian::penalty_step(
                &self.mlp,
                &tables,
                &self.ws[0].codes,
                &self.ws[1].codes,
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
        let loss = out_x.loss + out_y.loss + jac_loss;
        if !loss.is_finite() {
            return Err(PairError::NonFinite {
                what: "loss",
                step: t,
            });
        }
        // 3. Unit-norm decoders: project, clip, Adam, renormalise.
        for (s, sae) in [&self.sae_x, &self.sae_y].into_iter().enumerate() {
            c::project_rows(TopK::grad_w_dec(&mut self.grads[s]), sae.w_dec(), d);
        }
        if self.cfg.grad_clip > 0.0 {
            let norm = self
                .grads
                .iter()
                .flatten()
                .map(|g| optim::sum_sq(g))
                .sum::<f64>()
                .sqrt();
            if !norm.is_finite() {
                return Err(PairError::NonFinite {
                    what: "gradient",
                    step: t,
                });
            }
            if norm > self.cfg.grad_clip as f64 {
                let s = (self.cfg.grad_clip as f64 / norm) as f32;
                for g in self.grads.iter_mut().flatten() {
                    optim::scale(g, s);
                }
            }
        }
        let lr = self.cfg.adam.lr
            * optim::lr_factor(
                t,
                self.cfg.total_steps.max(1),
                self.cfg.lr_warmup_steps,
                self.cfg.lr_decay_frac,
            );
        for (s, sae) in [&mut self.sae_x, &mut self.sae_y].into_iter().enumerate() {
            for (i, p) in sae.params_mut().iter_mut().enumerate() {
                if !p.trainable {
                    continue;
                }
                self.cfg.adam.update(
                    lr,
                    t + 1,
                    &mut p.data,
                    &self.grads[s][i],
                    &mut self.m[s][i],
                    &mut self.v[s][i],
                );
                if p.unit_rows {
                    c::normalize_rows(&mut p.data, d);
                }
            }
        }
        self.step += 1;
        Ok(PairStep {
            loss,
            mse_x: out_x.loss,
            mse_y: out_y.loss,
            jac_mean_abs: stats.mean_abs(),
            jac_frac: if self.cfg.lambda == 0.0 {
                f64::NAN
            } else {
                stats.frac_above(0.01)
            },
        })
    }

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
        match self.cfg.jac_at {
            JacAt::TrueInput => jacobian::gains_of(&self.mlp, x, n, &mut self.gains),
            JacAt::Reconstruction => jacobian::gains_of(&self.mlp, &rx, n, &mut self.gains),
        }
        let tables = self.tables();
        let gw = self.mlp.n_proj() * self.mlp.h;
        jacobian::accumulate_stats(
            &tables,
            &self.ws[0].codes,
            &self.ws[1].codes,
            &self.gains,
            gw,
            self.ratio(),
            &mut acc.jac,
        );
        Ok(())
    }

    /// The Jacobian blocks of `n` raw rows as computed in training (for tests): per token,
    /// `(A_x, A_y, J)` with `J[j·|A_x| + i]`.
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
        jacobian::gains_of(&self.mlp, x, n, &mut self.gains);
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
