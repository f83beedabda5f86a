//! `signum`: sign descent inside schedule-free averaging (Defazio et al. 2024), EleutherAI
//! sparsify's default optimiser (`ScheduleFreeWrapper(SignSGD(params, lr), momentum=0.95)`,
//! schedulefree 1.x `wrap_schedulefree.py`), reproduced update for update.
//!
//! ```text
//! state per parameter: y (the parameter itself: the gradient point), z (the base iterate);
//! x (the averaged point, the one to evaluate and export) is implied: y = β x + (1−β) z.
//! per step, with g = ∇L(y) (unit-norm rows projected, clipped: the sign ignores the scale):
//!     x ← lerp(y, z, 1 − 1/β)                       unextrapolate: y → x
//!     z ← z − γ_t · sign(g)                         SignSGD on z (sign 0 = 0)
//!     γ_max ← max(γ_max, γ_t);  w_t = γ_max²;  W ← W + w_t;  c = w_t / W
//!     x ← lerp(x, z, c)                             running (lr²-weighted) average of z
//!     y ← lerp(x, z, 1 − β)                         the next gradient point
//!     unit-norm rows of y renormalised              (sparsify: before each forward)
//! at the end of the run (evaluation, export):
//!     x = lerp(y, z, 1 − 1/β), unit-norm rows of x renormalised
//! lerp(a, b, w) = a + w (b − a) if |w| < 0.5 else b − (b − a)(1 − w)   (torch's formula)
//! γ_t = γ · min((t+1)/warmup_steps, 1);  γ default 5e-3 / √(d_sae / 2^14) (sparsify's rule)
//! ```
//!
//! Decision: the SAE that is exported and evaluated is the averaged point `x` (what
//! sparsify saves: its checkpoints call `ScheduleFreeWrapper.eval()` before writing), never
//! the gradient point `y`. The engine turns `y` into `x` once, after the last step
//! ([`super::optim::Optimizer::finish`]); checkpoints in the middle of a run hold `y` and
//! `z` and the counters, so a resumed run continues bit for bit.
//! Decision: `x` is an average of points off the unit sphere, so its unit-norm rows
//! (decoder rows) are renormalised at the end: the constraint holds in memory and in the
//! exported file; sparsify saves `x` as it is.
//! Decision: the engine's `train.lr_warmup_steps` / `lr_decay` do not apply (the point of
//! schedule-free averaging is no schedule, and sparsify's signum has none); the optimiser's
//! own `warmup_steps` (default 0) warms `γ` up, weighted in the average as the wrapper does.
//! Decision: a latent reset by its variant ([`crate::sae::Sae::revive_dead`]) gets `z = y`
//! at the next step (then `x = y = z` there): the schedule-free form of forgetting moments.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, TensorRef};
use super::model::Model;
use super::optim::Optimizer;
use super::TrainError;
use crate::kernels;

const CHUNK: usize = 1 << 14;

/// Settings of `train.optimizer = { kind = "signum", … }` (the lr is the trainer's `lr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignumConfig {
    /// β, the schedule-free interpolation ("momentum"). Default 0.95 (sparsify).
    pub momentum: f64,
    /// Linear warmup of `γ` in steps. Default 0 (sparsify).
    pub warmup_steps: u64,
}

impl Default for SignumConfig {
    fn default() -> Self {
        Self {
            momentum: 0.95,
            warmup_steps: 0,
        }
    }
}

impl SignumConfig {
    /// Problems with the values, each naming its key under `train.optimizer`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(self.momentum > 0.0 && self.momentum < 1.0) {
            out.push(format!(
                "train.optimizer.momentum = {} must be in (0, 1) (sparsify: 0.95)",
                self.momentum
            ));
        }
        out
    }
}

/// sparsify's learning-rate rule for signum: `5e-3 / √(d_sae / 2^14)`.
pub fn default_lr(d_sae: usize) -> f64 {
    5e-3 / (d_sae as f64 / 16384.0).sqrt()
}

/// torch's CPU `lerp` (ATen `Lerp.h`, `lerp_vec`): one fused multiply-add, from the nearer
/// end (`fmadd(w, b − a, a)` for |w| < 0.5, else `fmadd(w − 1, b − a, b)`).
#[inline(always)]
fn lerp(a: f32, b: f32, w: f32) -> f32 {
    if w.abs() < 0.5 {
        w.mul_add(b - a, a)
    } else {
        (w - 1.0).mul_add(b - a, b)
    }
}

/// The weight `c` of this step's `z` in the average `x`, updating `[weight_sum, lr_max]`
/// (the wrapper's `weight = (k+1)^r · lr_max^weight_lr_power`, r = 0, power 2).
fn average_weight(sums: &mut [f64], lr: f64) -> f32 {
    sums[1] = sums[1].max(lr);
    let weight = sums[1] * sums[1];
    sums[0] += weight;
    (weight / sums[0]) as f32
}

/// One step of the wrapper on a slice: `y`, `z` updated with the gradient `g` at `y`.
/// `mul_add` is always fused (correctly rounded), so the result is the same everywhere; on a
/// CPU with FMA the loop is compiled for it (else `mul_add` is a slower library call).
fn step_slice(y: &mut [f32], z: &mut [f32], g: &[f32], neg_lr: f32, ckp1: f32, beta: f64) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports FMA (checked just above), all `step_slice_fma` needs.
        unsafe { step_slice_fma(y, z, g, neg_lr, ckp1, beta) };
        return;
    }
    step_slice_any(y, z, g, neg_lr, ckp1, beta);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn step_slice_fma(
    y: &mut [f32],
    z: &mut [f32],
    g: &[f32],
    neg_lr: f32,
    ckp1: f32,
    beta: f64,
) {
    step_slice_any(y, z, g, neg_lr, ckp1, beta);
}

#[inline(always)]
fn step_slice_any(y: &mut [f32], z: &mut [f32], g: &[f32], neg_lr: f32, ckp1: f32, beta: f64) {
    let (w_unx, w_y) = ((1.0 - 1.0 / beta) as f32, (1.0 - beta) as f32);
    for ((y, z), &g) in y.iter_mut().zip(z.iter_mut()).zip(g) {
        let x = lerp(*y, *z, w_unx);
        // torch's sign: ±1, 0 at ±0 (NaN gradients are refused by the engine before)
        let sign = if g > 0.0 {
            1.0
        } else if g < 0.0 {
            -1.0
        } else {
            g
        };
        // SignSGD's `z.add_(sign, alpha=-lr)`: exact products, one rounding either way
        let zi = *z + neg_lr * sign;
        let x = lerp(x, zi, ckp1);
        *y = lerp(x, zi, w_y);
        *z = zi;
    }
}

/// Sign descent with schedule-free averaging on every trainable parameter of every SAE.
pub struct Signum {
    cfg: SignumConfig,
    /// Peak `γ` of each SAE.
    lrs: Vec<f64>,
    /// `z[s][p]` (empty for non-trainable parameters); set to `y` at the first step.
    z: Vec<Vec<Vec<f32>>>,
    /// Steps taken, per SAE (a torch param group's `k`).
    k: Vec<u64>,
    /// `[weight_sum, lr_max]` per SAE (the param group's).
    sums: Vec<f64>,
    /// `[at_x, (s, p, e)…]`: 1 when the model holds `x` (after [`Optimizer::finish`]), then
    /// the entries reset by their variant since the last step.
    marks: Vec<u64>,
}

impl Signum {
    /// Fresh state for `model`; `lr` overrides sparsify's rule for every SAE.
    pub fn new(cfg: &SignumConfig, lr: Option<f32>, model: &dyn Model) -> Self {
        let n = model.n_saes();
        Self {
            cfg: cfg.clone(),
            lrs: (0..n)
                .map(|s| lr.map_or_else(|| default_lr(model.sae(s).dims().1), f64::from))
                .collect(),
            z: (0..n)
                .map(|s| {
                    let params = model.sae(s).params();
                    params
                        .iter()
                        .map(|p| {
                            if p.trainable {
                                p.data.clone()
                            } else {
                                Vec::new()
                            }
                        })
                        .collect()
                })
                .collect(),
            k: vec![0; n],
            sums: vec![0.0; 2 * n],
            marks: vec![0],
        }
    }

    fn warm(&self, t: u64) -> f64 {
        match self.cfg.warmup_steps {
            0 => 1.0,
            w => ((t + 1) as f64 / w as f64).min(1.0),
        }
    }

    /// The model's parameters from `y` to `x` (`to_x`) or back.
    fn swap_point(&mut self, model: &mut dyn Model, to_x: bool) {
        let beta = self.cfg.momentum;
        let w = if to_x { 1.0 - 1.0 / beta } else { 1.0 - beta } as f32;
        for s in 0..model.n_saes() {
            let sae = model.sae_mut(s);
            let d = sae.dims().0;
            for (p, z) in sae.params_mut().iter_mut().zip(&self.z[s]) {
                if !p.trainable {
                    continue;
                }
                p.data
                    .par_chunks_mut(CHUNK)
                    .zip(z.par_chunks(CHUNK))
                    .for_each(|(p, z)| p.iter_mut().zip(z).for_each(|(p, &z)| *p = lerp(*p, z, w)));
                if to_x && p.unit_rows {
                    kernels::normalize_rows(&mut p.data, d);
                }
            }
        }
        self.marks[0] = to_x as u64;
    }
}

impl Optimizer for Signum {
    fn name(&self) -> &'static str {
        "signum"
    }
    fn lr(&self) -> f32 {
        self.lrs.first().copied().unwrap_or(0.0) as f32
    }
    fn scheduled_lr(&self, t: u64, _total: u64, _warmup: u64, _decay_frac: f32) -> f32 {
        (self.lrs.first().copied().unwrap_or(0.0) * self.warm(t)) as f32
    }
    fn prepare(&mut self, _: &dyn Model, _: &mut [Vec<Vec<f32>>]) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    fn update(&mut self, model: &mut dyn Model, grads: &[Vec<Vec<f32>>], _lr: f32, t: u64) {
        if self.marks[0] == 1 {
            // stepping on after `finish`: back to the gradient point
            self.swap_point(model, false);
        }
        for e in self.marks.split_off(1).chunks_exact(3) {
            let (s, p, e) = (e[0] as usize, e[1] as usize, e[2] as usize);
            let data = &model.sae(s).params()[p].data;
            if let (Some(z), Some(&y)) = (self.z[s][p].get_mut(e), data.get(e)) {
                *z = y;
            }
        }
        let beta = self.cfg.momentum;
        let warm = self.warm(t.saturating_sub(1));
        for (s, grads) in grads.iter().enumerate().take(model.n_saes()) {
            let lr = self.lrs[s] * warm;
            let first = self.k[s] == 0;
            let ckp1 = average_weight(&mut self.sums[2 * s..2 * s + 2], lr);
            self.k[s] += 1;
            let neg_lr = -lr as f32;
            let sae = model.sae_mut(s);
            let d = sae.dims().0;
            for ((p, z), g) in sae.params_mut().iter_mut().zip(&mut self.z[s]).zip(grads) {
                if !p.trainable {
                    continue;
                }
                if first {
                    // the wrapper's lazy `state['z'] = clone(p)`
                    z.clone_from(&p.data);
                }
                p.data
                    .par_chunks_mut(CHUNK)
                    .zip(z.par_chunks_mut(CHUNK))
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|((y, z), g)| step_slice(y, z, g, neg_lr, ckp1, beta));
                if p.unit_rows {
                    kernels::normalize_rows(&mut p.data, d);
                }
            }
        }
    }
    fn finish(&mut self, model: &mut dyn Model) {
        if self.marks[0] == 0 {
            self.swap_point(model, true);
        }
    }
    fn reset_entry(&mut self, s: usize, p: usize, e: usize) {
        self.marks.extend([s as u64, p as u64, e as u64]);
    }
    fn state<'a>(&'a self, model: &dyn Model) -> Vec<(String, TensorRef<'a>)> {
        let mut out = vec![
            ("sf.k".to_string(), TensorRef::U64(&self.k)),
            ("sf.sums".to_string(), TensorRef::F64(&self.sums)),
            ("sf.marks".to_string(), TensorRef::U64(&self.marks)),
        ];
        for s in 0..model.n_saes() {
            for (i, p) in model.sae(s).params().iter().enumerate() {
                if p.trainable {
                    out.push((
                        format!("sae{s}.sf_z.{}", p.name),
                        TensorRef::F32(&self.z[s][i]),
                    ));
                }
            }
        }
        out
    }
    fn restore(&mut self, model: &dyn Model, ck: &Checkpoint) -> Result<(), TrainError> {
        let n = model.n_saes();
        self.k.copy_from_slice(ck.u64("sf.k", n)?);
        self.sums.copy_from_slice(ck.f64("sf.sums", 2 * n)?);
        self.marks = match ck.tensors.get("sf.marks") {
            Some(super::checkpoint::Tensor::U64(v)) if v.len() % 3 == 1 => v.clone(),
            _ => {
                return Err(TrainError::Checkpoint {
                    path: ck.path.clone(),
                    msg: "missing or malformed tensor sf.marks of the signum optimiser".into(),
                })
            }
        };
        for s in 0..n {
            for (i, p) in model.sae(s).params().iter().enumerate() {
                if p.trainable {
                    let name = format!("sae{s}.sf_z.{}", p.name);
                    self.z[s][i].copy_from_slice(ck.f32(&name, p.data.len())?);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit patterns from schedulefree 1.4.1's `ScheduleFreeWrapper(SignSGD([p], lr),
    /// momentum=0.95)` (sparsify 1.3.3's `SignSGD`, torch 2.15 CPU): five steps with the lr
    /// set on the param group to 0.02, 0.04, 0.06, 0.06, 0.06, then `eval()`.
    #[test]
    fn matches_the_schedulefree_wrapper_bit_for_bit() {
        let mut y = vec![0.3f32, -0.2, 0.5, 0.0, 1.25, -0.7];
        let grads = [
            [1.0f32, -2.0, 0.0, 3.0, -0.5, 0.25],
            [-1.0, -1.0, 2.0, 0.0, 0.5, 0.25],
            [0.5, 2.0, -2.0, -1.0, -0.5, -0.25],
            [1.0, 1.0, 1.0, 1.0, 1.0, -1.0],
            [-3.0, 0.0, 2.0, -1.0, 0.5, 0.25],
        ];
        let lrs = [0.02, 0.04, 0.06, 0.06, 0.06];
        let want_y: [[u32; 6]; 5] = [
            [
                0x3e8f5c29, 0xbe3851ec, 0x3f000000, 0xbca3d70a, 0x3fa28f5c, 0xbf3851eb,
            ],
            [
                0x3e9ff2e5, 0xbe172475, 0x3eef6944, 0xbca3d70a, 0x3f9e69ae, 0xbf409d49,
            ],
            [
                0x3e8e2734, 0xbe3abbd5, 0x3f009a7a, 0x3ca0ea0e, 0x3fa2dc99, 0xbf37b771,
            ],
            [
                0x3e7b5341, 0xbe5bb6fd, 0x3ef7c925, 0x3b17048b, 0x3fa081a6, 0xbf2f78a8,
            ],
            [
                0x3e80dd2f, 0xbe68cccd, 0x3eea978d, 0x3c76c8b3, 0x3f9d3540, 0xbf31126f,
            ],
        ];
        let want_x = [
            0x3e80a3d7u32,
            0xbe670a3e,
            0x3eec28f5,
            0x3c6147ad,
            0x3f9d999a,
            0xbf30f5c3,
        ];
        let mut z = y.clone();
        let mut sums = [0.0f64; 2];
        for ((g, &lr), want) in grads.iter().zip(&lrs).zip(&want_y) {
            let c = average_weight(&mut sums, lr);
            step_slice(&mut y, &mut z, g, -lr as f32, c, 0.95);
            let got: Vec<u32> = y.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "y");
        }
        let w = (1.0 - 1.0 / 0.95f64) as f32;
        let x: Vec<u32> = y
            .iter()
            .zip(&z)
            .map(|(&y, &z)| lerp(y, z, w).to_bits())
            .collect();
        assert_eq!(x, want_x, "x");
    }

    #[test]
    fn lr_rule_and_settings() {
        assert!((default_lr(16384) - 5e-3).abs() < 1e-12);
        assert!((default_lr(4096) - 1e-2).abs() < 1e-12);
        assert!(SignumConfig::default().problems().is_empty());
        let bad = SignumConfig {
            momentum: 1.0,
            ..Default::default()
        };
        assert!(bad.problems()[0].starts_with("train.optimizer.momentum "));
    }
}
