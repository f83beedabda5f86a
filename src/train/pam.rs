//! PAM-SGD (SplInterp, `jsae_pamsgd.md` §2.2): proximal alternating minimisation over the
//! encoder (inexact, Adam steps with a proximal term) and the decoder (exact, closed form
//! from streamed sufficient statistics).
//!
//! ```text
//! encoder step (every batch): L_enc = L_variant(W_enc, b_enc; W_dec, b_dec frozen)
//!                                     + μ_enc ‖W_enc − W_enc^t‖² + ν_enc ‖b_enc − b_enc^t‖²
//! statistics (every batch, codes z of that batch):
//!     G += zᵀz (m×m),  C += zᵀx (m×d),  s_z += Σz,  s_x += Σx,  N += B
//! decoder step (every `solve_every` steps): with μ = μ̃N, ν = ν̃N, α = α̃N, β = β̃N,
//!     κ = N + β + ν
//!     (G − s_zᵀs_z/κ + (α+μ)I) W = C + μW^t − s_zᵀ(s_x + νb^t)/κ      (Cholesky, f64)
//!     b = (s_x − s_z W + ν b^t)/κ
//! then the anchors (W_enc^t, b_enc^t, W^t, b^t) move to the new iterate.
//! ```
//!
//! The trainer stays variant-agnostic: it knows the decoder by its parameter names
//! (`W_dec`, `b_dec`), every other trainable parameter is "encoder", and the variant
//! installs the solved decoder through [`crate::sae::Sae::install_decoder`] (which keeps its
//! own constraints, e.g. unit-norm rows).
//!
//! Decision: statistics are streamed from the training codes of each batch (the encoder at
//! that step) instead of a second re-encoding pass over all data (§2.2 "Streaming/EMA"
//! variant): a solve every `solve_every` steps is one outer iteration. `stats_decay` = 0
//! starts the statistics afresh after each solve; d ∈ (0, 1) keeps an exponential average
//! across outer iterations. Defaults `solve_every = 8`, `stats_decay = 0.5` were the best of
//! {1, 2, 4, 8, 16} × {0, 0.5, 0.7, 0.9} on the synthetic comparison of `tests/it/pam_sgd.rs`
//! (fresh statistics over few tokens make the m×m system noisy: N should be ≫ d_sae).
//! Decision: the decoder penalties are per token (μ = μ̃·N etc., the spec's recommendation),
//! so their effect does not depend on how many tokens an outer iteration has. The encoder
//! proximal terms are added to the variant's own loss as they are (SumD-MeanB scale).
//! Decision: `G` is a dense f64 `m×m` matrix (8·d_sae² bytes; 2 GiB at d_sae = 16384), updated
//! by sparse per-row scatter (k² per token for TopK) or, when more than 5% of codes are
//! active, by dense GEMM over token chunks; the solve is a blocked Cholesky (O(m³/3)) built
//! on the `gemm` crate. Memory and time grow as d_sae² and d_sae³: prefer d_sae ≤ 16k (§2.6).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::checkpoint::{Checkpoint, TensorRef};
use super::model::Model;
use super::optim::{AdamOptimizer, Optimizer};
use super::TrainError;
use crate::kernels::cholesky::{chol_solve, cholesky};
use crate::kernels::{self, Codes, Scratch, Workspace, CHUNK, DENSE_FALLBACK};

/// PAM-SGD hyperparameters (the Adam ones of the encoder step are the trainer's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PamConfig {
    /// Optimiser steps per outer iteration (one closed-form decoder solve). Default 8.
    pub solve_every: u64,
    /// μ_enc: proximal weight on ‖W_enc − W_enc^t‖² (every rank-2 encoder parameter). Default 1e-3.
    pub encoder_prox: f32,
    /// ν_enc: proximal weight on ‖b_enc − b_enc^t‖² (every rank-1 encoder parameter). Default 1e-3.
    pub encoder_bias_prox: f32,
    /// μ̃_dec: proximal weight on ‖W_dec − W_dec^t‖² per token of statistics. Default 1e-4.
    pub decoder_prox: f64,
    /// ν̃_dec: proximal weight on ‖b_dec − b_dec^t‖² per token of statistics. Default 0.
    pub decoder_bias_prox: f64,
    /// α̃: ridge on ‖W_dec‖² per token of statistics. Default 1e-6.
    pub ridge: f64,
    /// β̃: ridge on ‖b_dec‖² per token of statistics. Default 0.
    pub bias_ridge: f64,
    /// Factor applied to the statistics after each solve: 0 = fresh statistics per outer
    /// iteration, in (0, 1) = exponential average over outer iterations. Default 0.5.
    pub stats_decay: f64,
}

impl Default for PamConfig {
    fn default() -> Self {
        Self {
            solve_every: 8,
            encoder_prox: 1e-3,
            encoder_bias_prox: 1e-3,
            decoder_prox: 1e-4,
            decoder_bias_prox: 0.0,
            ridge: 1e-6,
            bias_ridge: 0.0,
            stats_decay: 0.5,
        }
    }
}

impl PamConfig {
    /// Problems with the values, each naming its key under `train.optimizer`.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.solve_every == 0 {
            out.push("train.optimizer.solve_every must be > 0".to_string());
        }
        for (k, v) in [
            ("encoder_prox", self.encoder_prox as f64),
            ("encoder_bias_prox", self.encoder_bias_prox as f64),
            ("decoder_prox", self.decoder_prox),
            ("decoder_bias_prox", self.decoder_bias_prox),
            ("ridge", self.ridge),
            ("bias_ridge", self.bias_ridge),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                out.push(format!(
                    "train.optimizer.{k} = {v} must be a finite number >= 0"
                ));
            }
        }
        if self.ridge + self.decoder_prox <= 0.0 {
            out.push(
                "train.optimizer.ridge + decoder_prox must be > 0: latents that never fire make the decoder system singular otherwise"
                    .to_string(),
            );
        }
        if !(0.0..1.0).contains(&self.stats_decay) {
            out.push(format!(
                "train.optimizer.stats_decay = {} must be in [0, 1)",
                self.stats_decay
            ));
        }
        out
    }
}

/// Names of the decoder parameters (every other trainable parameter is encoder).
pub const DECODER_PARAMS: [&str; 2] = ["W_dec", "b_dec"];

/// PAM-SGD state between steps: encoder anchors and the decoder statistics.
#[derive(Debug, Default)]
pub struct PamState {
    /// Anchor of each encoder parameter (same order as the SAE's params; empty for the
    /// decoder and non-trainable ones).
    pub anchors: Vec<Vec<f32>>,
    /// `G = Σ zᵀz`, `[m, m]` row-major.
    pub g: Vec<f64>,
    /// `C = Σ zᵀx`, `[m, d]`.
    pub c: Vec<f64>,
    /// `s_z = Σ z`, `[m]`.
    pub sz: Vec<f64>,
    /// `s_x = Σ x`, `[d]`.
    pub sx: Vec<f64>,
    /// Tokens in the statistics (weighted when `stats_decay` > 0).
    pub n: f64,
    tmp: Vec<f32>,
    dense: Vec<f32>,
    scratch: Scratch,
}

/// Why a decoder solve failed.
#[derive(Debug, thiserror::Error)]
pub enum PamError {
    /// The decoder system was not positive definite.
    #[error("the PAM-SGD decoder system is not positive definite at latent {0}; raise train.optimizer.ridge or decoder_prox")]
    NotPositiveDefinite(usize),
    /// No tokens were accumulated.
    #[error("no tokens in the PAM-SGD statistics")]
    Empty,
}

impl PamState {
    /// Fresh state for an SAE with `d_sae = m`, `d_in = d`; anchors from `params`
    /// (`(is_encoder, values)` per parameter).
    pub fn new<'a>(m: usize, d: usize, params: impl Iterator<Item = (bool, &'a [f32])>) -> Self {
        Self {
            anchors: params
                .map(|(enc, v)| if enc { v.to_vec() } else { Vec::new() })
                .collect(),
            g: vec![0.0; m * m],
            c: vec![0.0; m * d],
            sz: vec![0.0; m],
            sx: vec![0.0; d],
            n: 0.0,
            ..Default::default()
        }
    }

    /// Statistics accumulated elsewhere (the tensor backend's device GEMMs), for a host
    /// [`PamState::solve`]; no anchors.
    pub fn from_stats(g: Vec<f64>, c: Vec<f64>, sz: Vec<f64>, sx: Vec<f64>, n: f64) -> Self {
        Self {
            g,
            c,
            sz,
            sx,
            n,
            ..Default::default()
        }
    }

    /// The encoder proximal weight of a parameter of shape `shape`: `μ_enc` for matrices,
    /// `ν_enc` for vectors.
    pub fn prox_weight(cfg: &PamConfig, shape: &[usize]) -> f32 {
        if shape.len() >= 2 {
            cfg.encoder_prox
        } else {
            cfg.encoder_bias_prox
        }
    }

    /// Add the proximal gradient `2μ(p − p^t)` of every encoder parameter to `grads`.
    pub fn add_prox_grads(
        &self,
        cfg: &PamConfig,
        params: &[crate::sae::Param],
        grads: &mut [Vec<f32>],
    ) {
        for ((p, g), a) in params.iter().zip(grads.iter_mut()).zip(&self.anchors) {
            if a.is_empty() {
                continue;
            }
            let mu = if p.shape.len() >= 2 {
                cfg.encoder_prox
            } else {
                cfg.encoder_bias_prox
            };
            if mu == 0.0 {
                continue;
            }
            g.par_chunks_mut(1 << 14)
                .zip(p.data.par_chunks(1 << 14).zip(a.par_chunks(1 << 14)))
                .for_each(|(g, (v, a))| {
                    for i in 0..g.len() {
                        g[i] += 2.0 * mu * (v[i] - a[i]);
                    }
                });
        }
    }

    /// `Σ μ‖p − p^t‖²` over the encoder parameters (logged as the `prox` loss term).
    pub fn prox_loss(&self, cfg: &PamConfig, params: &[crate::sae::Param]) -> f64 {
        params
            .iter()
            .zip(&self.anchors)
            .filter(|(_, a)| !a.is_empty())
            .map(|(p, a)| {
                let mu = if p.shape.len() >= 2 {
                    cfg.encoder_prox
                } else {
                    cfg.encoder_bias_prox
                } as f64;
                let s: f64 = p
                    .data
                    .iter()
                    .zip(a)
                    .map(|(v, w)| ((v - w) as f64).powi(2))
                    .sum();
                mu * s
            })
            .sum()
    }

    /// Move the encoder anchors to the current parameters.
    pub fn refresh_anchors(&mut self, params: &[crate::sae::Param]) {
        for (a, p) in self.anchors.iter_mut().zip(params) {
            if !a.is_empty() {
                a.copy_from_slice(&p.data);
            }
        }
    }

    /// Accumulate one batch: `codes` (n tokens over m latents) and inputs `x: [n, d]`.
    pub fn accumulate(&mut self, codes: &Codes, x: &[f32], d: usize) {
        let m = self.sz.len();
        let n = codes.n();
        if n == 0 {
            return;
        }
        // G
        let density = codes.nnz() as f64 / (n * m).max(1) as f64;
        if density > DENSE_FALLBACK {
            kernels::resize(&mut self.tmp, m * m);
            kernels::zero(&mut self.tmp);
            let mut lo = 0;
            while lo < n {
                let hi = (lo + CHUNK).min(n);
                densify(codes, lo, hi, m, &mut self.dense);
                syrk_acc(&self.dense, hi - lo, m, &mut self.tmp);
                lo = hi;
            }
            self.g
                .par_chunks_mut(m)
                .zip(self.tmp.par_chunks(m))
                .for_each(|(g, t)| g.iter_mut().zip(t).for_each(|(a, b)| *a += *b as f64));
        } else {
            // CSC view: for latent i, the (token, value) pairs, then row i of G gets
            // z_bi · z_b for every token b where i fires.
            let mut ptr = vec![0usize; m + 1];
            for &i in &codes.idx {
                ptr[i as usize + 1] += 1;
            }
            for i in 0..m {
                ptr[i + 1] += ptr[i];
            }
            let mut fill = ptr[..m].to_vec();
            let mut tok = vec![0u32; codes.nnz()];
            let mut val = vec![0f32; codes.nnz()];
            for b in 0..n {
                let (ix, vs) = codes.row(b);
                for (&i, &v) in ix.iter().zip(vs) {
                    let p = fill[i as usize];
                    fill[i as usize] += 1;
                    tok[p] = b as u32;
                    val[p] = v;
                }
            }
            self.g.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
                for p in ptr[i]..ptr[i + 1] {
                    let zi = val[p] as f64;
                    let (ix, vs) = codes.row(tok[p] as usize);
                    for (&j, &v) in ix.iter().zip(vs) {
                        row[j as usize] += zi * v as f64;
                    }
                }
            });
        }
        // C = Σ zᵀx
        kernels::resize(&mut self.tmp, m * d);
        kernels::zero(&mut self.tmp);
        kernels::accumulate_rows(&mut self.scratch, codes, &codes.val, x, d, m, &mut self.tmp);
        self.c
            .par_chunks_mut(1 << 14)
            .zip(self.tmp[..m * d].par_chunks(1 << 14))
            .for_each(|(c, t)| c.iter_mut().zip(t).for_each(|(a, b)| *a += *b as f64));
        for (&i, &v) in codes.idx.iter().zip(&codes.val) {
            self.sz[i as usize] += v as f64;
        }
        for r in x.chunks(d) {
            for (s, v) in self.sx.iter_mut().zip(r) {
                *s += *v as f64;
            }
        }
        self.n += n as f64;
    }

    /// Scale the statistics by `f` (0 clears them).
    pub fn decay(&mut self, f: f64) {
        let apply = |v: &mut Vec<f64>| {
            v.par_chunks_mut(1 << 14)
                .for_each(|c| c.iter_mut().for_each(|x| *x *= f))
        };
        apply(&mut self.g);
        apply(&mut self.c);
        apply(&mut self.sz);
        apply(&mut self.sx);
        self.n *= f;
    }

    /// The closed-form decoder `(W [m, d], b [d])` given the statistics and the current
    /// decoder `(w_t, b_t)` as the proximal anchor.
    pub fn solve(
        &self,
        cfg: &PamConfig,
        w_t: &[f32],
        b_t: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>), PamError> {
        let (m, d) = (self.sz.len(), self.sx.len());
        let n = self.n;
        if n <= 0.0 {
            return Err(PamError::Empty);
        }
        let (mu, nu) = (cfg.decoder_prox * n, cfg.decoder_bias_prox * n);
        let (alpha, beta) = (cfg.ridge * n, cfg.bias_ridge * n);
        let kappa = n + beta + nu;
        // A = G − s_z s_zᵀ/κ + (α+μ)I
        let mut a = self.g.clone();
        let sz = &self.sz;
        a.par_chunks_mut(m).enumerate().for_each(|(i, row)| {
            let si = sz[i] / kappa;
            for (j, v) in row.iter_mut().enumerate() {
                *v -= si * sz[j];
            }
            row[i] += alpha + mu;
        });
        // R = C + μW^t − s_z (s_x + ν b^t)ᵀ/κ
        let t: Vec<f64> = self
            .sx
            .iter()
            .zip(b_t)
            .map(|(s, b)| s + nu * *b as f64)
            .collect();
        let mut r = self.c.clone();
        r.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            let si = sz[i] / kappa;
            for (j, v) in row.iter_mut().enumerate() {
                *v += mu * w_t[i * d + j] as f64 - si * t[j];
            }
        });
        cholesky(&mut a, m).map_err(PamError::NotPositiveDefinite)?;
        chol_solve(&a, m, &mut r, d);
        // b = (s_x − s_zᵀW + ν b^t)/κ
        let mut b: Vec<f64> = t.clone();
        for (i, &s) in sz.iter().enumerate() {
            if s != 0.0 {
                for (bj, wj) in b.iter_mut().zip(&r[i * d..(i + 1) * d]) {
                    *bj -= s * wj;
                }
            }
        }
        Ok((
            r.iter().map(|&v| v as f32).collect(),
            b.iter().map(|&v| (v / kappa) as f32).collect(),
        ))
    }
}

/// PAM-SGD as the engine's [`Optimizer`]: Adam on the encoder (decoder frozen, proximal
/// pull towards the anchors), the decoder by the closed-form solve every `solve_every`
/// steps and at the end of the run. Single-SAE models only.
pub struct PamSgd {
    cfg: PamConfig,
    adam: AdamOptimizer,
    state: PamState,
    /// Indices of `W_dec` and `b_dec` in the SAE's parameters.
    w_dec: usize,
    b_dec: usize,
}

impl PamSgd {
    /// Set up for `model`, or explain why PAM-SGD cannot train it.
    pub fn new(
        cfg: &PamConfig,
        adam: super::optim::Adam,
        model: &dyn Model,
    ) -> Result<Self, TrainError> {
        if !model.supports_pam_sgd() || model.n_saes() != 1 {
            return Err(TrainError::Config(format!(
                "train.optimizer.kind = \"pam_sgd\" supports sae.arch kinds {}; this model is `{}` (use kind = \"adam\" for it)",
                crate::sae::ArchConfig::pam_sgd_kinds().join(", "),
                model.name()
            )));
        }
        let sae = model.sae(0);
        let find = |name: &str| {
            sae.params()
                .iter()
                .position(|p| p.name == name)
                .ok_or_else(|| {
                    TrainError::Config(format!(
                        "PAM-SGD needs a `{name}` parameter, which {} does not have",
                        model.name()
                    ))
                })
        };
        let (w_dec, b_dec) = (find("W_dec")?, find("b_dec")?);
        let (d, f) = sae.dims();
        let state = PamState::new(
            f,
            d,
            sae.params().iter().map(|p| {
                (
                    p.trainable && !DECODER_PARAMS.contains(&p.name),
                    &p.data[..],
                )
            }),
        );
        let mut adam = AdamOptimizer::new(adam, model);
        adam.frozen[0][w_dec] = true;
        adam.frozen[0][b_dec] = true;
        Ok(Self {
            cfg: cfg.clone(),
            adam,
            state,
            w_dec,
            b_dec,
        })
    }

    /// Closed-form decoder from the statistics, installed by the variant; then new anchors.
    fn solve(&mut self, model: &mut dyn Model) -> Result<(), TrainError> {
        let sae = model.sae_mut(0);
        let arch = sae.arch();
        let (w, b) = {
            let p = sae.params();
            self.state
                .solve(&self.cfg, &p[self.w_dec].data, &p[self.b_dec].data)
                .map_err(|e| TrainError::Config(format!("{arch}: {e}")))?
        };
        sae.install_decoder(&w, &b)?;
        self.state.refresh_anchors(sae.params());
        self.state.decay(self.cfg.stats_decay);
        Ok(())
    }
}

impl Optimizer for PamSgd {
    fn name(&self) -> &'static str {
        "pam_sgd"
    }
    fn lr(&self) -> f32 {
        self.adam.hp.lr
    }
    fn prepare(
        &mut self,
        model: &dyn Model,
        grads: &mut [Vec<Vec<f32>>],
    ) -> Vec<(&'static str, f64)> {
        kernels::zero(&mut grads[0][self.w_dec]);
        kernels::zero(&mut grads[0][self.b_dec]);
        let params = model.sae(0).params();
        self.state.add_prox_grads(&self.cfg, params, &mut grads[0]);
        vec![("prox", self.state.prox_loss(&self.cfg, params))]
    }
    fn update(&mut self, model: &mut dyn Model, grads: &[Vec<Vec<f32>>], lr: f32, t: u64) {
        self.adam.update(model, grads, lr, t);
    }
    fn update_scaled(
        &mut self,
        model: &mut dyn Model,
        grads: &mut [Vec<Vec<f32>>],
        gscale: Option<f32>,
        lr: f32,
        t: u64,
    ) {
        self.adam.update_scaled(model, grads, gscale, lr, t);
    }
    fn after_step(
        &mut self,
        model: &mut dyn Model,
        inputs: &[Vec<f32>],
        ws: &[Workspace],
        t: u64,
        total: u64,
    ) -> Result<(), TrainError> {
        let d = model.sae(0).dims().0;
        self.state.accumulate(&ws[0].codes, &inputs[0], d);
        if (t + 1).is_multiple_of(self.cfg.solve_every) || t + 1 == total {
            self.solve(model)?;
        }
        Ok(())
    }
    fn reset_entry(&mut self, s: usize, p: usize, e: usize) {
        self.adam.reset_entry(s, p, e);
    }
    fn state<'a>(&'a self, model: &dyn Model) -> Vec<(String, TensorRef<'a>)> {
        let mut out = self.adam.state(model);
        for (p, a) in model.sae(0).params().iter().zip(&self.state.anchors) {
            if !a.is_empty() {
                out.push((format!("pam.anchor.{}", p.name), TensorRef::F32(a)));
            }
        }
        let st = &self.state;
        out.extend([
            ("pam.G".to_string(), TensorRef::F64(&st.g)),
            ("pam.C".to_string(), TensorRef::F64(&st.c)),
            ("pam.sz".to_string(), TensorRef::F64(&st.sz)),
            ("pam.sx".to_string(), TensorRef::F64(&st.sx)),
            (
                "pam.n".to_string(),
                TensorRef::F64(std::slice::from_ref(&st.n)),
            ),
        ]);
        out
    }
    fn restore(&mut self, model: &dyn Model, ck: &Checkpoint) -> Result<(), TrainError> {
        self.adam.restore(model, ck)?;
        for (a, p) in self.state.anchors.iter_mut().zip(model.sae(0).params()) {
            if !a.is_empty() {
                let n = a.len();
                a.copy_from_slice(ck.f32(&format!("pam.anchor.{}", p.name), n)?);
            }
        }
        let st = &mut self.state;
        for (k, dst) in [
            ("pam.G", &mut st.g),
            ("pam.C", &mut st.c),
            ("pam.sz", &mut st.sz),
            ("pam.sx", &mut st.sx),
        ] {
            let n = dst.len();
            dst.copy_from_slice(ck.f64(k, n)?);
        }
        st.n = ck.f64("pam.n", 1)?[0];
        Ok(())
    }
}

/// Dense `[hi-lo, m]` codes of tokens `lo..hi`.
fn densify(codes: &Codes, lo: usize, hi: usize, m: usize, out: &mut Vec<f32>) {
    kernels::resize(out, (hi - lo) * m);
    out.par_chunks_mut(m).enumerate().for_each(|(r, row)| {
        row.fill(0.0);
        let (ix, vs) = codes.row(lo + r);
        for (&i, &v) in ix.iter().zip(vs) {
            row[i as usize] = v;
        }
    });
}

/// `out [m, m] += Zᵀ Z` for `z: [c, m]` (f32 GEMM; the caller adds it into the f64 `G`).
fn syrk_acc(z: &[f32], c: usize, m: usize, out: &mut [f32]) {
    assert_eq!(z.len(), c * m, "invariant: z is [c, m]");
    assert_eq!(out.len(), m * m, "invariant: out is [m, m]");
    // SAFETY: sizes asserted above; lhs is Zᵀ (element (i, b) = z[b*m + i]), rhs is Z.
    unsafe {
        gemm::gemm(
            m,
            m,
            c,
            out.as_mut_ptr(),
            1,
            m as isize,
            true,
            z.as_ptr(),
            m as isize,
            1,
            z.as_ptr(),
            1,
            m as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    /// The solve is the exact minimiser of E(W, b): its gradient vanishes there.
    #[test]
    fn solve_zeroes_the_gradient_of_the_decoder_objective() {
        let mut rng = Rng::new(2);
        let (n, m, d) = (200, 12, 5);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let mut codes = Codes::default();
        codes.clear();
        for _ in 0..n {
            for i in 0..m {
                if rng.uniform() < 0.3 && i != 7 {
                    // latent 7 never fires: only the ridge and prox hold it
                    codes.idx.push(i as u32);
                    codes.val.push(rng.uniform() as f32 + 0.1);
                }
            }
            codes.indptr.push(codes.idx.len());
        }
        let cfg = PamConfig {
            decoder_prox: 1e-2,
            decoder_bias_prox: 1e-2,
            ridge: 1e-3,
            bias_ridge: 1e-3,
            ..PamConfig::default()
        };
        let w_t: Vec<f32> = (0..m * d).map(|_| rng.normal() as f32).collect();
        let b_t: Vec<f32> = (0..d).map(|_| rng.normal() as f32).collect();
        // Accumulate in two halves (sparse path) and once densely: same statistics.
        let mut st = PamState::new(m, d, std::iter::empty());
        st.accumulate(&codes, &x, d);
        let (w, b) = st.solve(&cfg, &w_t, &b_t).unwrap();
        let nn = n as f64;
        let (mu, nu, al, be) = (1e-2 * nn, 1e-2 * nn, 1e-3 * nn, 1e-3 * nn);
        let z = codes.to_dense(m);
        let mut gw = vec![0.0f64; m * d];
        let mut gb = vec![0.0f64; d];
        for r in 0..n {
            for j in 0..d {
                let mut pred = b[j] as f64;
                for i in 0..m {
                    pred += z[r * m + i] as f64 * w[i * d + j] as f64;
                }
                let e = pred - x[r * d + j] as f64;
                gb[j] += 2.0 * e;
                for i in 0..m {
                    gw[i * d + j] += 2.0 * e * z[r * m + i] as f64;
                }
            }
        }
        for i in 0..m * d {
            gw[i] += 2.0 * al * w[i] as f64 + 2.0 * mu * (w[i] - w_t[i]) as f64;
        }
        for j in 0..d {
            gb[j] += 2.0 * be * b[j] as f64 + 2.0 * nu * (b[j] - b_t[j]) as f64;
        }
        let gmax = gw.iter().chain(&gb).map(|v| v.abs()).fold(0.0, f64::max);
        assert!(gmax < 1e-3, "gradient at the solution {gmax}");
        // the never-firing latent sits at μ/(α+μ)·W^t
        let f = (mu / (al + mu)) as f32;
        for j in 0..d {
            assert!((w[7 * d + j] - f * w_t[7 * d + j]).abs() < 1e-5);
        }
    }

    #[test]
    fn sparse_and_dense_statistics_match_a_direct_sum() {
        let mut rng = Rng::new(4);
        let (n, m, d) = (300, 150, 4);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        for p_active in [0.01, 0.3] {
            let mut codes = Codes::default();
            codes.clear();
            for _ in 0..n {
                for i in 0..m {
                    if rng.uniform() < p_active {
                        codes.idx.push(i as u32);
                        codes.val.push(rng.normal() as f32);
                    }
                }
                codes.indptr.push(codes.idx.len());
            }
            let mut st = PamState::new(m, d, std::iter::empty());
            st.accumulate(&codes, &x, d);
            let z = codes.to_dense(m);
            for i in 0..m {
                for j in 0..m {
                    let want: f64 = (0..n)
                        .map(|r| z[r * m + i] as f64 * z[r * m + j] as f64)
                        .sum();
                    let got = st.g[i * m + j];
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "{got} {want}"
                    );
                }
                for j in 0..d {
                    let want: f64 = (0..n)
                        .map(|r| z[r * m + i] as f64 * x[r * d + j] as f64)
                        .sum();
                    assert!((st.c[i * d + j] - want).abs() < 1e-4 * (1.0 + want.abs()));
                }
            }
            assert_eq!(st.n, n as f64);
            st.decay(0.0);
            assert!(st.g.iter().all(|&v| v == 0.0) && st.n == 0.0);
        }
    }
}
