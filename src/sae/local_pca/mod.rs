//! Exact local-PCA autoencoders (SplInterp, `jsae_pamsgd.md` §2.4): `local_pca`, the
//! authors' one-shot k-means + per-cluster PCA, and (through [`Flats`], registered by
//! `kflats.rs`) `kflats`, the alternating optimum. Both are piecewise-affine autoencoders
//! with `K` regions, a centre `μ_c` and an orthonormal basis `U_c` (r rows) per region:
//!
//! ```text
//! x̃ = x − b_dec                                   (b_dec fixed at the trainer's init)
//! local_pca: c(x) = argmin_c ‖x̃ − μ_c‖²                         (Voronoi, no reassignment)
//! kflats:    c(x) = argmin_c ‖(x̃ − μ_c)(I − U_cᵀU_c)‖²           (residual to the flat)
//!            = argmax_c ⟨μ_c, x̃⟩ − ½‖μ_c‖² + ½ Σ_j a_j²,   a_j = ⟨u_{c,j}, x̃ − μ_c⟩
//! codes: 1 on c's centroid latent, a_j on its r subspace latents;
//!        x̂ = b_dec + μ_c + Σ_j a_j u_{c,j}                                  (L0 = 1 + r)
//! latent layout (as `kmeans_pca`): cluster c owns latents c(1+r) … c(1+r)+r;
//! K = ⌊d_sae / (1+r)⌋ regions; leftover latents are never used.
//! ```
//!
//! Equal parameters: the model has `K(1+r)·d = d_sae·d` numbers (W_enc rows equal W_dec
//! rows), an SAE of width m has `2md`; so a row of `d_sae = 2m` (expansion factor twice the
//! SAE's) pairs with it, with `K_r = ⌊2m/(r+1)⌋` regions (the `n_regions` metrics column).
//!
//! Fitting, in passes over the activation stream (the trainer stays generic; all
//! parameters are non-trainable state updated by [`Sae::update_state`]). The run's steps
//! `T` (told by [`Sae::set_total_steps`]) are cut into `S = 2 + iterations` equal segments:
//! 1. segment 0: mini-batch k-means (Sculley 2010, as `kmeans`), seeded by k-means++ on the
//!    trainer's init sample;
//! 2. segment 1: centroids frozen, Voronoi assignment; per cluster the second moment
//!    `Σ (x̃ − μ_c)(x̃ − μ_c)ᵀ` is accumulated; at its last step `U_c` = its top-r
//!    eigenvectors (the one-shot local PCA: the best rank-r subspace through the k-means
//!    centroid). `local_pca` stops here (iterations = 0);
//! 3. segments 2 … S−1 (`kflats`): assignment by residual to the current flats; per cluster
//!    `n`, `Σ y`, `Σ y yᵀ` with `y = x̃ − μ_c` are accumulated; at the segment's last step
//!    `μ_c ← μ_c + Σy/n` (the cluster mean) and `U_c` = the top-r eigenvectors of the
//!    covariance `Σ y yᵀ − (Σy)(Σy)ᵀ/n` (clusters without tokens keep their flat).
//!
//! When each segment is one pass over the same tokens (train.total_tokens = S × the
//! training tokens, tests/it/kmeans_baselines.rs), the mean training loss of segments 1, 2, …
//! is non-increasing: each assignment is optimal for the previous flats and each refit is
//! the exact optimum for that assignment. With fresh tokens per segment it is a stochastic
//! version of the same alternation.
//!
//! Accumulators: per cluster `1 + d + d(d+1)/2` sums (count, first moment, upper triangle
//! of the second moment) in double-float form, each f64 stored as two f32 `(hi, lo)` with
//! `hi = v as f32`, `lo = (v − hi) as f32` (48-bit significand, all values finite), in the
//! non-trainable parameter `acc` `[K, 2(1 + d + d(d+1)/2)]`. Every update reads them as
//! f64, adds the batch in f64 and writes them back, so the state is exactly what is
//! checkpointed and a resumed run is bit-identical to an uninterrupted one. Memory and
//! checkpoint size: `K·d²·4` bytes (≈ 190 MB at K = 144, d = 576).
//! Eigendecompositions: `nalgebra::SymmetricEigen` on the f64 `d × d` covariance, one per
//! cluster per refit, in parallel over clusters (≈ 0.13 s each at d = 576).
//!
//! Decision: the schedule is in steps of the run (an engine hook, [`Sae::set_total_steps`],
//! called by the trainer before step 0 and on resume) instead of a `pass_tokens` key, so the
//! pipeline sets only `train.total_tokens`; `T < S` is a config error naming both.
//! Decision: covariances, not a randomised top-r, so the subspaces are exact for the data
//! seen (cost `d²/2` per token and `K·O(d³)` per refit, §2.4).
//!
//! Export: SAELens has no such architecture; the `kmeans` format of `kmeans/` (centroid
//! latents with `code_value`, linear subspace latents) with `cfg.json` keys `rank`,
//! `n_clusters` and `assignment` = `"nearest_centroid"` (local_pca) or `"residual"` (kflats),
//! so saepipe's loader assigns exactly as training did (see `kmeans/`).

use nalgebra::{DMatrix, SymmetricEigen};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Fold, Param, Sae, SaeError, StepInput,
    StepOutput, Variant,
};
use crate::kernels::{self as c, Workspace};
use crate::sae::tensor::StepSlot;
use crate::util::rng::Rng;

mod tensor;

/// Variant name of the one-shot k-means + local-PCA autoencoder.
pub const ARCH: &str = "local_pca";

/// `local_pca` hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Dimensions of each region's subspace (L0 = 1 + rank); regions K = ⌊d_sae/(1+rank)⌋.
    /// Default 8.
    pub rank: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self { rank: 8 }
    }
}

/// The registration of `local_pca` (exports in the `kmeans` format of `kmeans/`).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || Config { rank: 2 }.into(),
    formats: &[],
};

/// Adam is never used (no trainable parameters); what the trainer's default LR reads.
pub(crate) const ADAM: (f32, f32, f32) = (1e-3, 0.9, 0.999);

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        Ok(Box::new(Flats::new(ARCH, self.clone().into(), self.rank, 0, d, f, rng)?))
    }
    fn with_sparsity(&self, factor: f32) -> ArchConfig {
        Config {
            rank: super::registry::divide_k(self.rank, factor),
        }
        .into()
    }
    fn sparsity_param(&self) -> (&'static str, f64) {
        ("rank", self.rank as f64)
    }
    fn recommended_adam(&self, _d_sae: usize, _steps: u64) -> (f32, f32, f32) {
        ADAM
    }
    fn supports_tensor(&self) -> bool {
        true
    }
}

const W_ENC: usize = 0;
const W_DEC: usize = 1;
const B_DEC: usize = 2;
const COUNTS: usize = 3;
const SEEDED: usize = 4;
const ACC: usize = 5;

/// A piecewise-affine autoencoder with K flats: `local_pca` (iterations 0) or `kflats`.
pub struct Flats {
    arch: &'static str,
    config: ArchConfig,
    rank: usize,
    iterations: usize,
    d: usize,
    f: usize,
    k: usize,
    seed: u64,
    total_steps: u64,
    params: Vec<Param>,
    /// What the tensor forward leaves for [`Sae::update_state`] (`tensor.rs`).
    slot: StepSlot,
}

/// f64 entries per cluster accumulator: count, first moment, packed upper triangle.
fn acc_entries(d: usize) -> usize {
    1 + d + d * (d + 1) / 2
}

fn get(acc: &[f32], e: usize) -> f64 {
    acc[2 * e] as f64 + acc[2 * e + 1] as f64
}

fn put(acc: &mut [f32], e: usize, v: f64) {
    let hi = v as f32;
    acc[2 * e] = hi;
    acc[2 * e + 1] = (v - hi as f64) as f32;
}

/// The first `r` coordinate axes as `r` rows of length `d`.
fn axes(r: usize, d: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; r * d];
    for j in 0..r {
        u[j * d + j] = 1.0;
    }
    u
}

impl Flats {
    /// Build with `rank` subspace dimensions and `iterations` k-flats refits (0 = one-shot).
    pub(crate) fn new(
        arch: &'static str,
        config: ArchConfig,
        rank: usize,
        iterations: usize,
        d: usize,
        f: usize,
        rng: &mut Rng,
    ) -> Result<Self, SaeError> {
        if rank == 0 {
            return Err(SaeError::Config {
                arch,
                msg: "rank must be >= 1 (rank 0 is kind = \"kmeans\")".into(),
            });
        }
        if rank >= d {
            return Err(SaeError::Config {
                arch,
                msg: format!("rank = {rank} must be below d_in = {d}"),
            });
        }
        let k = f / (1 + rank);
        if k == 0 {
            return Err(SaeError::Config {
                arch,
                msg: format!(
                    "d_sae = {f} is less than 1 + rank = {}: no room for a single region",
                    1 + rank
                ),
            });
        }
        // Centroid rows: small random vectors until k-means++ seeds them; subspace rows 0
        // until the first PCA (so the loss before it is the k-means loss).
        let w = c::random_rows(rng, f, d, 1e-3);
        let mut w_dec = vec![0.0f32; f * d];
        for cl in 0..k {
            let lat = cl * (1 + rank);
            w_dec[lat * d..(lat + 1) * d].copy_from_slice(&w[lat * d..(lat + 1) * d]);
        }
        let state = |name, shape: Vec<usize>, data| {
            let mut p = Param::new(name, shape, data);
            p.trainable = false;
            p
        };
        let e = acc_entries(d);
        Ok(Self {
            arch,
            config,
            rank,
            iterations,
            d,
            f,
            k,
            seed: rng.next_u64(),
            total_steps: 0,
            params: vec![
                state("W_enc", vec![f, d], w_dec.clone()),
                state("W_dec", vec![f, d], w_dec),
                state("b_dec", vec![d], vec![0.0; d]),
                state("counts", vec![k], vec![0.0; k]),
                state("seeded", vec![1], vec![0.0]),
                state("acc", vec![k, 2 * e], vec![0.0; k * 2 * e]),
            ],
            slot: StepSlot::default(),
        })
    }

    fn stride(&self) -> usize {
        1 + self.rank
    }

    fn segments(&self) -> u64 {
        2 + self.iterations as u64
    }

    /// The segment of step `t` and whether `t` is its last step (segment 0 forever when the
    /// run length is unknown).
    fn segment(&self, t: u64) -> (u64, bool) {
        let (s, tt) = (self.segments(), self.total_steps);
        if tt == 0 {
            return (0, false);
        }
        let end = |i: u64| (i + 1) * tt / s;
        let mut i = 0;
        while i + 1 < s && t >= end(i) {
            i += 1;
        }
        (i, t + 1 == end(i))
    }

    /// `T < S`: the run is too short for the fitting passes.
    fn check_schedule(&self) -> Result<(), SaeError> {
        if self.total_steps > 0 && self.total_steps < self.segments() {
            return Err(SaeError::Config {
                arch: self.arch,
                msg: format!(
                    "{} fits in {} passes (k-means, PCA{}) but the run has {} steps; raise train.total_tokens to at least {} batches",
                    self.arch,
                    self.segments(),
                    if self.iterations > 0 { ", k-flats iterations" } else { "" },
                    self.total_steps,
                    self.segments()
                ),
            });
        }
        Ok(())
    }

    /// Assignment by residual (kflats) or nearest centroid (local_pca).
    fn residual(&self) -> bool {
        self.iterations > 0
    }

    /// Codes of every row of `ws.xt`: the assigned cluster's centroid latent (1) first, then
    /// its non-zero subspace coordinates.
    fn encode_xt(&self, n: usize, ws: &mut Workspace) {
        let (d, f, s, k) = (self.d, self.f, self.stride(), self.k);
        let w = &self.params[W_DEC].data;
        let mut bias = vec![0.0f32; f];
        bias.par_chunks_mut(s)
            .take(k)
            .enumerate()
            .for_each(|(cl, b)| {
                let base = cl * s;
                let mu = &w[base * d..(base + 1) * d];
                b[0] = -0.5 * c::dot(mu, mu);
                for (j, bj) in b.iter_mut().enumerate().skip(1) {
                    *bj = -c::dot(&w[(base + j) * d..(base + j + 1) * d], mu);
                }
            });
        let residual = self.residual();
        c::encode_collect(ws, n, d, w, f, Some(&bias), |_, row, buf| {
            let score = |cl: usize| {
                let base = cl * s;
                let mut v = row[base];
                if residual {
                    v += 0.5 * row[base + 1..base + s].iter().map(|a| a * a).sum::<f32>();
                }
                v
            };
            let (mut best, mut bs) = (0, score(0));
            for cl in 1..k {
                let v = score(cl);
                if v > bs {
                    (best, bs) = (cl, v);
                }
            }
            let base = best * s;
            buf.main.push((base as u32, 1.0));
            for j in 1..s {
                let a = row[base + j];
                if a != 0.0 && a.is_finite() {
                    buf.main.push(((base + j) as u32, a));
                }
            }
        });
    }

    /// k-means++ seeding of the centroid rows from the rows of `xt` (`n` tokens).
    fn seed_centroids(&mut self, xt: &[f32], n: usize) -> Result<(), SaeError> {
        let (d, s, k) = (self.d, self.stride(), self.k);
        if k > n {
            return Err(SaeError::Config {
                arch: self.arch,
                msg: format!(
                    "{k} regions (d_sae / (1 + rank)) are more than the {n} tokens k-means++ seeds them from; raise train.init_tokens or lower d_sae"
                ),
            });
        }
        for (cl, pick) in super::kmeans::kmeans_pp(xt, n, d, k, self.seed)
            .into_iter()
            .enumerate()
        {
            let mu = &xt[pick * d..(pick + 1) * d];
            let lat = cl * s;
            self.params[W_DEC].data[lat * d..(lat + 1) * d].copy_from_slice(mu);
            self.params[W_ENC].data[lat * d..(lat + 1) * d].copy_from_slice(mu);
        }
        self.params[SEEDED].data[0] = 1.0;
        Ok(())
    }

    /// Tokens of the batch grouped by assigned cluster (from the codes: centroid first).
    fn groups(&self, ws: &Workspace) -> Vec<Vec<usize>> {
        let s = self.stride();
        let mut g = vec![Vec::new(); self.k];
        for b in 0..ws.codes.n() {
            let (ix, _) = ws.codes.row(b);
            if let Some(&i) = ix.first() {
                g[i as usize / s].push(b);
            }
        }
        g
    }

    /// One mini-batch k-means step (per-centroid rate `m_c / n_c`).
    fn update_centroids(&mut self, xt: &[f32], groups: &[Vec<usize>]) {
        let d = self.d;
        let mut sums = vec![0.0f64; self.k * d];
        let mut m = vec![0.0f64; self.k];
        for (cl, toks) in groups.iter().enumerate() {
            for &b in toks {
                for (a, v) in sums[cl * d..(cl + 1) * d]
                    .iter_mut()
                    .zip(&xt[b * d..(b + 1) * d])
                {
                    *a += *v as f64;
                }
            }
            m[cl] = toks.len() as f64;
        }
        self.apply_centroid_step(&sums, &m);
    }

    /// `μ_c ← μ_c + (Σ_{b∈c} x̃_b − m_c μ_c)/n_c` from per-cluster sums `[k·d]` and counts
    /// (host sums, or the tensor step's device sums).
    fn apply_centroid_step(&mut self, sums: &[f64], m: &[f64]) {
        let (d, s) = (self.d, self.stride());
        for (cl, &mc) in m.iter().enumerate().take(self.k) {
            if mc == 0.0 {
                continue;
            }
            self.params[COUNTS].data[cl] += mc as f32;
            let inv = 1.0 / self.params[COUNTS].data[cl] as f64;
            let lat = cl * s;
            let row = &mut self.params[W_DEC].data[lat * d..(lat + 1) * d];
            for (mu, sm) in row.iter_mut().zip(&sums[cl * d..(cl + 1) * d]) {
                *mu = (*mu as f64 + (sm - mc * *mu as f64) * inv) as f32;
            }
            let row = row.to_vec();
            self.params[W_ENC].data[lat * d..(lat + 1) * d].copy_from_slice(&row);
        }
    }

    /// Add cluster `cl`'s batch moments (`m` tokens, `Σ y [d]`, `Σ y yᵀ [d, d]` row-major,
    /// from the tensor step) to its accumulators.
    fn add_moments(&mut self, cl: usize, m: f64, s1: &[f64], s2: &[f64]) {
        let d = self.d;
        let e = acc_entries(d);
        let a = &mut self.params[ACC].data[cl * 2 * e..(cl + 1) * 2 * e];
        put(a, 0, get(a, 0) + m);
        for (i, v) in s1.iter().enumerate() {
            put(a, 1 + i, get(a, 1 + i) + v);
        }
        let mut off = 1 + d;
        for i in 0..d {
            for j in i..d {
                let at = off + j - i;
                put(a, at, get(a, at) + s2[i * d + j]);
            }
            off += d - i;
        }
    }

    /// Add the batch's `n`, `Σ y`, `Σ y yᵀ` (`y = x̃ − μ_c`) to each cluster's accumulators.
    fn accumulate(&mut self, xt: &[f32], groups: &[Vec<usize>]) {
        let (d, s) = (self.d, self.stride());
        let e = acc_entries(d);
        let (state, acc) = self.params.split_at_mut(ACC);
        let w = &state[W_DEC].data;
        acc[0]
            .data
            .par_chunks_mut(2 * e)
            .zip(groups.par_iter())
            .enumerate()
            .for_each(|(cl, (a, toks))| {
                if toks.is_empty() {
                    return;
                }
                let mu = &w[cl * s * d..(cl * s + 1) * d];
                let mut v: Vec<f64> = (0..e).map(|i| get(a, i)).collect();
                let mut y = vec![0.0f64; d];
                for &b in toks {
                    for ((yy, x), m) in y.iter_mut().zip(&xt[b * d..(b + 1) * d]).zip(mu) {
                        *yy = *x as f64 - *m as f64;
                    }
                    v[0] += 1.0;
                    for (sv, yy) in v[1..1 + d].iter_mut().zip(&y) {
                        *sv += yy;
                    }
                    let mut off = 1 + d;
                    for (i, &yi) in y.iter().enumerate() {
                        let row = &mut v[off..off + d - i];
                        for (r, yj) in row.iter_mut().zip(&y[i..]) {
                            *r += yi * yj;
                        }
                        off += d - i;
                    }
                }
                for (i, x) in v.into_iter().enumerate() {
                    put(a, i, x);
                }
            });
    }

    /// End of a PCA segment: new centre (k-flats only) and top-r eigenvectors per cluster,
    /// then zeroed accumulators.
    fn refit(&mut self, recentre: bool) {
        let (d, s, r) = (self.d, self.stride(), self.rank);
        let e = acc_entries(d);
        let w = &self.params[W_DEC].data;
        let acc = &self.params[ACC].data;
        let fits: Vec<Option<(Vec<f32>, Vec<f32>)>> = (0..self.k)
            .into_par_iter()
            .map(|cl| {
                let a = &acc[cl * 2 * e..(cl + 1) * 2 * e];
                let n = get(a, 0);
                if n == 0.0 {
                    // No tokens: keep the flat (k-flats), or take the first r axes so that the
                    // flat is still orthonormal (one-shot; its tokens are elsewhere anyway).
                    return (!recentre).then(|| (w[cl * s * d..(cl * s + 1) * d].to_vec(), axes(r, d)));
                }
                let sum: Vec<f64> = (0..d).map(|i| get(a, 1 + i)).collect();
                let mut m = DMatrix::<f64>::zeros(d, d);
                let mut off = 1 + d;
                for i in 0..d {
                    for j in i..d {
                        let mut v = get(a, off + j - i);
                        if recentre {
                            v -= sum[i] * sum[j] / n;
                        }
                        m[(i, j)] = v;
                        m[(j, i)] = v;
                    }
                    off += d - i;
                }
                let eig = SymmetricEigen::new(m);
                let mut order: Vec<usize> = (0..d).collect();
                order.sort_by(|&i, &j| eig.eigenvalues[j].total_cmp(&eig.eigenvalues[i]));
                let mut u = vec![0.0f32; r * d];
                for (jj, &col) in order.iter().take(r).enumerate() {
                    let v = eig.eigenvectors.column(col);
                    let nm = v.norm();
                    for (o, x) in u[jj * d..(jj + 1) * d].iter_mut().zip(v.iter()) {
                        *o = (x / nm) as f32;
                    }
                }
                if !u.iter().all(|v| v.is_finite()) {
                    u = axes(r, d);
                }
                let base = cl * s;
                let mut mu: Vec<f32> = w[base * d..(base + 1) * d].to_vec();
                if recentre {
                    for (m, sm) in mu.iter_mut().zip(&sum) {
                        *m = (*m as f64 + sm / n) as f32;
                    }
                }
                Some((mu, u))
            })
            .collect();
        for (cl, fit) in fits.into_iter().enumerate() {
            let Some((mu, u)) = fit else { continue };
            let base = cl * s;
            for p in [W_DEC, W_ENC] {
                let w = &mut self.params[p].data;
                w[base * d..(base + 1) * d].copy_from_slice(&mu);
                w[(base + 1) * d..(base + s) * d].copy_from_slice(&u);
            }
        }
        c::zero(&mut self.params[ACC].data);
    }
}

impl Sae for Flats {
    fn arch(&self) -> &'static str {
        self.arch
    }
    fn config(&self) -> ArchConfig {
        self.config.clone()
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
        check_width(self.arch, self.d, x, n)?;
        c::prepare_input(x, self.d, Some(&self.params[B_DEC].data), &mut ws.xt);
        self.encode_xt(n, ws);
        Ok(())
    }

    fn init_from_sample(&mut self, x: &[f32], n: usize) -> Result<(), SaeError> {
        let mut xt = Vec::new();
        c::prepare_input(x, self.d, Some(&self.params[B_DEC].data), &mut xt);
        self.seed_centroids(&xt, n)
    }

    fn set_total_steps(&mut self, total_steps: u64) {
        self.total_steps = total_steps;
    }

    fn forward_backward(
        &mut self,
        input: &StepInput,
        _grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, SaeError> {
        let (d, n) = (self.d, input.n);
        check_width(self.arch, d, input.x, n)?;
        self.slot.clear();
        self.check_schedule()?;
        c::prepare_input(input.x, d, Some(&self.params[B_DEC].data), &mut ws.xt);
        if self.params[SEEDED].data[0] == 0.0 {
            let xt = std::mem::take(&mut ws.xt);
            let r = self.seed_centroids(&xt, n);
            ws.xt = xt;
            r?;
        }
        self.encode_xt(n, ws);
        let p = &self.params;
        c::decode(
            &mut ws.scratch,
            &ws.codes,
            &p[W_DEC].data,
            d,
            self.f,
            Some(&p[B_DEC].data),
            &mut ws.recon,
        );
        let sse = c::residual(&ws.recon, input.x, d, 2.0 / n as f32, &mut ws.resid);
        let mse = sse / n as f64;
        let (seg, _) = self.segment(input.step);
        Ok(StepOutput {
            loss: mse,
            losses: vec![("mse", mse)],
            metrics: vec![("fit_pass", seg as f64)],
        })
    }

    fn tensor_forward(
        &self,
        params: &[candle_core::Tensor],
        input: &crate::sae::tensor::TensorInput,
    ) -> Result<crate::sae::tensor::TensorForward, SaeError> {
        self.check_schedule()?;
        self.tensor_step(params, input)
            .map_err(|e| SaeError::tensor(self.arch, e))
    }

    /// Segment 0: mini-batch k-means; later segments: accumulate, and refit at their end
    /// (after a tensor step, from its device results: `tensor.rs`).
    fn update_state(&mut self, input: &StepInput, ws: &Workspace) {
        if let Some(st) = self.slot.take(input.step, input.n) {
            self.tensor_update_state(st, input, ws);
            return;
        }
        if ws.xt.len() != input.n * self.d || ws.codes.n() != input.n {
            return;
        }
        let groups = self.groups(ws);
        let (seg, last) = self.segment(input.step);
        if seg == 0 {
            self.update_centroids(&ws.xt, &groups);
            return;
        }
        self.accumulate(&ws.xt, &groups);
        if last {
            self.refit(seg >= 2);
        }
    }

    fn export_parts(&self) -> ExportParts {
        let (d, f, s) = (self.d, self.f, self.stride());
        let w_dec = self.params[W_DEC].data.clone();
        let mut w_enc = vec![0.0f32; f * d];
        let mut b_enc = vec![0.0f32; f];
        let mut code_value = vec![0.0f32; f];
        for cl in 0..self.k {
            let base = cl * s;
            let mu = &w_dec[base * d..(base + 1) * d];
            let nm = c::dot(mu, mu).sqrt();
            if nm > 0.0 {
                for (o, v) in w_enc[base * d..(base + 1) * d].iter_mut().zip(mu) {
                    *o = v / nm;
                }
                b_enc[base] = -0.5 * nm;
            }
            code_value[base] = 1.0;
            for j in 1..s {
                let lat = base + j;
                let u = &w_dec[lat * d..(lat + 1) * d];
                w_enc[lat * d..(lat + 1) * d].copy_from_slice(u);
                b_enc[lat] = -c::dot(u, mu);
            }
        }
        ExportParts {
            architecture: "kmeans",
            w_enc,
            w_dec,
            b_dec: self.params[B_DEC].data.clone(),
            per_latent: vec![
                ("b_enc", b_enc, Fold::ByDecoderNorm),
                ("code_value", code_value, Fold::ByDecoderNorm),
            ],
            apply_b_dec_to_input: true,
            extra_cfg: vec![
                ("rank", serde_json::json!(self.rank)),
                ("n_clusters", serde_json::json!(self.k)),
                (
                    "assignment",
                    serde_json::json!(if self.residual() {
                        "residual"
                    } else {
                        "nearest_centroid"
                    }),
                ),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cut_the_run_evenly_and_end_on_its_last_step() {
        let mut f = Flats::new(ARCH, Config { rank: 1 }.into(), 1, 2, 3, 4, &mut Rng::new(0))
            .unwrap();
        assert_eq!(f.segment(5), (0, false), "unknown length: k-means forever");
        f.set_total_steps(10);
        let segs: Vec<(u64, bool)> = (0..10).map(|t| f.segment(t)).collect();
        assert_eq!(segs[0], (0, false));
        assert_eq!(segs[1], (0, true));
        assert_eq!(segs[4], (1, true));
        assert_eq!(segs[9], (3, true));
        assert_eq!(segs.iter().filter(|s| s.1).count(), 4);
    }

    #[test]
    fn double_float_accumulators_keep_f64_precision() {
        let mut a = vec![0.0f32; 2];
        let v = 1.0 + 1e-12;
        put(&mut a, 0, v);
        assert!((get(&a, 0) - v).abs() < 1e-14);
        assert!(a.iter().all(|x| x.is_finite()));
    }
}
