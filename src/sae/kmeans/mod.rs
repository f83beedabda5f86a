//! The k-means autoencoder and the k-means + local-PCA autoencoder, the SplInterp baselines
//! (`jsae_pamsgd.md` §2.4), as SAE variants so that they train on the same activation stream,
//! are evaluated by the same stage and appear in `metrics.parquet` / on the Pareto plot as
//! `kmeans` and `kmeans_pca`.
//!
//! ```text
//! x̃ = x − b_dec                       (b_dec fixed at the trainer's init: geometric median)
//! c(x) = argmin_c ‖x̃ − μ_c‖² = argmax_c ⟨μ_c, x̃⟩ − ½‖μ_c‖²            (Voronoi cell)
//! kmeans:      code 1 on latent c;                     x̂ = b_dec + μ_c           (L0 = 1)
//! kmeans_pca:  codes 1 on c's centroid latent and a_j = ⟨e_{c,j}, x̃ − μ_c⟩ on its r
//!              subspace latents;                       x̂ = b_dec + μ_c + Σ_j a_j d_{c,j}  (L0 = 1 + r)
//! latent layout: cluster c owns latents c(1+r) (centroid) and c(1+r)+1 … c(1+r)+r;
//! K = ⌊d_sae / (1+r)⌋ clusters; leftover latents are never used.
//! ```
//!
//! Fitting, in `forward_backward` and `update_state` (the trainer stays generic):
//! - centroids: mini-batch k-means (Sculley 2010) with per-centroid rate `m_c / n_c`
//!   (`μ_c ← μ_c + (Σ_{b∈c} x̃_b − m_c μ_c)/n_c`, counts `n_c` kept as state), initialised by
//!   k-means++ on the first batch (seeded, in `forward_backward`, which needs them for the
//!   codes). They are updated in place by [`Sae::update_state`] from the assignment the
//!   step used, not by Adam (their gradient is reported as zero).
//! - local subspaces (`kmeans_pca`): a rank-r linear autoencoder per cluster (`e_{c,j}`
//!   encoder rows, `d_{c,j}` decoder rows) trained by Adam on the reconstruction loss of the
//!   tokens assigned to it; its optimum spans the cluster's top-r principal subspace
//!   (Baldi & Hornik 1989), which is the local PCA of §2.4.
//!
//! Decision: both baselines are `Sae` variants fitted online in one pass of the shared
//! stream (not Lloyd with 10 restarts on a stored sample, the authors' scikit-learn setup):
//! the same budget, data order and evaluation as every SAE, no separate fit path. One
//! k-means++ seeding, on the first batch.
//! Decision: the local PCA is Voronoi assignment + subspace (the authors' one-shot script),
//! not k-flats reassignment.
//! Decision: the local PCA is learnt by gradient (memory `d_sae·d` like any SAE) instead of
//! per-cluster d×d covariances (`K·d²`, 1.3 GB at K = 512, d = 576).
//!
//! Export (SAELens has no such architecture): `architecture = "kmeans"`, extra `cfg.json`
//! keys `rank` and `n_clusters`, per-latent `b_enc` and `code_value`; encoder rows are set
//! so that after the export folds (input scale `c`, decoder norms `n_i`) the argmax over
//! centroid latents of `W_enc x̃ + b_enc` is still the nearest centroid: row `μ_i/‖μ_i‖`,
//! bias `−½‖μ_i‖` become `μ_i` and `−½‖μ_i‖²/c`, i.e. `(⟨μ_i, x̃_s⟩ − ½‖μ_i‖²)/c`.
//! `code_value` (1 before folding) becomes `‖μ_i‖/c` with a unit decoder row. Subspace
//! latents are linear (`b_enc = −⟨e_j, μ_c⟩`) and fold like any linear code. The optional
//! key `assignment = "residual"` (written by `kflats`, `local_pca/`) makes the loader assign
//! by residual to each cluster's flat instead of by nearest centroid ([`encode_loaded`]).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::export::{Folded, Format};
use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Fold, Param, Sae, SaeError, StepInput,
    StepOutput, Variant,
};
use crate::kernels::{self as c, Workspace};
use crate::sae::tensor::StepSlot;
use crate::util::rng::Rng;

mod tensor;

/// Variant name of the k-means autoencoder.
pub const ARCH: &str = "kmeans";
/// Variant name of the k-means + local-PCA autoencoder.
pub const ARCH_PCA: &str = "kmeans_pca";

/// k-means autoencoder hyperparameters: none besides `d_sae` (= the number of clusters).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {}

/// k-means + local-PCA hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PcaConfig {
    /// Dimensions of each cluster's subspace (L0 = 1 + rank). Clusters = ⌊d_sae/(1+rank)⌋,
    /// so `d_sae` counts parameters like an SAE's (§2.4: K ≈ 2·d_sae/(k+1) at equal
    /// parameters would be `d_sae = K(1+r)`/2 latents of an SAE). Default 8.
    pub rank: usize,
}

impl Default for PcaConfig {
    fn default() -> Self {
        Self { rank: 8 }
    }
}

/// The registration of `kmeans` (it owns the `kmeans` SAELens format, also used by
/// `kmeans_pca`).
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || Config {}.into(),
    formats: &[Format {
        architecture: "kmeans",
        per_latent: &["b_enc", "code_value"],
        read_cfg,
        encode: encode_loaded,
        tensor_encode: tensor::encode_loaded,
    }],
};

/// The registration of `kmeans_pca`.
pub static PCA_VARIANT: Variant = Variant {
    kind: ARCH_PCA,
    parse: Variant::parse::<PcaConfig>,
    example: || PcaConfig { rank: 2 }.into(),
    formats: &[],
};

/// Only the local-PCA subspaces use Adam (centroids are mini-batch k-means).
const ADAM: (f32, f32, f32) = (1e-3, 0.9, 0.999);

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        Ok(Box::new(KMeans::new(0, d, f, rng)?))
    }
    /// L0 = 1 by construction: no knob.
    fn with_sparsity(&self, _factor: f32) -> ArchConfig {
        self.clone().into()
    }
    fn sparsity_param(&self) -> (&'static str, f64) {
        ("rank", 0.0)
    }
    fn recommended_adam(&self, _d_sae: usize, _steps: u64) -> (f32, f32, f32) {
        ADAM
    }
    fn supports_tensor(&self) -> bool {
        true
    }
}

impl ArchSpec for PcaConfig {
    fn kind(&self) -> &'static str {
        ARCH_PCA
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        if self.rank == 0 {
            return Err(SaeError::Config {
                arch: ARCH_PCA,
                msg: "rank must be >= 1 (rank 0 is kind = \"kmeans\")".into(),
            });
        }
        Ok(Box::new(KMeans::new(self.rank, d, f, rng)?))
    }
    fn with_sparsity(&self, factor: f32) -> ArchConfig {
        PcaConfig {
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
    fn problems(&self, d_sae: Option<usize>) -> Vec<(&'static str, String)> {
        if self.rank == 0 {
            return vec![(
                "rank",
                "0: must be at least 1 (rank 0 is kind = \"kmeans\")".into(),
            )];
        }
        match d_sae.filter(|&f| f < 1 + self.rank) {
            Some(f) => vec![(
                "rank",
                format!(
                    "{}: sae.d_sae = {f} is less than 1 + rank = {}, no room for a single cluster; lower the rank or raise d_sae",
                    self.rank,
                    1 + self.rank
                ),
            )],
            None => Vec::new(),
        }
    }
}

/// `cfg.json` of the `kmeans` format: cluster c owns latents c(1+rank) .. c(1+rank)+rank;
/// `assignment` (optional) is `"nearest_centroid"` (the default, `kmeans`, `kmeans_pca`,
/// `local_pca`) or `"residual"` (`kflats`).
fn read_cfg(
    cfg: &serde_json::Value,
    f: usize,
) -> Result<Vec<(String, serde_json::Value)>, String> {
    let assignment = match &cfg["assignment"] {
        serde_json::Value::Null => "nearest_centroid",
        serde_json::Value::String(a) if a == "nearest_centroid" || a == "residual" => a.as_str(),
        other => {
            return Err(format!(
                "kmeans `assignment` must be \"nearest_centroid\" or \"residual\", not {other}"
            ))
        }
    };
    match (cfg["rank"].as_u64(), cfg["n_clusters"].as_u64()) {
        (Some(r), Some(kc)) if kc >= 1 && kc * (1 + r) <= f as u64 => Ok(vec![
            ("rank".to_string(), serde_json::json!(r)),
            ("n_clusters".to_string(), serde_json::json!(kc)),
            ("assignment".to_string(), serde_json::json!(assignment)),
        ]),
        _ => Err(
            "kmeans needs integers `rank` and `n_clusters` with n_clusters·(1+rank) <= d_sae"
                .into(),
        ),
    }
}

/// `kmeans` encode: the cluster is the argmax over the centroid latents of
/// `x W_enc + b_enc` (nearest centroid), or with `assignment = "residual"` (k-flats) the
/// argmax of `p_c / s_c + ½ Σ_j p_{c,j}²`: the smallest residual `‖(x̃ − μ_c)(I − U_cᵀU_c)‖²`
/// in raw units, where `p_c = s_c·(⟨μ_c, x̃⟩ − ½‖μ_c‖²)` is the folded centroid
/// pre-activation (`s_c` = the training input scale, recovered as `‖W_enc row‖ /
/// code_value` since the folded row is `s_c μ_c` and `code_value = ‖μ_c‖`) and `p_{c,j}` the
/// subspace coordinates. The cluster's centroid latent gets its `code_value`, its subspace
/// latents their linear codes.
fn encode_loaded(t: &Folded, n: usize, ws: &mut Workspace) {
    let (s, kc) = (1 + t.extra_usize("rank"), t.extra_usize("n_clusters"));
    let cv = t.per("code_value");
    let residual = t
        .extra_cfg
        .iter()
        .any(|(k, v)| k == "assignment" && v == "residual");
    let inv_scale: Vec<f32> = (0..kc)
        .map(|cl| {
            let row = &t.w_enc[cl * s * t.d_in..(cl * s + 1) * t.d_in];
            let nw = c::dot(row, row).sqrt();
            if nw > 0.0 {
                cv[cl * s] / nw
            } else {
                0.0
            }
        })
        .collect();
    c::encode_collect(
        ws,
        n,
        t.d_in,
        &t.w_enc,
        t.d_sae,
        Some(t.per("b_enc")),
        |_, row, buf| {
            let score = |cl: usize| {
                let base = cl * s;
                if residual {
                    row[base] * inv_scale[cl]
                        + 0.5 * row[base + 1..base + s].iter().map(|a| a * a).sum::<f32>()
                } else {
                    row[base]
                }
            };
            let (mut best, mut bs) = (0, score(0));
            for cl in 1..kc {
                let v = score(cl);
                if v > bs {
                    (best, bs) = (cl, v);
                }
            }
            let base = best * s;
            if cv[base] != 0.0 {
                buf.main.push((base as u32, cv[base]));
            }
            for j in 1..s {
                if row[base + j] != 0.0 {
                    buf.main.push(((base + j) as u32, row[base + j]));
                }
            }
        },
    );
}

const W_ENC: usize = 0;
const W_DEC: usize = 1;
const B_DEC: usize = 2;
const COUNTS: usize = 3;

/// The k-means (rank 0) or k-means + local-PCA (rank ≥ 1) autoencoder.
pub struct KMeans {
    rank: usize,
    d: usize,
    f: usize,
    k: usize,
    seed: u64,
    params: Vec<Param>,
    /// What the tensor forward leaves for [`Sae::update_state`] (`tensor.rs`).
    slot: StepSlot,
}

impl KMeans {
    /// Build with `rank` subspace dimensions per cluster (0 = plain k-means).
    pub fn new(rank: usize, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        let arch = if rank == 0 { ARCH } else { ARCH_PCA };
        let k = f / (1 + rank);
        if k == 0 {
            return Err(SaeError::Config {
                arch,
                msg: format!(
                    "d_sae = {f} is less than 1 + rank = {}: no room for a single cluster",
                    1 + rank
                ),
            });
        }
        // Subspace rows: random unit directions, encoder = decoder (tied init). Centroid rows
        // are set by k-means++ on the first batch; until then they are small random vectors.
        let mut w = c::random_rows(rng, f, d, 1e-3);
        if rank > 0 {
            let dirs = c::random_rows(rng, k * rank, d, 1.0);
            for cl in 0..k {
                for j in 0..rank {
                    let lat = cl * (1 + rank) + 1 + j;
                    let src = (cl * rank + j) * d;
                    w[lat * d..(lat + 1) * d].copy_from_slice(&dirs[src..src + d]);
                }
            }
        }
        let trainable = rank > 0;
        let mut enc = Param::new("W_enc", vec![f, d], w.clone());
        enc.trainable = trainable;
        let mut dec = Param::new("W_dec", vec![f, d], w);
        dec.trainable = trainable;
        let mut bd = Param::new("b_dec", vec![d], vec![0.0; d]);
        bd.trainable = false;
        let mut counts = Param::new("counts", vec![k], vec![0.0; k]);
        counts.trainable = false;
        Ok(Self {
            rank,
            d,
            f,
            k,
            seed: rng.next_u64(),
            params: vec![enc, dec, bd, counts],
            slot: StepSlot::default(),
        })
    }

    fn stride(&self) -> usize {
        1 + self.rank
    }

    /// Centroids `[K, d]` into `out` (relative to `b_dec`).
    fn centroids(&self, out: &mut Vec<f32>) {
        let (d, s) = (self.d, self.stride());
        c::resize(out, self.k * d);
        let w = &self.params[W_DEC].data;
        out.par_chunks_mut(d)
            .enumerate()
            .for_each(|(cl, row)| row.copy_from_slice(&w[cl * s * d..(cl * s + 1) * d]));
    }

    /// Nearest centroid of every row of `ws.xt` into `assign` (chunked GEMM + argmax).
    fn assign(&self, n: usize, ws: &mut Workspace, assign: &mut Vec<u32>) {
        let (d, k) = (self.d, self.k);
        let mut cent = std::mem::take(&mut ws.lat2);
        self.centroids(&mut cent);
        let mut bias = std::mem::take(&mut ws.lat);
        c::resize(&mut bias, k);
        bias.par_iter_mut()
            .zip(cent.par_chunks(d))
            .for_each(|(b, r)| *b = -0.5 * c::dot(r, r));
        let mut pre = std::mem::take(&mut ws.aux_recon);
        assign.clear();
        assign.resize(n, 0);
        let mut lo = 0;
        while lo < n {
            let hi = (lo + c::CHUNK).min(n);
            c::resize(&mut pre, (hi - lo) * k);
            c::gemm_xwt(
                &ws.xt[lo * d..hi * d],
                hi - lo,
                d,
                &cent,
                k,
                Some(&bias),
                &mut pre[..(hi - lo) * k],
            );
            assign[lo..hi]
                .par_iter_mut()
                .zip(pre.par_chunks(k))
                .for_each(|(a, row)| {
                    let mut best = 0usize;
                    for (i, v) in row.iter().enumerate() {
                        if *v > row[best] {
                            best = i;
                        }
                    }
                    *a = best as u32;
                });
            lo = hi;
        }
        ws.lat2 = cent;
        ws.lat = bias;
        ws.aux_recon = pre;
    }

    /// Codes from the assignment: the centroid latent (value 1) and, for rank ≥ 1, the
    /// subspace coordinates `a_j = ⟨e_j, x̃ − μ_c⟩` (exact zeros are not stored).
    fn build_codes(&self, assign: &[u32], ws: &mut Workspace) {
        let (d, s, r) = (self.d, self.stride(), self.rank);
        let n = assign.len();
        let w_enc = &self.params[W_ENC].data;
        let w_dec = &self.params[W_DEC].data;
        let mut vals = vec![0.0f32; n * s];
        let xt = &ws.xt;
        vals.par_chunks_mut(s).enumerate().for_each(|(b, v)| {
            v[0] = 1.0;
            if r == 0 {
                return;
            }
            let base = assign[b] as usize * s;
            let mu = &w_dec[base * d..(base + 1) * d];
            let x = &xt[b * d..(b + 1) * d];
            for (j, vj) in v.iter_mut().enumerate().skip(1) {
                let e = &w_enc[(base + j) * d..(base + j + 1) * d];
                *vj = c::dot(e, x) - c::dot(e, mu);
            }
        });
        ws.codes.clear();
        for (b, &cl) in assign.iter().enumerate() {
            let base = cl as usize * s;
            for j in 0..s {
                let v = vals[b * s + j];
                if v != 0.0 && v.is_finite() {
                    ws.codes.idx.push((base + j) as u32);
                    ws.codes.val.push(v);
                }
            }
            ws.codes.indptr.push(ws.codes.idx.len());
        }
    }

    /// k-means++ seeding from the rows of `xt` (`n` tokens).
    fn seed_centroids(&mut self, xt: &[f32], n: usize) {
        let (d, s) = (self.d, self.stride());
        for (cl, pick) in kmeans_pp(xt, n, d, self.k, self.seed).into_iter().enumerate() {
            let mu = &xt[pick * d..(pick + 1) * d];
            let lat = cl * s;
            self.params[W_DEC].data[lat * d..(lat + 1) * d].copy_from_slice(mu);
            self.params[W_ENC].data[lat * d..(lat + 1) * d].copy_from_slice(mu);
        }
    }

    /// One mini-batch k-means step on the assigned rows of `xt`.
    fn update_centroids(&mut self, xt: &[f32], assign: &[u32]) {
        let (d, k) = (self.d, self.k);
        let mut sums = vec![0.0f64; k * d];
        let mut m = vec![0.0f64; k];
        for (b, &cl) in assign.iter().enumerate() {
            let cl = cl as usize;
            m[cl] += 1.0;
            for (a, v) in sums[cl * d..(cl + 1) * d]
                .iter_mut()
                .zip(&xt[b * d..(b + 1) * d])
            {
                *a += *v as f64;
            }
        }
        self.apply_centroid_step(&sums, &m);
    }

    /// `μ_c ← μ_c + (Σ_{b∈c} x̃_b − m_c μ_c)/n_c` from the batch's per-cluster sums `[k·d]`
    /// and counts `m_c` (host or device sums, [`Self::update_centroids`] / `tensor.rs`).
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
}

impl Sae for KMeans {
    fn arch(&self) -> &'static str {
        if self.rank == 0 {
            ARCH
        } else {
            ARCH_PCA
        }
    }
    fn config(&self) -> ArchConfig {
        if self.rank == 0 {
            Config {}.into()
        } else {
            PcaConfig { rank: self.rank }.into()
        }
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
        check_width(self.arch(), self.d, x, n)?;
        c::prepare_input(x, self.d, Some(&self.params[B_DEC].data), &mut ws.xt);
        let mut assign = std::mem::take(&mut ws.dead);
        self.assign(n, ws, &mut assign);
        self.build_codes(&assign, ws);
        ws.dead = assign;
        Ok(())
    }

    fn forward_backward(
        &mut self,
        input: &StepInput,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, SaeError> {
        let (d, f, n) = (self.d, self.f, input.n);
        check_width(self.arch(), d, input.x, n)?;
        self.slot.clear();
        c::prepare_input(input.x, d, Some(&self.params[B_DEC].data), &mut ws.xt);
        if self.params[COUNTS].data.iter().all(|&v| v == 0.0) {
            if self.k > n {
                return Err(SaeError::Config {
                    arch: self.arch(),
                    msg: format!(
                        "{} clusters (d_sae / (1 + rank)) are more than the {n} tokens of the first batch that k-means++ seeds them from; raise train.batch_tokens or lower d_sae",
                        self.k
                    ),
                });
            }
            let xt = std::mem::take(&mut ws.xt);
            self.seed_centroids(&xt, n);
            ws.xt = xt;
        }
        // 1. assignment and codes with the current centroids
        let mut assign = std::mem::take(&mut ws.dead);
        self.assign(n, ws, &mut assign);
        self.build_codes(&assign, ws);
        // 2. reconstruction, loss and g = 2(x̂ − x)/B
        let p = &self.params;
        c::decode(
            &mut ws.scratch,
            &ws.codes,
            &p[W_DEC].data,
            d,
            f,
            Some(&p[B_DEC].data),
            &mut ws.recon,
        );
        let sse = c::residual(&ws.recon, input.x, d, 2.0 / n as f32, &mut ws.resid);
        // 3. subspace gradients (centroid entries get coefficient 0: k-means moves them)
        if self.rank > 0 {
            let s = self.stride();
            c::entry_dots(
                &mut ws.scratch,
                &ws.codes,
                &p[W_DEC].data,
                d,
                f,
                &ws.resid,
                &mut ws.gvals,
            );
            c::resize(&mut ws.coef, ws.codes.nnz());
            c::resize(&mut ws.aux_coef, ws.codes.nnz());
            for (e, &i) in ws.codes.idx.iter().enumerate() {
                let sub = !(i as usize).is_multiple_of(s);
                ws.coef[e] = if sub { ws.gvals[e] } else { 0.0 };
                ws.aux_coef[e] = if sub { ws.codes.val[e] } else { 0.0 };
            }
            // centred inputs x̃_b − μ_{c(b)}
            c::resize(&mut ws.aux_resid, n * d);
            let w_dec = &p[W_DEC].data;
            ws.aux_resid
                .par_chunks_mut(d)
                .enumerate()
                .for_each(|(b, o)| {
                    let base = assign[b] as usize * s;
                    let mu = &w_dec[base * d..(base + 1) * d];
                    for ((oo, x), m) in o.iter_mut().zip(&ws.xt[b * d..(b + 1) * d]).zip(mu) {
                        *oo = x - m;
                    }
                });
            let (ge, gd) = grads.split_at_mut(W_DEC);
            c::accumulate_rows(
                &mut ws.scratch,
                &ws.codes,
                &ws.coef,
                &ws.aux_resid,
                d,
                f,
                &mut ge[W_ENC],
            );
            c::accumulate_rows(
                &mut ws.scratch,
                &ws.codes,
                &ws.aux_coef,
                &ws.resid,
                d,
                f,
                &mut gd[0],
            );
        }
        // the assignment stays in `ws.dead` for `update_state`
        ws.dead = assign;
        let mse = sse / n as f64;
        Ok(StepOutput {
            loss: mse,
            losses: vec![("mse", mse)],
            metrics: vec![],
        })
    }

    /// Mini-batch k-means step on `ws.xt` (`x̃` of the step) with the assignment
    /// `forward_backward` left in `ws.dead`; after a tensor step, on its device results
    /// (`tensor.rs`).
    fn update_state(&mut self, input: &StepInput, ws: &Workspace) {
        if let Some(st) = self.slot.take(input.step, input.n) {
            self.tensor_update_state(st, input, ws);
        } else if ws.dead.len() == input.n && ws.xt.len() == input.n * self.d {
            self.update_centroids(&ws.xt, &ws.dead);
        }
    }

    fn tensor_forward(
        &self,
        params: &[candle_core::Tensor],
        input: &crate::sae::tensor::TensorInput,
    ) -> Result<crate::sae::tensor::TensorForward, SaeError> {
        self.tensor_step(params, input)
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
                let e = &self.params[W_ENC].data[lat * d..(lat + 1) * d];
                w_enc[lat * d..(lat + 1) * d].copy_from_slice(e);
                b_enc[lat] = -c::dot(e, mu);
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
            ],
        }
    }
}


/// k-means++ seeding (Arthur & Vassilvitskii 2007): the row indices of `k` centroids drawn
/// from the `n` rows of `xt` (width `d`), each with probability proportional to its squared
/// distance from the nearest centroid drawn so far; seeded by `seed`. Shared by the
/// k-means baselines (`kmeans`, `kmeans_pca`, `local_pca`, `kflats`).
pub(crate) fn kmeans_pp(xt: &[f32], n: usize, d: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut rng = Rng::new(seed);
    let mut dist = vec![f32::INFINITY; n];
    let mut pick = rng.below(n as u64) as usize;
    let mut picks = Vec::with_capacity(k);
    for _ in 0..k {
        picks.push(pick);
        let mu = &xt[pick * d..(pick + 1) * d];
        dist.par_iter_mut()
            .zip(xt.par_chunks(d))
            .for_each(|(dd, x)| {
                let e: f32 = x.iter().zip(mu).map(|(a, b)| (a - b) * (a - b)).sum();
                *dd = dd.min(e);
            });
        let total: f64 = dist.iter().map(|&v| v as f64).sum();
        pick = if total > 0.0 {
            let target = rng.uniform() * total;
            let mut acc = 0.0f64;
            let mut p = n - 1;
            for (i, &v) in dist.iter().enumerate() {
                acc += v as f64;
                if acc > target {
                    p = i;
                    break;
                }
            }
            p
        } else {
            rng.below(n as u64) as usize
        };
    }
    picks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_finds_well_separated_clusters() {
        // 4 tight clusters in 3-d: after a few mini-batch steps every token reconstructs to
        // its own cluster centre.
        let centres = [
            [5.0f32, 0.0, 0.0],
            [0.0, 5.0, 0.0],
            [0.0, 0.0, 5.0],
            [-5.0, -5.0, 0.0],
        ];
        let mut rng = Rng::new(3);
        let n = 256;
        let mut x = Vec::new();
        for b in 0..n {
            let cc = centres[b % 4];
            for v in cc {
                x.push(v + 0.01 * rng.normal() as f32);
            }
        }
        let mut sae = KMeans::new(0, 3, 4, &mut Rng::new(1)).unwrap();
        let mut grads: Vec<Vec<f32>> = sae
            .params()
            .iter()
            .map(|p| vec![0.0; p.data.len()])
            .collect();
        let mut ws = Workspace::default();
        let mut last = f64::INFINITY;
        for step in 0..5 {
            let out = sae
                .forward_backward(
                    &StepInput {
                        x: &x,
                        n,
                        step,
                        sparsity_scale: 1.0,
                        dead: &[],
                    },
                    &mut grads,
                    &mut ws,
                )
                .unwrap();
            let input = StepInput {
                x: &x,
                n,
                step,
                sparsity_scale: 1.0,
                dead: &[],
            };
            sae.update_state(&input, &ws);
            last = out.loss;
        }
        assert!(last < 0.01, "mse {last}");
        sae.encode(&x, n, &mut ws).unwrap();
        assert_eq!(ws.codes.nnz(), n, "L0 = 1");
    }
}
