//! Adam, global-norm gradient clipping and the LR / sparsity schedules
//! (sae_variants.md §1.4).
//!
//! ```text
//! m ← β1 m + (1−β1) g;  v ← β2 v + (1−β2) g²
//! p ← p − lr_t · m̂ / (√v̂ + ε),  m̂ = m/(1−β1^t), v̂ = v/(1−β2^t)
//! lr_t = lr · min((t+1)/W, 1) · decay(t)      decay: linear to 0 over the last `decay_frac` of steps
//! λ_t  = λ · min((t+1)/T_λ, 1)
//! clip: g ← g · min(1, C/‖g‖₂) over all trainable parameters together
//! ```
//! Decision: all reductions are over fixed chunks combined in a fixed order, so the update is
//! bit-for-bit reproducible regardless of thread count scheduling.

use rayon::prelude::*;

use super::checkpoint::{Checkpoint, TensorRef};
use super::model::Model;
use super::TrainError;
use crate::kernels::{self, Workspace};

const CHUNK: usize = 1 << 14;

/// Adam hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adam {
    /// Learning rate.
    pub lr: f32,
    /// β1.
    pub beta1: f32,
    /// β2.
    pub beta2: f32,
    /// ε.
    pub eps: f32,
}

impl Adam {
    /// One update of `p` with gradient `g` and moments `m`, `v` at 1-based step `t`, learning
    /// rate `lr` (already scheduled).
    pub fn update(&self, lr: f32, t: u64, p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        self.update_rows(lr, t, p, g, m, v, None, None)
    }

    /// [`Adam::update`] on the gradient `gscale·g` (the global-norm clip; `None` = 1), then
    /// with `unit_rows = Some(d)` each length-`d` row of `p` rescaled to unit norm
    /// ([`kernels::normalize_row`]) while it is still in cache: the same result as
    /// [`scale`], `update` and [`kernels::normalize_rows`], two passes fewer.
    #[allow(clippy::too_many_arguments)]
    pub fn update_rows(
        &self,
        lr: f32,
        t: u64,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        unit_rows: Option<usize>,
        gscale: Option<f32>,
    ) {
        let chunk = match unit_rows {
            Some(d) if d > 0 => d * (CHUNK / d).max(1),
            _ => CHUNK,
        };
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - (b1 as f64).powi(t as i32);
        let bc2 = 1.0 - (b2 as f64).powi(t as i32);
        let step = (lr as f64 * bc2.sqrt() / bc1.max(1e-30)) as f32;
        let eps = (self.eps as f64 * bc2.sqrt()) as f32;
        p.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk))
            .zip(m.par_chunks_mut(chunk).zip(v.par_chunks_mut(chunk)))
            .for_each(|((p, g), (m, v))| {
                kernels::adam_chunk((b1, b2), step, eps, gscale, p, g, m, v);
                if let Some(d) = unit_rows.filter(|&d| d > 0) {
                    p.chunks_mut(d).for_each(kernels::normalize_row);
                }
            });
    }
}

/// Sum of squares of `g` in f64 (fixed chunking, fixed combination order).
pub fn sum_sq(g: &[f32]) -> f64 {
    let parts: Vec<f64> = g.par_chunks(CHUNK).map(kernels::sum_sq_f64).collect();
    parts.iter().sum()
}

/// Scale every gradient by `s`.
pub fn scale(g: &mut [f32], s: f32) {
    g.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v *= s));
}

/// Learning-rate multiplier at 0-based step `t` of `total`: linear warmup over `warmup`
/// steps, then constant, then linear decay to 0 over the last `decay_frac·total` steps.
pub fn lr_factor(t: u64, total: u64, warmup: u64, decay_frac: f32) -> f32 {
    let w = if warmup > 0 {
        ((t + 1) as f32 / warmup as f32).min(1.0)
    } else {
        1.0
    };
    let decay_steps = (decay_frac.clamp(0.0, 1.0) as f64 * total as f64).round() as u64;
    let start = total.saturating_sub(decay_steps);
    let d = if decay_steps > 0 && t >= start {
        (total.saturating_sub(t)) as f32 / decay_steps as f32
    } else {
        1.0
    };
    w * d
}

/// Sparsity-coefficient warmup multiplier at 0-based step `t`.
pub fn sparsity_factor(t: u64, warmup: u64) -> f32 {
    if warmup == 0 {
        1.0
    } else {
        ((t + 1) as f32 / warmup as f32).min(1.0)
    }
}

/// How the engine's optimiser is driven, once per step:
/// 1. [`Optimizer::prepare`] after the forward/backward pass (PAM-SGD freezes the decoder
///    and adds its proximal pull, returning the extra loss terms);
/// 2. the engine projects unit-norm gradients and clips the global norm;
/// 3. [`Optimizer::update`] with the scheduled learning rate;
/// 4. [`Optimizer::after_step`] with the step's inputs and codes (PAM-SGD's statistics and
///    decoder solve).
///
/// Its state goes into the engine's checkpoint through [`Optimizer::state`] and comes back
/// through [`Optimizer::restore`]; after the last step, [`Optimizer::finish`].
pub trait Optimizer: Send {
    /// Name as in the metrics tables (`adam`, `pam_sgd`, `signum`).
    fn name(&self) -> &'static str;
    /// The peak learning rate (before the schedule).
    fn lr(&self) -> f32;
    /// The learning rate at 0-based step `t` of `total`, from the engine's warmup and decay
    /// (`train.lr_warmup_steps`, `lr_decay`). An optimiser with its own schedule (or none,
    /// schedule-free `signum`) overrides it.
    fn scheduled_lr(&self, t: u64, total: u64, warmup: u64, decay_frac: f32) -> f32 {
        self.lr() * lr_factor(t, total, warmup, decay_frac)
    }
    /// Adjust the gradients before clipping; returns loss terms it adds.
    fn prepare(
        &mut self,
        model: &dyn Model,
        grads: &mut [Vec<Vec<f32>>],
    ) -> Vec<(&'static str, f64)>;
    /// Update the trainable parameters it owns at 1-based step `t` with learning rate `lr`,
    /// renormalising unit-norm rows it changed.
    fn update(&mut self, model: &mut dyn Model, grads: &[Vec<Vec<f32>>], lr: f32, t: u64);
    /// [`Optimizer::update`] on the gradients times `gscale` (the global-norm clip's factor;
    /// `None` = 1). Default: scale the buffers, then `update`; Adam folds the factor into its
    /// own pass (the same numbers, one pass over the gradients fewer).
    fn update_scaled(
        &mut self,
        model: &mut dyn Model,
        grads: &mut [Vec<Vec<f32>>],
        gscale: Option<f32>,
        lr: f32,
        t: u64,
    ) {
        if let Some(sc) = gscale {
            for g in grads.iter_mut().flatten() {
                scale(g, sc);
            }
        }
        self.update(model, grads, lr, t);
    }
    /// After the update, with the step's scaled inputs and training codes; `t` is 0-based
    /// (PAM-SGD's statistics and decoder solve). Default: nothing.
    fn after_step(
        &mut self,
        model: &mut dyn Model,
        inputs: &[Vec<f32>],
        ws: &[Workspace],
        t: u64,
        total: u64,
    ) -> Result<(), TrainError> {
        let _ = (model, inputs, ws, t, total);
        Ok(())
    }
    /// Called once after the last step: leave in the model the parameters to evaluate and
    /// export (schedule-free `signum`: the averaged point). Default: nothing.
    fn finish(&mut self, model: &mut dyn Model) {
        let _ = model;
    }
    /// Forget the moments of entry `e` of parameter `p` of SAE `s` (a revived latent).
    fn reset_entry(&mut self, s: usize, p: usize, e: usize);
    /// Everything the next step depends on, by name.
    fn state<'a>(&'a self, model: &dyn Model) -> Vec<(String, TensorRef<'a>)>;
    /// Put back what [`Optimizer::state`] saved.
    fn restore(&mut self, model: &dyn Model, ck: &Checkpoint) -> Result<(), TrainError>;
}

/// The checkpoint name of Adam's moment `which` (`m` or `v`) of parameter `name` of SAE `s`
/// (shared with the tensor backend's device-resident Adam).
pub fn moment_key(s: usize, which: &str, name: &str) -> String {
    format!("sae{s}.adam_{which}.{name}")
}

/// Adam on every trainable parameter of every SAE of the model (except those `frozen`).
pub struct AdamOptimizer {
    /// Hyperparameters.
    pub hp: Adam,
    m: Vec<Vec<Vec<f32>>>,
    v: Vec<Vec<Vec<f32>>>,
    /// `frozen[s][p]`: parameter `p` of SAE `s` is not Adam's (PAM-SGD's decoder).
    pub frozen: Vec<Vec<bool>>,
}

impl AdamOptimizer {
    /// Zero moments for `model`.
    pub fn new(hp: Adam, model: &dyn Model) -> Self {
        let mut m = Vec::new();
        let mut frozen = Vec::new();
        for s in 0..model.n_saes() {
            let params = model.sae(s).params();
            m.push(
                params
                    .iter()
                    .map(|p| {
                        if p.trainable {
                            vec![0.0; p.data.len()]
                        } else {
                            Vec::new()
                        }
                    })
                    .collect::<Vec<_>>(),
            );
            frozen.push(vec![false; params.len()]);
        }
        Self {
            hp,
            v: m.clone(),
            m,
            frozen,
        }
    }

    /// Adam on every parameter it owns, on the gradients times `gscale`.
    fn update_fused(
        &mut self,
        model: &mut dyn Model,
        grads: &[Vec<Vec<f32>>],
        gscale: Option<f32>,
        lr: f32,
        t: u64,
    ) {
        for (s, grads) in grads.iter().enumerate().take(model.n_saes()) {
            let sae = model.sae_mut(s);
            let d = sae.dims().0;
            for (i, p) in sae.params_mut().iter_mut().enumerate() {
                if !p.trainable || self.frozen[s][i] {
                    continue;
                }
                self.hp.update_rows(
                    lr,
                    t,
                    &mut p.data,
                    &grads[i],
                    &mut self.m[s][i],
                    &mut self.v[s][i],
                    p.unit_rows.then_some(d),
                    gscale,
                );
            }
        }
    }
}

impl Optimizer for AdamOptimizer {
    fn name(&self) -> &'static str {
        "adam"
    }
    fn lr(&self) -> f32 {
        self.hp.lr
    }
    fn prepare(&mut self, _: &dyn Model, _: &mut [Vec<Vec<f32>>]) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    fn update(&mut self, model: &mut dyn Model, grads: &[Vec<Vec<f32>>], lr: f32, t: u64) {
        self.update_fused(model, grads, None, lr, t);
    }
    fn update_scaled(
        &mut self,
        model: &mut dyn Model,
        grads: &mut [Vec<Vec<f32>>],
        gscale: Option<f32>,
        lr: f32,
        t: u64,
    ) {
        self.update_fused(model, grads, gscale, lr, t);
    }
    fn reset_entry(&mut self, s: usize, p: usize, e: usize) {
        if let (Some(m), Some(v)) = (self.m[s][p].get_mut(e), self.v[s][p].get_mut(e)) {
            *m = 0.0;
            *v = 0.0;
        }
    }
    fn state<'a>(&'a self, model: &dyn Model) -> Vec<(String, TensorRef<'a>)> {
        let mut out = Vec::new();
        for s in 0..model.n_saes() {
            for (i, p) in model.sae(s).params().iter().enumerate() {
                if p.trainable {
                    out.push((moment_key(s, "m", p.name), TensorRef::F32(&self.m[s][i])));
                    out.push((moment_key(s, "v", p.name), TensorRef::F32(&self.v[s][i])));
                }
            }
        }
        out
    }
    fn restore(&mut self, model: &dyn Model, ck: &Checkpoint) -> Result<(), TrainError> {
        for s in 0..model.n_saes() {
            for (i, p) in model.sae(s).params().iter().enumerate() {
                if p.trainable {
                    let n = p.data.len();
                    self.m[s][i].copy_from_slice(ck.f32(&moment_key(s, "m", p.name), n)?);
                    self.v[s][i].copy_from_slice(ck.f32(&moment_key(s, "v", p.name), n)?);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adam_first_step_moves_by_lr() {
        let a = Adam {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut p = vec![1.0f32, 1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        a.update(0.1, 1, &mut p, &[2.0, -3.0], &mut m, &mut v);
        assert!(
            (p[0] - 0.9).abs() < 1e-5 && (p[1] - 1.1).abs() < 1e-5,
            "{p:?}"
        );
    }

    #[test]
    fn fused_unit_rows_equal_update_then_normalize() {
        let a = Adam {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut r = crate::util::rng::Rng::new(4);
        for d in [7usize, 576, CHUNK + 3] {
            let n = 3 * d + (CHUNK / d).max(1) * d;
            let mk = |r: &mut crate::util::rng::Rng| -> Vec<f32> {
                (0..n).map(|_| r.normal() as f32).collect()
            };
            let (p0, g, m0) = (mk(&mut r), mk(&mut r), mk(&mut r));
            let v0: Vec<f32> = mk(&mut r).iter().map(|x| x * x).collect();
            let (mut p1, mut m1, mut v1) = (p0.clone(), m0.clone(), v0.clone());
            a.update(0.01, 3, &mut p1, &g, &mut m1, &mut v1);
            kernels::normalize_rows(&mut p1, d);
            let (mut p2, mut m2, mut v2) = (p0.clone(), m0.clone(), v0.clone());
            a.update_rows(0.01, 3, &mut p2, &g, &mut m2, &mut v2, Some(d), None);
            assert!(p1 == p2 && m1 == m2 && v1 == v2, "d = {d}");
            // the clip factor folded in equals scaling the gradient first
            let mut gs = g.clone();
            scale(&mut gs, 0.37);
            let (mut p3, mut m3, mut v3) = (p0.clone(), m0.clone(), v0.clone());
            a.update(0.01, 3, &mut p3, &gs, &mut m3, &mut v3);
            let (mut p4, mut m4, mut v4) = (p0, m0, v0);
            a.update_rows(0.01, 3, &mut p4, &g, &mut m4, &mut v4, None, Some(0.37));
            assert!(p3 == p4 && m3 == m4 && v3 == v4, "scaled, d = {d}");
            assert!(p3 != p1, "the scale changed nothing");
        }
    }

    #[test]
    fn sum_sq_matches_f64_reference() {
        let mut r = crate::util::rng::Rng::new(9);
        for n in [0usize, 1, 7, 8, 9, CHUNK + 5, 3 * CHUNK] {
            let g: Vec<f32> = (0..n).map(|_| r.normal() as f32 * 3.0).collect();
            let want: f64 = g.iter().map(|&v| v as f64 * v as f64).sum();
            let got = sum_sq(&g);
            assert!(
                (got - want).abs() <= 1e-12 * want.max(1.0),
                "{n}: {got} vs {want}"
            );
        }
    }

    #[test]
    fn schedules() {
        assert_eq!(lr_factor(0, 100, 10, 0.2), 0.1);
        assert_eq!(lr_factor(50, 100, 10, 0.2), 1.0);
        assert!((lr_factor(90, 100, 10, 0.2) - 0.5).abs() < 1e-6);
        assert_eq!(sparsity_factor(4, 10), 0.5);
        assert_eq!(sparsity_factor(40, 10), 1.0);
    }
}
