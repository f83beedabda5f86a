//! `muon`: Newton–Schulz-orthogonalised momentum for the matrices, Adam for the rest, as in
//! EleutherAI sparsify's `--optimizer muon` (its `sparsify/muon.py`, after Keller Jordan's).
//!
//! ```text
//! every parameter with ≥ 2 dimensions (W_enc, W_dec, …), shape [r, c], gradient g:
//!     W ← W · (1 − γ_t λ)                          decoupled weight decay, λ = 0.1
//!     m ← lerp(m, g, 1 − μ);  u = lerp(g, m, μ)    Nesterov momentum, μ = 0.95
//!     X = u (transposed when r > c);  X ← X / (‖X‖_F + 1e-7)
//!     5 × { A = X Xᵀ;  B = b A + c A A;  X ← a X + B X }      (a, b, c) = (3.4445, −4.7750, 2.0315)
//!     W ← W − γ_t · 0.2 √max(r, c) · X (transposed back)
//! every other trainable parameter: Adam (the trainer's β1, β2, ε) at the same γ_t
//! γ_t = γ · the engine's schedule (train.lr_warmup_steps, lr_decay); γ default 2e-3
//! (sparsify: "Muon LR is independent of the number of latents")
//! unit-norm rows: the engine projects their gradient before, and renormalises after
//! ```
//!
//! Decision: the Newton–Schulz iteration runs in f32 on [`crate::kernels::gemm_xwt`] (sparsify
//! casts to bf16 for speed on GPUs; on the CPU f32 is the fast type). It costs
//! ~2·5·(2 r c² + c³) flops per matrix with c = min(r, c) — at d_in 576, d_sae 2304 about as
//! much as eight TopK steps of 512 tokens — so Muon pays off only where steps are scarce, not
//! flops.
//! Decision: the engine's LR schedule drives both parts (sparsify decays Muon's lr linearly
//! to 0 without warmup and warms Adam's up): one schedule, as for Adam runs.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, TensorRef};
use super::model::Model;
use super::optim::{Adam, Optimizer};
use super::TrainError;
use crate::kernels;

const CHUNK: usize = 1 << 14;
const NS: (f32, f32, f32) = (3.4445, -4.7750, 2.0315);

/// Settings of `train.optimizer = { kind = "muon", … }` (the lr is the trainer's `lr`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MuonConfig {
    /// Momentum μ. Default 0.95.
    pub momentum: f64,
    /// Nesterov momentum. Default true.
    pub nesterov: bool,
    /// Newton–Schulz iterations. Default 5.
    pub ns_steps: u32,
    /// Decoupled weight decay λ of the matrices. Default 0.1 (sparsify's `Muon` default).
    pub weight_decay: f64,
}

impl Default for MuonConfig {
    fn default() -> Self {
        Self {
            momentum: 0.95,
            nesterov: true,
            ns_steps: 5,
            weight_decay: 0.1,
        }
    }
}

impl MuonConfig {
    /// Problems with the values, each naming its key under `train.optimizer`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(0.0..1.0).contains(&self.momentum) {
            out.push(format!(
                "train.optimizer.momentum = {} must be in [0, 1)",
                self.momentum
            ));
        }
        if self.ns_steps == 0 || self.ns_steps > 20 {
            out.push(format!(
                "train.optimizer.ns_steps = {} must be in 1..=20 (sparsify: 5)",
                self.ns_steps
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            out.push(format!(
                "train.optimizer.weight_decay = {} must be a finite number >= 0",
                self.weight_decay
            ));
        }
        out
    }
}

/// sparsify's Muon learning rate (for every width).
pub const DEFAULT_LR: f32 = 2e-3;

/// `[r, c]` row-major into `[c, r]`.
fn transpose(x: &[f32], r: usize, c: usize, out: &mut Vec<f32>) {
    out.resize(r * c, 0.0);
    out.par_chunks_mut(r).enumerate().for_each(|(j, o)| {
        for (i, v) in o.iter_mut().enumerate() {
            *v = x[i * c + j];
        }
    });
}

/// The quintic Newton–Schulz orthogonalisation of `g: [r, c]`, in place.
pub fn newton_schulz(g: &mut [f32], r: usize, c: usize, steps: u32) {
    // work on X [m, n] with m ≤ n
    let tall = r > c;
    let (m, n) = if tall { (c, r) } else { (r, c) };
    let mut x = Vec::new();
    if tall {
        transpose(g, r, c, &mut x);
    } else {
        x.extend_from_slice(g);
    }
    let norm = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() + 1e-7) as f32;
    x.par_chunks_mut(CHUNK)
        .for_each(|c| c.iter_mut().for_each(|v| *v /= norm));
    let (a, b, cc) = NS;
    let (mut aa, mut a2, mut xt, mut bx) = (
        vec![0.0f32; m * m],
        vec![0.0f32; m * m],
        Vec::new(),
        vec![0.0f32; m * n],
    );
    for _ in 0..steps {
        kernels::gemm_xwt(&x, m, n, &x, m, None, &mut aa); // A = X Xᵀ
        kernels::gemm_xwt(&aa, m, m, &aa, m, None, &mut a2); // A A (A symmetric)
        a2.par_iter_mut()
            .zip(&aa)
            .for_each(|(q, &p)| *q = b * p + cc * *q); // B
        transpose(&x, m, n, &mut xt);
        kernels::gemm_xwt(&a2, m, m, &xt, n, None, &mut bx); // B X
        x.par_iter_mut()
            .zip(&bx)
            .for_each(|(v, &w)| *v = a * *v + w);
    }
    if tall {
        transpose(&x, m, n, &mut xt);
        g.copy_from_slice(&xt);
    } else {
        g.copy_from_slice(&x);
    }
}

/// Muon on the matrices, Adam on the rest, of every SAE of the model.
pub struct Muon {
    cfg: MuonConfig,
    lr: f32,
    adam: Adam,
    /// Momentum buffer of each matrix, Adam's m of each other parameter.
    m: Vec<Vec<Vec<f32>>>,
    /// Adam's v of each non-matrix parameter (empty for matrices).
    v: Vec<Vec<Vec<f32>>>,
    scratch: Vec<f32>,
}

impl Muon {
    /// Zero state for `model`; `adam` gives the vectors' β1, β2, ε (its lr is not used).
    pub fn new(cfg: &MuonConfig, lr: Option<f32>, adam: Adam, model: &dyn Model) -> Self {
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for s in 0..model.n_saes() {
            let ps = model.sae(s).params();
            m.push(
                ps.iter()
                    .map(|p| vec![0.0; if p.trainable { p.data.len() } else { 0 }])
                    .collect(),
            );
            v.push(
                ps.iter()
                    .map(|p| {
                        let vec_param = p.trainable && p.shape.len() < 2;
                        vec![0.0; if vec_param { p.data.len() } else { 0 }]
                    })
                    .collect(),
            );
        }
        Self {
            cfg: cfg.clone(),
            lr: lr.unwrap_or(DEFAULT_LR),
            adam,
            m,
            v,
            scratch: Vec::new(),
        }
    }
}

impl Optimizer for Muon {
    fn name(&self) -> &'static str {
        "muon"
    }
    fn lr(&self) -> f32 {
        self.lr
    }
    fn prepare(&mut self, _: &dyn Model, _: &mut [Vec<Vec<f32>>]) -> Vec<(&'static str, f64)> {
        Vec::new()
    }
    fn update(&mut self, model: &mut dyn Model, grads: &[Vec<Vec<f32>>], lr: f32, t: u64) {
        let mu = self.cfg.momentum as f32;
        let decay = (1.0 - lr as f64 * self.cfg.weight_decay) as f32;
        for (s, grads) in grads.iter().enumerate().take(model.n_saes()) {
            let sae = model.sae_mut(s);
            let d = sae.dims().0;
            for (i, p) in sae.params_mut().iter_mut().enumerate() {
                if !p.trainable {
                    continue;
                }
                let g = &grads[i];
                if p.shape.len() < 2 {
                    self.adam
                        .update(lr, t, &mut p.data, g, &mut self.m[s][i], &mut self.v[s][i]);
                } else {
                    let (r, c) = (p.shape[0], p.data.len() / p.shape[0].max(1));
                    let u = &mut self.scratch;
                    u.resize(g.len(), 0.0);
                    let nesterov = self.cfg.nesterov;
                    self.m[s][i]
                        .par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(u.par_chunks_mut(CHUNK))
                        .for_each(|((m, g), u)| {
                            for j in 0..m.len() {
                                m[j] += (1.0 - mu) * (g[j] - m[j]);
                                u[j] = if nesterov {
                                    g[j] + mu * (m[j] - g[j])
                                } else {
                                    m[j]
                                };
                            }
                        });
                    newton_schulz(u, r, c, self.cfg.ns_steps);
                    let step = lr * 0.2 * (r.max(c) as f32).sqrt();
                    p.data
                        .par_chunks_mut(CHUNK)
                        .zip(u.par_chunks(CHUNK))
                        .for_each(|(w, u)| {
                            for (w, &u) in w.iter_mut().zip(u) {
                                *w = *w * decay - step * u;
                            }
                        });
                }
                if p.unit_rows {
                    kernels::normalize_rows(&mut p.data, d);
                }
            }
        }
    }
    fn reset_entry(&mut self, s: usize, p: usize, e: usize) {
        if let Some(m) = self.m[s][p].get_mut(e) {
            *m = 0.0;
        }
        if let Some(v) = self.v[s][p].get_mut(e) {
            *v = 0.0;
        }
    }
    fn state<'a>(&'a self, model: &dyn Model) -> Vec<(String, TensorRef<'a>)> {
        let mut out = Vec::new();
        for s in 0..model.n_saes() {
            for (i, p) in model.sae(s).params().iter().enumerate() {
                if p.trainable {
                    out.push((
                        format!("sae{s}.muon_m.{}", p.name),
                        TensorRef::F32(&self.m[s][i]),
                    ));
                    if p.shape.len() < 2 {
                        out.push((
                            format!("sae{s}.muon_v.{}", p.name),
                            TensorRef::F32(&self.v[s][i]),
                        ));
                    }
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
                    self.m[s][i].copy_from_slice(ck.f32(&format!("sae{s}.muon_m.{}", p.name), n)?);
                    if p.shape.len() < 2 {
                        self.v[s][i]
                            .copy_from_slice(ck.f32(&format!("sae{s}.muon_v.{}", p.name), n)?);
                    }
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
    fn newton_schulz_roughly_orthogonalises_wide_and_tall_matrices() {
        let mut rng = crate::util::rng::Rng::new(3);
        for (r, c) in [(8usize, 24usize), (24, 8)] {
            let mut g: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32).collect();
            newton_schulz(&mut g, r, c, 5);
            // the singular values land in ~[0.5, 1.5] (sparsify's docstring): check the
            // Gram matrix of the short side against the identity, loosely
            let (m, n) = (r.min(c), r.max(c));
            let mut x = Vec::new();
            if r > c {
                transpose(&g, r, c, &mut x);
            } else {
                x = g.clone();
            }
            let mut gram = vec![0.0f32; m * m];
            kernels::gemm_xwt(&x, m, n, &x, m, None, &mut gram);
            for i in 0..m {
                let dii = gram[i * m + i];
                assert!((0.2..2.3).contains(&dii), "({r},{c}) diag {i}: {dii}");
                for j in 0..m {
                    if i != j {
                        assert!(gram[i * m + j].abs() < 0.6, "({r},{c}) [{i},{j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn settings() {
        assert!(MuonConfig::default().problems().is_empty());
        let bad = MuonConfig {
            ns_steps: 0,
            momentum: 1.0,
            ..Default::default()
        };
        assert_eq!(bad.problems().len(), 2);
    }
}
