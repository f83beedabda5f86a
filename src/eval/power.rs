//! Power-diagram diagnostics of TopK-family SAEs (`jsae_pamsgd.md` §2.1, §2.5), computed on
//! the held-out tokens from the evaluation encode.
//!
//! With `a_i(x) = ⟨w_i, x⟩ + b'_i` (`w_i` the exported encoder rows, `b'_i = b_enc,i −
//! ⟨w_i, b_dec⟩` when `b_dec` is applied to the input), `a_i = ½(‖x‖² − π_i(x))` with the power
//! distance `π_i(x) = ‖x − w_i‖² − (‖w_i‖² + 2b'_i)`, so the TopK selection `S(x)` is the set
//! of the K power-nearest sites: the cell of the K-th-order power diagram. For AbsTopK the
//! sites are the 2m signed pairs `(±w_i, ±b'_i)` and the value of a site is `|a_i|` with
//! `σ_i = sign(a_i)`. Per token (`s` = the sorted site values `a` or `|a|`):
//!
//! ```text
//! margin        δ(x) = s_(K) − s_(K+1)                                   (pre-activation units)
//! facet distance  ρ(x) = min over i ∈ S and competitor sites c of (s_i − v_c) / ‖σ_i w_i − τ_c w_c‖
//!                 competitors: the next R latents by s (TopK: site w_j, value a_j; AbsTopK:
//!                 both signs of each, values ±|a_j|, and each i's own antipode −σ_i w_i)
//!                                                                        (raw activation units)
//! active sets     the distinct sorted S over the tokens: count, largest share,
//!                 effective number exp(−Σ p log p); the same for the top-1 latent ("cells")
//! local-affine gap  tokens grouped by top-1 latent; per group R with n_R ≥ n_min tokens:
//!                 SAE:  Σ_{t∈R} ‖x_t − x̂_t‖²
//!                 PCA:  n_R · Σ_{l>K} λ_l(Cov_R)    (the best rank-K affine fit, §2.4, in-sample)
//!                 reported as pooled per-token MSEs over those groups, their ratio, the share
//!                 of tokens the groups cover and the number of groups
//! ```
//!
//! Decision: which SAEs have the diagram. `topk` (ReLU after the selection) and `abs_topk`
//! files: the selection is exactly a K-th-order power cell (for `topk` the ReLU zeroes
//! selected latents with `a_i ≤ 0` inside a cell; those kinks are not facets here).
//! BatchTopK is exported and evaluated as a JumpReLU with one global threshold, whose
//! regions are the hyperplane arrangement `{a_i = θ}` with a variable L0, not a
//! power diagram: its rows (and every other variant's) get null columns.
//! Decision: the facet distance is exact over the competitors listed above: the nearest
//! point of the nearest of those hyperplanes `{s_i = v_c}` lies on the cell boundary (the
//! ball of that radius is inside every half-space), so with R ≥ m − K it is the exact
//! distance to the cell boundary; with fewer candidates it is an upper bound that is exact
//! unless a latent ranked below the next R has a nearer facet. Pairs are pruned with the lower
//! bound `(s_i − v_c)/(‖w_i‖ + ‖w_c‖)` (§2.5), so few of the `K·R` dot products are computed.
//! Decision: the active set is the set of selected latents without signs (for AbsTopK the
//! map is affine on the union of the signed cells of one latent set); top-1 groups are by
//! latent, either sign.
//! Decision: the local-PCA optimum follows the spec (`l > K`: mean plus K principal
//! directions, the rank of the SAE's affine piece), in-sample on each group, so it needs
//! groups much larger than d: the default `n_min` is `2·d_in`. Covariances are accumulated in
//! f64 about `b_dec` (near the data mean, less cancellation) in a second pass over the
//! held-out activations, for the largest groups that fit in [`COV_BUDGET_BYTES`];
//! eigenvalues by `nalgebra` (`SymmetricEigen`).

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::kernels::{self as c, Codes, TaskBuf, Workspace};
use crate::sae::export::Folded;

/// Default number of next candidates R for the facet distance (`eval.power_candidates`).
pub const DEFAULT_CANDIDATES: usize = 16;
/// Memory for the per-group scatter matrices of the local-affine gap (f64 `d × d` each).
pub const COV_BUDGET_BYTES: usize = 1 << 30;

/// The power-diagram view of an exported SAE: `K` and whether sites are signed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerSpec {
    /// Selected latents per token.
    pub k: usize,
    /// AbsTopK: 2m signed sites, values `|a|`.
    pub signed: bool,
}

impl PowerSpec {
    /// The diagram of a loaded file, `None` for architectures without one.
    pub fn of(t: &Folded) -> Option<Self> {
        let k = t.k?;
        match t.architecture.as_str() {
            "topk" => Some(Self { k, signed: false }),
            "abs_topk" => Some(Self { k, signed: true }),
            _ => None,
        }
    }
}

/// Settings (`[eval]` keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PowerConfig {
    /// R: candidates after the K-th for the facet distance (`eval.power_candidates`).
    pub candidates: usize,
    /// Smallest top-1 group in the local-affine gap (`eval.power_min_cell_tokens`);
    /// `None` = 2·d_in.
    pub min_cell_tokens: Option<u64>,
}

/// The `pd_*` columns of `metrics.parquet`; null for SAEs without a power diagram.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PowerValues {
    /// Mean over tokens of `s_(K) − s_(K+1)` (pre-activation units).
    #[serde(default)]
    pub pd_margin_mean: Option<f64>,
    /// Mean over tokens of the distance to the nearest cell facet (raw activation units).
    #[serde(default)]
    pub pd_facet_dist_mean: Option<f64>,
    /// `pd_facet_dist_mean / sqrt(SST/N)`: relative to the RMS spread of the activations.
    #[serde(default)]
    pub pd_facet_dist_rel: Option<f64>,
    /// Distinct active sets (sorted selections) on the evaluated tokens.
    #[serde(default)]
    pub pd_n_active_sets: Option<f64>,
    /// Share of tokens in the most common active set.
    #[serde(default)]
    pub pd_top_set_share: Option<f64>,
    /// Effective number of active sets, `exp(entropy)` of their occupancy.
    #[serde(default)]
    pub pd_eff_active_sets: Option<f64>,
    /// Distinct top-1 latents (non-empty first-order cells).
    #[serde(default)]
    pub pd_n_top1_cells: Option<f64>,
    /// Effective number of top-1 cells.
    #[serde(default)]
    pub pd_eff_top1_cells: Option<f64>,
    /// SAE MSE per token on the tokens of the qualifying top-1 groups.
    #[serde(default)]
    pub pd_affine_sae_mse: Option<f64>,
    /// Local-PCA (rank-K affine) optimum MSE per token on the same tokens.
    #[serde(default)]
    pub pd_affine_pca_mse: Option<f64>,
    /// `pd_affine_sae_mse / pd_affine_pca_mse` (the "interpretability tax"; ≥ 1 per cell).
    #[serde(default)]
    pub pd_affine_ratio: Option<f64>,
    /// Share of the evaluated tokens in the qualifying groups.
    #[serde(default)]
    pub pd_affine_tokens_frac: Option<f64>,
    /// Number of qualifying top-1 groups.
    #[serde(default)]
    pub pd_affine_cells: Option<f64>,
}

impl PowerValues {
    /// Column names, in table order.
    pub const NAMES: [&'static str; 13] = [
        "pd_margin_mean",
        "pd_facet_dist_mean",
        "pd_facet_dist_rel",
        "pd_n_active_sets",
        "pd_top_set_share",
        "pd_eff_active_sets",
        "pd_n_top1_cells",
        "pd_eff_top1_cells",
        "pd_affine_sae_mse",
        "pd_affine_pca_mse",
        "pd_affine_ratio",
        "pd_affine_tokens_frac",
        "pd_affine_cells",
    ];

    /// Values in [`PowerValues::NAMES`] order.
    pub fn values(&self) -> [Option<f64>; 13] {
        [
            self.pd_margin_mean,
            self.pd_facet_dist_mean,
            self.pd_facet_dist_rel,
            self.pd_n_active_sets,
            self.pd_top_set_share,
            self.pd_eff_active_sets,
            self.pd_n_top1_cells,
            self.pd_eff_top1_cells,
            self.pd_affine_sae_mse,
            self.pd_affine_pca_mse,
            self.pd_affine_ratio,
            self.pd_affine_tokens_frac,
            self.pd_affine_cells,
        ]
    }
}

/// The encode of an exported `topk` / `abs_topk` file, with the diagram's candidates:
/// `ws.codes` gets exactly the codes of [`crate::sae::export::LoadedSae::encode`] (the same
/// selection calls), `ws.aux` the `K + max(R, 1)` best sites per token sorted by value (ties:
/// lower index), with their signed pre-activations.
pub fn encode(t: &Folded, spec: PowerSpec, r: usize, x: &[f32], n: usize, ws: &mut Workspace) {
    c::prepare_input(
        x,
        t.d_in,
        t.apply_b_dec_to_input.then_some(&t.b_dec[..]),
        &mut ws.xt,
    );
    let m = spec.k + r.max(1);
    c::encode_collect(
        ws,
        n,
        t.d_in,
        &t.w_enc,
        t.d_sae,
        Some(t.per("b_enc")),
        |_, row, buf| {
            if spec.signed {
                crate::sae::abs_topk::select_abs(row, spec.k, buf);
            } else {
                c::topk_positive(row, spec.k, &mut buf.scratch, &mut buf.main);
            }
            push_candidates(row, m, spec.signed, buf);
        },
    );
}

/// The `m` best sites of one token into `buf.aux`, sorted by value (`a`, or `|a|` when
/// signed) descending, ties by lower index, values signed.
fn push_candidates(row: &[f32], m: usize, signed: bool, buf: &mut TaskBuf) {
    let s = buf.aux.len();
    if signed {
        buf.scratch2.clear();
        buf.scratch2.extend(row.iter().map(|v| v.abs()));
        c::topk_select(&buf.scratch2, m, &mut buf.scratch, &mut buf.aux);
    } else {
        c::topk_select(row, m, &mut buf.scratch, &mut buf.aux);
    }
    let seg = &mut buf.aux[s..];
    seg.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    for e in seg.iter_mut() {
        e.1 = row[e.0 as usize];
    }
}

/// Site value of a candidate: `a`, or `|a|` for signed sites.
#[inline]
fn value(v: f32, signed: bool) -> f64 {
    if signed {
        (v as f64).abs()
    } else {
        v as f64
    }
}

/// `s_(K) − s_(K+1)` of one token's sorted candidate values `vs`; `None` when there is no
/// (K+1)-th.
pub fn margin(vs: &[f32], k: usize, signed: bool) -> Option<f64> {
    (vs.len() > k && k > 0).then(|| value(vs[k - 1], signed) - value(vs[k], signed))
}

/// Distance from the token to the nearest facet of its cell among the competitors of its
/// sorted candidates `(ix, vs)` (the K selected, then the next ones), see the module doc.
/// `w`: encoder rows `[f, d]`, `norms[i] = ‖w_i‖`, `max_norm = max_i norms[i]`.
/// `None` when there is no competitor (K = m) or every pair is degenerate.
pub fn facet_distance(
    (ix, vs): (&[u32], &[f32]),
    k: usize,
    signed: bool,
    w: &[f32],
    d: usize,
    norms: &[f32],
    max_norm: f32,
) -> Option<f64> {
    if ix.len() <= k || k == 0 {
        return None;
    }
    // competitors: (latent, site sign τ, value)
    let mut comp: Vec<(u32, f64, f64)> = Vec::with_capacity(2 * (ix.len() - k) + k);
    for (&j, &a) in ix[k..].iter().zip(&vs[k..]) {
        let sj = if a < 0.0 { -1.0 } else { 1.0 };
        if signed {
            comp.push((j, sj, (a as f64).abs()));
            comp.push((j, -sj, -(a as f64).abs()));
        } else {
            comp.push((j, 1.0, a as f64));
        }
    }
    if signed {
        for (&i, &a) in ix[..k].iter().zip(&vs[..k]) {
            let si = if a < 0.0 { -1.0 } else { 1.0 };
            comp.push((i, -si, -(a as f64).abs()));
        }
    }
    let v_max = comp.iter().map(|c| c.2).fold(f64::NEG_INFINITY, f64::max);
    let n_comp_max = comp
        .iter()
        .map(|c| norms[c.0 as usize] as f64)
        .fold(0.0, f64::max);
    let mut best = f64::INFINITY;
    let row = |i: u32| &w[i as usize * d..(i as usize + 1) * d];
    // i from the K-th upwards: numerators s_i − v only grow, so once even the loosest lower
    // bound (largest norms anywhere) reaches `best`, no earlier i can beat it.
    for (&i, &a) in ix[..k].iter().zip(&vs[..k]).rev() {
        let si_val = value(a, signed);
        if (si_val - v_max) / (max_norm as f64 + n_comp_max) >= best {
            break;
        }
        let si = if signed && a < 0.0 { -1.0 } else { 1.0 };
        let ni = norms[i as usize] as f64;
        for &(j, tj, v) in &comp {
            if signed && j == i && tj == si {
                continue;
            }
            let num = (si_val - v).max(0.0);
            let nj = norms[j as usize] as f64;
            if num / (ni + nj).max(f64::MIN_POSITIVE) >= best {
                continue;
            }
            let dot = if j == i {
                ni * ni
            } else {
                c::dot(row(i), row(j)) as f64
            };
            let den2 = ni * ni + nj * nj - 2.0 * si * tj * dot;
            if den2 <= 1e-24 * (ni * ni + nj * nj).max(f64::MIN_POSITIVE) {
                continue; // the same site twice: never a facet
            }
            best = best.min(num / den2.sqrt());
        }
    }
    best.is_finite().then_some(best)
}

/// 64-bit FNV-1a of a sorted latent set.
fn set_hash(ix: &[u32]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &i in ix {
        for b in i.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// `exp(−Σ p log p)` of counts.
fn effective_number<'a>(counts: impl Iterator<Item = &'a u64>, total: u64) -> f64 {
    let t = total.max(1) as f64;
    let h: f64 = counts
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / t;
            -p * p.ln()
        })
        .sum();
    h.exp()
}

/// Streaming accumulator of the diagnostics of one SAE.
#[derive(Debug)]
pub struct PowerStats {
    spec: PowerSpec,
    cfg: PowerConfig,
    d: usize,
    norms: Vec<f32>,
    max_norm: f32,
    n: u64,
    margin_sum: f64,
    margin_n: u64,
    facet_sum: f64,
    facet_n: u64,
    sets: BTreeMap<u64, u64>,
    top1: Vec<u64>,
    top1_sse: Vec<f64>,
    token_top1: Vec<u32>,
    sorted: Vec<u32>,
    affine: Option<Affine>,
}

/// Second-pass state of the local-affine gap.
#[derive(Debug)]
struct Affine {
    /// Group slot of each top-1 latent (`u32::MAX`: not accumulated).
    slot: Vec<u32>,
    /// Latent of each slot.
    latents: Vec<u32>,
    /// Σ (x − b_dec) per slot, `[d]`.
    sum: Vec<Vec<f64>>,
    /// Σ (x − b_dec)(x − b_dec)ᵀ per slot, upper triangle of `[d, d]`.
    scatter: Vec<Vec<f64>>,
    /// Tokens consumed so far in the second pass.
    at: usize,
    /// Tokens of qualifying groups that did not fit in the memory budget.
    dropped: bool,
}

impl PowerStats {
    /// Empty accumulator for the file `t` with diagram `spec`.
    pub fn new(t: &Folded, spec: PowerSpec, cfg: PowerConfig) -> Self {
        let mut norms = Vec::new();
        c::row_norms(&t.w_enc, t.d_in, &mut norms);
        let max_norm = norms.iter().copied().fold(0.0, f32::max);
        Self {
            spec,
            cfg,
            d: t.d_in,
            norms,
            max_norm,
            n: 0,
            margin_sum: 0.0,
            margin_n: 0,
            facet_sum: 0.0,
            facet_n: 0,
            sets: BTreeMap::new(),
            top1: vec![0; t.d_sae],
            top1_sse: vec![0.0; t.d_sae],
            token_top1: Vec::new(),
            sorted: Vec::new(),
            affine: None,
        }
    }

    /// R, the number of candidates after the K-th that [`encode`] must collect.
    pub fn candidates(&self) -> usize {
        self.cfg.candidates
    }

    /// Add a batch encoded by [`encode`]: raw `x`, raw reconstruction, the candidates in
    /// `cands` (`ws.aux`), encoder rows `w_enc` `[f, d]`.
    pub fn update(&mut self, x: &[f32], recon: &[f32], cands: &Codes, w_enc: &[f32]) {
        let (k, signed, d) = (self.spec.k, self.spec.signed, self.d);
        let (norms, max_norm) = (&self.norms, self.max_norm);
        let facets: Vec<Option<f64>> = (0..cands.n())
            .into_par_iter()
            .map(|b| facet_distance(cands.row(b), k, signed, w_enc, d, norms, max_norm))
            .collect();
        for (b, facet) in facets.into_iter().enumerate() {
            let (ix, vs) = cands.row(b);
            if let Some(m) = margin(vs, k, signed) {
                self.margin_sum += m;
                self.margin_n += 1;
            }
            if let Some(f) = facet {
                self.facet_sum += f;
                self.facet_n += 1;
            }
            let kk = k.min(ix.len());
            self.sorted.clear();
            self.sorted.extend_from_slice(&ix[..kk]);
            self.sorted.sort_unstable();
            *self.sets.entry(set_hash(&self.sorted)).or_insert(0) += 1;
            let top = ix.first().copied().unwrap_or(0);
            let sse: f64 = x[b * d..(b + 1) * d]
                .iter()
                .zip(&recon[b * d..(b + 1) * d])
                .map(|(&a, &r)| {
                    let e = a as f64 - r as f64;
                    e * e
                })
                .sum();
            self.top1[top as usize] += 1;
            self.top1_sse[top as usize] += sse;
            self.token_top1.push(top);
            self.n += 1;
        }
    }

    /// Smallest qualifying group.
    fn min_tokens(&self) -> u64 {
        self.cfg.min_cell_tokens.unwrap_or(2 * self.d as u64).max(1)
    }

    /// Start the second pass of the local-affine gap; returns false when no group
    /// qualifies (no second pass needed).
    pub fn begin_affine(&mut self) -> bool {
        let min = self.min_tokens();
        let mut groups: Vec<u32> = (0..self.top1.len() as u32)
            .filter(|&i| self.top1[i as usize] >= min)
            .collect();
        if groups.is_empty() {
            return false;
        }
        groups.sort_by(|&a, &b| {
            self.top1[b as usize]
                .cmp(&self.top1[a as usize])
                .then(a.cmp(&b))
        });
        let per = 8 * self.d * (self.d + 1) / 2 + 8 * self.d;
        let fit = (COV_BUDGET_BYTES / per.max(1)).max(1);
        let dropped = groups.len() > fit;
        groups.truncate(fit);
        let mut slot = vec![u32::MAX; self.top1.len()];
        for (s, &g) in groups.iter().enumerate() {
            slot[g as usize] = s as u32;
        }
        let tri = self.d * (self.d + 1) / 2;
        self.affine = Some(Affine {
            slot,
            sum: vec![vec![0.0; self.d]; groups.len()],
            scatter: vec![vec![0.0; tri]; groups.len()],
            latents: groups,
            at: 0,
            dropped,
        });
        true
    }

    /// Second pass: the same raw tokens in the same order; `center` is `b_dec`.
    pub fn affine_update(&mut self, x: &[f32], center: &[f32]) {
        let d = self.d;
        let Some(a) = self.affine.as_mut() else {
            return;
        };
        let mut y = vec![0.0f64; d];
        for row in x.chunks_exact(d) {
            let Some(&top) = self.token_top1.get(a.at) else {
                break;
            };
            a.at += 1;
            let s = a.slot[top as usize];
            if s == u32::MAX {
                continue;
            }
            for ((yj, &xj), &cj) in y.iter_mut().zip(row).zip(center) {
                *yj = xj as f64 - cj as f64;
            }
            let (sum, sc) = (&mut a.sum[s as usize], &mut a.scatter[s as usize]);
            for (sj, yj) in sum.iter_mut().zip(&y) {
                *sj += yj;
            }
            let mut at = 0;
            for i in 0..d {
                let yi = y[i];
                for (o, &yj) in sc[at..at + d - i].iter_mut().zip(&y[i..]) {
                    *o += yi * yj;
                }
                at += d - i;
            }
        }
    }

    /// The column values; `rms_spread = sqrt(SST/N)` of the evaluated activations.
    pub fn finish(&self, rms_spread: f64) -> PowerValues {
        let n = self.n.max(1);
        let facet = (self.facet_n > 0).then(|| self.facet_sum / self.facet_n as f64);
        let top_set = self.sets.values().copied().max().unwrap_or(0);
        let mut v = PowerValues {
            pd_margin_mean: (self.margin_n > 0).then(|| self.margin_sum / self.margin_n as f64),
            pd_facet_dist_mean: facet,
            pd_facet_dist_rel: facet.filter(|_| rms_spread > 0.0).map(|f| f / rms_spread),
            pd_n_active_sets: Some(self.sets.len() as f64),
            pd_top_set_share: Some(top_set as f64 / n as f64),
            pd_eff_active_sets: Some(effective_number(self.sets.values(), self.n)),
            pd_n_top1_cells: Some(self.top1.iter().filter(|&&c| c > 0).count() as f64),
            pd_eff_top1_cells: Some(effective_number(self.top1.iter(), self.n)),
            ..PowerValues::default()
        };
        if let Some(a) = &self.affine {
            let k = self.spec.k;
            let (mut sae, mut pca, mut tokens) = (0.0f64, 0.0f64, 0u64);
            for (s, &g) in a.latents.iter().enumerate() {
                let nr = self.top1[g as usize];
                sae += self.top1_sse[g as usize];
                pca += nr as f64 * local_pca_optimum(&a.sum[s], &a.scatter[s], nr, self.d, k);
                tokens += nr;
            }
            let t = tokens.max(1) as f64;
            v.pd_affine_sae_mse = Some(sae / t);
            v.pd_affine_pca_mse = Some(pca / t);
            v.pd_affine_ratio = (pca > 0.0).then(|| sae / pca);
            v.pd_affine_tokens_frac = Some(tokens as f64 / n as f64);
            v.pd_affine_cells = Some(a.latents.len() as f64);
            if a.dropped {
                tracing::debug!("local-affine gap: groups beyond the covariance budget left out");
            }
        }
        v
    }
}

/// `Σ_{l>k} λ_l(Cov)` for the covariance of `n` points given `Σy` and the upper triangle of
/// `Σyyᵀ`: the per-token MSE of the best rank-k affine fit (mean + top-k principal axes).
pub fn local_pca_optimum(sum: &[f64], scatter_upper: &[f64], n: u64, d: usize, k: usize) -> f64 {
    if k >= d || n == 0 {
        return 0.0;
    }
    let nf = n as f64;
    let mut cov = nalgebra::DMatrix::<f64>::zeros(d, d);
    let mut at = 0;
    for i in 0..d {
        for j in i..d {
            let v = (scatter_upper[at] - sum[i] * sum[j] / nf) / nf;
            cov[(i, j)] = v;
            cov[(j, i)] = v;
            at += 1;
        }
    }
    let mut ev: Vec<f64> = cov.symmetric_eigenvalues().iter().copied().collect();
    ev.sort_by(|a, b| a.total_cmp(b));
    ev[..d - k].iter().map(|&l| l.max(0.0)).sum()
}

#[cfg(test)]
mod tests;
