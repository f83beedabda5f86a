//! The active `k×k` block of the JSAE Jacobian and the gradient of its L1 penalty
//! (`../shared/specs/jsae_pamsgd.md` §1.2, §1.3 path P, §1.8, §1.9).
//!
//! ```text
//! f_s = e_y ∘ f ∘ d_x ∘ TopK: input-SAE latents → output-SAE latents
//! P_p = W^x_dec W_pᵀ     [m_x, h]   (W_p: the MLP's input projections, [h, d])
//! Qᵀ  = W^y_enc W_outᵀ'  [m_y, h]   (row j = (W_out)ᵀ applied to encoder row j)
//! M_t[i, c] = Σ_p P_p[i, c] g_{p,t}[c]                i ∈ A_x(t)
//! J_t[j, i] = r · Σ_c Qᵀ[j, c] M_t[i, c]              j ∈ A_y(t), r = c_y / c_x
//! L_J = coef · Σ_t Σ_{j,i} |J_t[j, i]|
//! ∂L/∂P_p[i, c] += r g_{p,t}[c] Σ_j S[j, i] Qᵀ[j, c]      S = coef · sign(J_t)
//! ∂L/∂Qᵀ[j, c]  += r Σ_i S[j, i] M_t[i, c]
//! ∂L/∂W^x_dec = Σ_p ∂L/∂P_p · W_p,    ∂L/∂W^y_enc = ∂L/∂Qᵀ · W_out
//! ```
//!
//! The full `m_y × m_x` Jacobian is exactly zero outside `A_y × A_x` (ReLU∘TopK on both
//! sides), so the block is exact, not an approximation. `r` folds the fixed input scalings
//! of the two SAEs (`x' = c_x x`, `y' = c_y y`) into `J`, so `J` is in the units of the
//! scaled SAE latents the loss is computed on; the exported SAEs' codes are those divided
//! by `c`, so in their units the block is `J / r` (`r = 1` in [`accumulate_stats`]), which
//! is what the statistics report. The gains `g` depend only on data (the MLP input), never
//! on SAE parameters.
//!
//! Memory (§1.9): tokens are processed in chunks of [`TOKEN_CHUNK`]; per chunk the per-token
//! `k×h` buffers are `TOKEN_CHUNK · k · h` floats, and the per-step tables are
//! `(n_proj + 1) · m · h` floats plus as many for their gradients.
//! Decision: path P (precompute `P`, `Qᵀ` once per step) always: it wins when
//! `batch · k > m` (spec §1.3), which holds for every pipeline here.

use rayon::prelude::*;

use crate::kernels::{self as c, Codes};
use crate::models::MlpWeights;

/// Tokens per Jacobian chunk.
pub const TOKEN_CHUNK: usize = 128;

/// Thresholds of the raw Jacobian-sparsity metrics: share of `|J|` entries above each. The
/// first four are the spec's headline τ (jsae_pamsgd.md §1.6 item 1); 0.1 and 1 show the tail.
pub const THRESHOLDS: [f64; 6] = [0.005, 0.01, 0.015, 0.02, 0.1, 1.0];

/// Thresholds of the normalised counts: share of entries with `|J_t| / RMS(J_t)` above each,
/// where `RMS(J_t)` is the root mean square of token t's block. The spec's guard against
/// "sparser" meaning only "smaller" (§1.6 item 1, [D]: per-token RMS). Decision: τ = 0.1 and
/// 1 (an entry above a tenth of / above the token's RMS); the raw τ ≤ 0.02 would count
/// nearly every non-zero entry once J has unit RMS. A dense, flat block has about half its
/// entries above its RMS and all above 0.1·RMS; a sparse block few of either.
pub const RMS_THRESHOLDS: [f64; 2] = [0.1, 1.0];

/// Per-step tables of path P.
pub struct JacTables {
    /// Input-SAE latents.
    pub m_x: usize,
    /// Output-SAE latents.
    pub m_y: usize,
    /// MLP hidden width.
    pub h: usize,
    /// `P_p`, `[m_x, h]` each.
    pub p: Vec<Vec<f32>>,
    /// `Qᵀ`, `[m_y, h]`.
    pub qt: Vec<f32>,
}

impl JacTables {
    /// Build `P_p = W^x_dec W_pᵀ` and `Qᵀ = W^y_enc W_out` (`W^x_dec: [m_x, d]`,
    /// `W^y_enc: [m_y, d]`, the encoder applied as `W^y_enc y`).
    pub fn build(
        mlp: &MlpWeights,
        w_dec_x: &[f32],
        m_x: usize,
        w_enc_y: &[f32],
        m_y: usize,
    ) -> Self {
        let (d, h) = (mlp.d, mlp.h);
        let p = mlp
            .w_in
            .iter()
            .map(|w| {
                let mut out = vec![0.0; m_x * h];
                c::gemm_xwt(w_dec_x, m_x, d, w, h, None, &mut out);
                out
            })
            .collect();
        let mut qt = vec![0.0; m_y * h];
        c::gemm_xwt(w_enc_y, m_y, d, &mlp.w_out_t, h, None, &mut qt);
        Self { m_x, m_y, h, p, qt }
    }

    /// `M[a, :] = Σ_p P_p[ax[a], :] ⊙ g_p` for one token; `m: [kx·h]`.
    fn fill_m(&self, ax: &[u32], gains: &[f32], m: &mut [f32]) {
        let h = self.h;
        for (a, &i) in ax.iter().enumerate() {
            let row = &mut m[a * h..(a + 1) * h];
            let i = i as usize;
            for (p, (tab, g)) in self.p.iter().zip(gains.chunks(h)).enumerate() {
                let pr = &tab[i * h..(i + 1) * h];
                if p == 0 {
                    for ((o, &pv), &gv) in row.iter_mut().zip(pr).zip(g) {
                        *o = pv * gv;
                    }
                } else {
                    for ((o, &pv), &gv) in row.iter_mut().zip(pr).zip(g) {
                        *o += pv * gv;
                    }
                }
            }
        }
    }

    /// The block `J[j·kx + i]` (`j` over `ay`, `i` over `ax`) of one token with gains
    /// `gains: [n_proj·h]`; `m: [kx·h]` scratch (left holding `M`).
    pub fn block(
        &self,
        ax: &[u32],
        ay: &[u32],
        gains: &[f32],
        r: f32,
        m: &mut Vec<f32>,
        j: &mut Vec<f32>,
    ) {
        let (h, kx) = (self.h, ax.len());
        c::resize(m, kx * h);
        self.fill_m(ax, gains, m);
        c::resize(j, ay.len() * kx);
        for (b, &jy) in ay.iter().enumerate() {
            let q = &self.qt[jy as usize * h..(jy as usize + 1) * h];
            for a in 0..kx {
                j[b * kx + a] = r * c::dot(q, &m[a * h..(a + 1) * h]);
            }
        }
    }
}

/// Streaming Jacobian-sparsity statistics over tokens (spec §1.6 item 1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JacStats {
    /// Tokens seen.
    pub tokens: u64,
    /// `k_x · k_y` of the pair (the denominator per token; entries outside the active
    /// block, or of latents ReLU'd to zero, count as zero).
    pub k2: u64,
    /// Entries with `|J|` above each of [`THRESHOLDS`].
    pub above: [u64; THRESHOLDS.len()],
    /// Entries with `|J_t| / RMS(J_t)` above each of [`RMS_THRESHOLDS`].
    pub above_rms: [u64; RMS_THRESHOLDS.len()],
    /// `Σ |J|`.
    pub sum_abs: f64,
}

impl JacStats {
    /// Statistics for a pair with `k_x`, `k_y` active latents per token.
    pub fn new(k_x: usize, k_y: usize) -> Self {
        Self {
            k2: (k_x * k_y) as u64,
            ..Self::default()
        }
    }

    /// Add one token's block. Its RMS is taken over the entries of the block as computed
    /// (`k_x(t)·k_y(t)`, which is k² for TopK codes); an all-zero block adds no normalised
    /// counts.
    pub fn add_block(&mut self, j: &[f32]) {
        self.add_block_scaled(j, 1.0);
    }

    /// [`Self::add_block`] of the block `unit · j` (the units the statistics are kept in).
    pub fn add_block_scaled(&mut self, j: &[f32], unit: f64) {
        self.tokens += 1;
        let mut sq = 0.0f64;
        for &v in j {
            let a = v.abs() as f64 * unit;
            self.sum_abs += a;
            sq += a * a;
            for (n, &t) in self.above.iter_mut().zip(&THRESHOLDS) {
                if a > t {
                    *n += 1;
                }
            }
        }
        let rms = (sq / j.len().max(1) as f64).sqrt();
        if rms > 0.0 {
            for &v in j {
                let a = v.abs() as f64 * unit / rms;
                for (n, &t) in self.above_rms.iter_mut().zip(&RMS_THRESHOLDS) {
                    if a > t {
                        *n += 1;
                    }
                }
            }
        }
    }

    /// Merge another accumulator (same `k2`).
    pub fn merge(&mut self, o: &JacStats) {
        self.tokens += o.tokens;
        self.sum_abs += o.sum_abs;
        for (a, b) in self.above.iter_mut().zip(&o.above) {
            *a += b;
        }
        for (a, b) in self.above_rms.iter_mut().zip(&o.above_rms) {
            *a += b;
        }
    }

    fn denom(&self) -> f64 {
        (self.tokens * self.k2).max(1) as f64
    }

    /// Share of the `k²` entries per token with `|J|` above `tau`, one of [`THRESHOLDS`].
    pub fn frac_above(&self, tau: f64) -> f64 {
        self.above[threshold_index(&THRESHOLDS, tau)] as f64 / self.denom()
    }

    /// Share of the `k²` entries per token with `|J_t| / RMS(J_t)` above `tau`, one of
    /// [`RMS_THRESHOLDS`].
    pub fn frac_above_rms(&self, tau: f64) -> f64 {
        self.above_rms[threshold_index(&RMS_THRESHOLDS, tau)] as f64 / self.denom()
    }

    /// Mean `|J|` over the `k²` entries per token.
    pub fn mean_abs(&self) -> f64 {
        self.sum_abs / self.denom()
    }
}

/// Position of `tau` in `set`; the thresholds are compile-time constants, so a miss is a bug.
fn threshold_index(set: &[f64], tau: f64) -> usize {
    set.iter()
        .position(|&t| t == tau)
        .unwrap_or_else(|| panic!("invariant: {tau} is not one of the thresholds {set:?}"))
}

/// Gains of every token of `x: [n, d]` (raw MLP inputs), `[n, n_proj·h]`.
pub fn gains_of(mlp: &MlpWeights, x: &[f32], n: usize, out: &mut Vec<f32>) {
    let (d, w) = (mlp.d, mlp.n_proj() * mlp.h);
    c::resize(out, n * w);
    out.par_chunks_mut(w)
        .zip(x.par_chunks(d))
        .for_each_init(Vec::new, |tmp, (g, xr)| mlp.gains(xr, tmp, g));
}

/// The MLP outputs `f(x)` of every token of `x: [n, d]` (raw MLP inputs), `[n, d]`.
pub fn mlp_outputs(mlp: &MlpWeights, x: &[f32], n: usize, out: &mut Vec<f32>) {
    let d = mlp.d;
    c::resize(out, n * d);
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each_init(Vec::new, |hid, (y, xr)| mlp.forward_token(xr, hid, y));
}

/// Blocks of all tokens, `r · (Qᵀ M)`, accumulated into `stats` (evaluation: no gradient).
pub fn accumulate_stats(
    tables: &JacTables,
    codes_x: &Codes,
    codes_y: &Codes,
    gains: &[f32],
    gw: usize,
    r: f32,
    stats: &mut JacStats,
) {
    let n = codes_x.n();
    let parts: Vec<JacStats> = (0..n)
        .into_par_iter()
        .with_min_len(8)
        .fold(
            || (JacStats::new(0, 0), Vec::new(), Vec::new()),
            |(mut s, mut m, mut j), t| {
                let (ax, _) = codes_x.row(t);
                let (ay, _) = codes_y.row(t);
                tables.block(ax, ay, &gains[t * gw..(t + 1) * gw], r, &mut m, &mut j);
                s.add_block(&j);
                (s, m, j)
            },
        )
        .map(|(s, _, _)| s)
        .collect();
    for p in &parts {
        stats.merge(p);
    }
}

/// Gradient buffers of the Jacobian penalty for one step.
#[derive(Default)]
pub struct JacGrads {
    /// `∂L/∂P_p`, `[m_x, h]` each.
    pub dp: Vec<Vec<f32>>,
    /// `∂L/∂Qᵀ`, `[m_y, h]`.
    pub dqt: Vec<f32>,
    /// Per-chunk `∂L/∂M` rows (`Σ_a kx(t)` rows of `h`).
    dm: Vec<f32>,
    /// Per-chunk `∂L/∂Qᵀ` contributions (`Σ_t ky(t)` rows of `h`).
    dq: Vec<f32>,
    tmp: Vec<f32>,
}

/// One training step's Jacobian term: adds `coef·Σ|J|`'s gradient to
/// `grad_w_dec_x: [m_x, d]` and `grad_w_enc_y: [m_y, d]` (when `coef > 0`) and returns
/// `Σ_t Σ |J_t|`, both in the scaled units (`J` with `r`); fills `stats` with `J / r`, the
/// Jacobian in the units of the exported SAEs (what every reported figure uses).
#[allow(clippy::too_many_arguments)] // the two SAEs' codes, data, scale and two gradients
pub fn penalty_step(
    mlp: &MlpWeights,
    tables: &JacTables,
    codes_x: &Codes,
    codes_y: &Codes,
    gains: &[f32],
    r: f32,
    coef: f32,
    grad_w_dec_x: &mut [f32],
    grad_w_enc_y: &mut [f32],
    jg: &mut JacGrads,
    stats: &mut JacStats,
) -> f64 {
    let (h, d) = (tables.h, mlp.d);
    let gw = mlp.n_proj() * h;
    let n = codes_x.n();
    if coef == 0.0 {
        let before = stats.sum_abs;
        accumulate_stats(tables, codes_x, codes_y, gains, gw, 1.0, stats);
        return (stats.sum_abs - before) * r as f64;
    }
    let unit = 1.0 / r as f64;
    jg.dp.resize_with(tables.p.len(), Vec::new);
    for dp in jg.dp.iter_mut() {
        dp.clear();
        dp.resize(tables.m_x * h, 0.0);
    }
    jg.dqt.clear();
    jg.dqt.resize(tables.m_y * h, 0.0);
    let before = stats.sum_abs;
    let mut lo = 0;
    while lo < n {
        let hi = (lo + TOKEN_CHUNK).min(n);
        let (ex0, ey0) = (codes_x.indptr[lo], codes_y.indptr[lo]);
        let (nx, ny) = (codes_x.indptr[hi] - ex0, codes_y.indptr[hi] - ey0);
        c::resize(&mut jg.dm, nx * h);
        c::resize(&mut jg.dq, ny * h);
        // 1. Per token, in parallel: J, its stats, ∂L/∂M (into dm) and ∂L/∂Qᵀ rows (dq).
        let mut dm_rows: Vec<&mut [f32]> = Vec::with_capacity(hi - lo);
        let mut rest: &mut [f32] = &mut jg.dm;
        for t in lo..hi {
            let (a, b) = rest.split_at_mut((codes_x.indptr[t + 1] - codes_x.indptr[t]) * h);
            dm_rows.push(a);
            rest = b;
        }
        let mut dq_rows: Vec<&mut [f32]> = Vec::with_capacity(hi - lo);
        let mut rest: &mut [f32] = &mut jg.dq;
        for t in lo..hi {
            let (a, b) = rest.split_at_mut((codes_y.indptr[t + 1] - codes_y.indptr[t]) * h);
            dq_rows.push(a);
            rest = b;
        }
        let parts: Vec<JacStats> = dm_rows
            .into_par_iter()
            .zip(dq_rows)
            .enumerate()
            .fold(
                || (JacStats::new(0, 0), Vec::new(), Vec::new()),
                |(mut s, mut m, mut j), (off, (dm, dq))| {
                    let t = lo + off;
                    let (ax, _) = codes_x.row(t);
                    let (ay, _) = codes_y.row(t);
                    let kx = ax.len();
                    tables.block(ax, ay, &gains[t * gw..(t + 1) * gw], r, &mut m, &mut j);
                    s.add_block_scaled(&j, unit);
                    dm.fill(0.0);
                    dq.fill(0.0);
                    for (b, &jy) in ay.iter().enumerate() {
                        let q = &tables.qt[jy as usize * h..(jy as usize + 1) * h];
                        let dqb = &mut dq[b * h..(b + 1) * h];
                        for a in 0..kx {
                            let v = j[b * kx + a];
                            if v == 0.0 {
                                continue;
                            }
                            let s = r * coef * v.signum();
                            c::axpy(s, q, &mut dm[a * h..(a + 1) * h]);
                            c::axpy(s, &m[a * h..(a + 1) * h], dqb);
                        }
                    }
                    (s, m, j)
                },
            )
            .map(|(s, _, _)| s)
            .collect();
        for p in &parts {
            stats.merge(p);
        }
        // 2. Scatter into the tables' gradients, each task owning whole rows.
        let gains_ref = gains;
        let dm = &jg.dm;
        let ix = &codes_x.idx[ex0..ex0 + nx];
        let tok_x = entry_tokens(codes_x, lo, hi);
        for (p, dp) in jg.dp.iter_mut().enumerate() {
            scatter_rows(ix, h, dp, |e, row| {
                let t = tok_x[e];
                let g = &gains_ref[t * gw + p * h..t * gw + (p + 1) * h];
                let src = &dm[e * h..(e + 1) * h];
                for ((o, &s), &gv) in row.iter_mut().zip(src).zip(g) {
                    *o += s * gv;
                }
            });
        }
        let dq = &jg.dq;
        let iy = &codes_y.idx[ey0..ey0 + ny];
        scatter_rows(iy, h, &mut jg.dqt, |e, row| {
            c::axpy(1.0, &dq[e * h..(e + 1) * h], row);
        });
        lo = hi;
    }
    // 3. Through the precompute: ∂W^x_dec += Σ_p dP_p W_p, ∂W^y_enc += dQᵀ W_out.
    c::resize(&mut jg.tmp, tables.m_x.max(tables.m_y) * d);
    for (p, dp) in jg.dp.iter().enumerate() {
        let out = &mut jg.tmp[..tables.m_x * d];
        c::gemm_xwt(dp, tables.m_x, h, &mlp.w_in_t[p], d, None, out);
        c::axpy(1.0, out, grad_w_dec_x);
    }
    let out = &mut jg.tmp[..tables.m_y * d];
    c::gemm_xwt(&jg.dqt, tables.m_y, h, &mlp.w_out, d, None, out);
    c::axpy(1.0, out, grad_w_enc_y);
    (stats.sum_abs - before) * r as f64
}

/// Token (absolute index) of each entry of tokens `lo..hi`.
fn entry_tokens(codes: &Codes, lo: usize, hi: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(codes.indptr[hi] - codes.indptr[lo]);
    for t in lo..hi {
        let k = codes.indptr[t + 1] - codes.indptr[t];
        out.extend(std::iter::repeat_n(t, k));
    }
    out
}

/// `f(e, out[latent[e]])` for every entry `e`, grouped by row so that each rayon task
/// owns whole rows of `out: [m, h]`; entries of one row are visited in order.
fn scatter_rows<F>(latent: &[u32], h: usize, out: &mut [f32], f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let m = out.len() / h;
    let mut ptr = vec![0usize; m + 1];
    for &i in latent {
        ptr[i as usize + 1] += 1;
    }
    for i in 0..m {
        ptr[i + 1] += ptr[i];
    }
    let mut fill = ptr.clone();
    let mut order = vec![0usize; latent.len()];
    for (e, &i) in latent.iter().enumerate() {
        order[fill[i as usize]] = e;
        fill[i as usize] += 1;
    }
    out.par_chunks_mut(h).enumerate().for_each(|(i, row)| {
        for &e in &order[ptr[i]..ptr[i + 1]] {
            f(e, row);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::{MlpAct, MlpKind};
    use crate::util::rng::Rng;

    fn randv(rng: &mut Rng, n: usize, s: f32) -> Vec<f32> {
        (0..n).map(|_| rng.normal() as f32 * s).collect()
    }

    fn mlp(kind: MlpKind, rng: &mut Rng, d: usize, h: usize) -> MlpWeights {
        let np = if kind == MlpKind::Gated { 2 } else { 1 };
        let act = if kind == MlpKind::Gated {
            MlpAct::Silu
        } else {
            MlpAct::GeluErf
        };
        let w_in = (0..np).map(|_| randv(rng, h * d, 0.3)).collect();
        let b_in = (0..np).map(|_| randv(rng, h, 0.1)).collect();
        MlpWeights::new(
            kind,
            act,
            d,
            h,
            w_in,
            b_in,
            randv(rng, d * h, 0.3),
            randv(rng, d, 0.1),
        )
    }

    /// Random sparse codes: `k` distinct latents per token (values irrelevant here).
    fn codes(rng: &mut Rng, n: usize, m: usize, k: usize) -> Codes {
        let mut c = Codes::default();
        c.clear();
        for _ in 0..n {
            let mut set: Vec<u32> = Vec::new();
            while set.len() < k {
                let i = rng.below(m as u64) as u32;
                if !set.contains(&i) {
                    set.push(i);
                }
            }
            c.val.extend(std::iter::repeat_n(1.0, k));
            c.idx.extend(set);
            c.indptr.push(c.idx.len());
        }
        c
    }

    #[allow(clippy::too_many_arguments)] // a test helper mirroring the kernel's inputs
    fn sum_abs(
        m: &MlpWeights,
        wd: &[f32],
        we: &[f32],
        mm: usize,
        cx: &Codes,
        cy: &Codes,
        g: &[f32],
        r: f32,
    ) -> f64 {
        let t = JacTables::build(m, wd, mm, we, mm);
        let mut s = JacStats::new(1, 1);
        accumulate_stats(&t, cx, cy, g, m.n_proj() * m.h, r, &mut s);
        s.sum_abs
    }

    /// The analytic gradient of `coef·Σ|J|` w.r.t. `W^x_dec` and `W^y_enc` matches central
    /// differences (J is linear in each, so the check is exact up to f32 rounding and sign
    /// flips, which the perturbation size keeps away), for both MLP kinds, with more tokens
    /// than one chunk.
    #[test]
    fn penalty_gradient_matches_finite_differences() {
        for kind in [MlpKind::Plain, MlpKind::Gated] {
            let mut rng = Rng::new(7);
            let (d, h, mm, k, n) = (6, 10, 9, 3, TOKEN_CHUNK + 5);
            let m = mlp(kind, &mut rng, d, h);
            let x = randv(&mut rng, n * d, 1.0);
            let mut g = Vec::new();
            gains_of(&m, &x, n, &mut g);
            let wd = randv(&mut rng, mm * d, 0.5);
            let we = randv(&mut rng, mm * d, 0.5);
            let (cx, cy) = (codes(&mut rng, n, mm, k), codes(&mut rng, n, mm, k));
            let (r, coef) = (1.3f32, 0.7f32);
            let t = JacTables::build(&m, &wd, mm, &we, mm);
            let (mut gd, mut ge) = (vec![0.0; mm * d], vec![0.0; mm * d]);
            let mut st = JacStats::new(k, k);
            let s = penalty_step(
                &m,
                &t,
                &cx,
                &cy,
                &g,
                r,
                coef,
                &mut gd,
                &mut ge,
                &mut JacGrads::default(),
                &mut st,
            );
            let s0 = sum_abs(&m, &wd, &we, mm, &cx, &cy, &g, r);
            assert!(
                (s - s0).abs() < 1e-3 * s0,
                "{kind:?}: step Σ|J| {s} vs stats {s0}"
            );
            assert_eq!(st.tokens, n as u64);
            // The statistics are of J / r (the exported SAEs' units).
            let per = (n * k * k) as f64;
            assert!(
                (st.mean_abs() - s0 / r as f64 / per).abs() < 1e-3 * st.mean_abs(),
                "{kind:?}: stats mean {} vs Σ|J|/r/(n k²) {}",
                st.mean_abs(),
                s0 / r as f64 / per
            );
            let eps = 1e-3f32;
            for (which, grad) in [(0, &gd), (1, &ge)] {
                let mut worst = 0.0f64;
                for e in (0..mm * d).step_by(5) {
                    let (mut a, mut b) = (wd.clone(), we.clone());
                    let (mut a2, mut b2) = (wd.clone(), we.clone());
                    if which == 0 {
                        a[e] += eps;
                        a2[e] -= eps;
                    } else {
                        b[e] += eps;
                        b2[e] -= eps;
                    }
                    let fd = coef as f64
                        * (sum_abs(&m, &a, &b, mm, &cx, &cy, &g, r)
                            - sum_abs(&m, &a2, &b2, mm, &cx, &cy, &g, r))
                        / (2.0 * eps as f64);
                    let err = (fd - grad[e] as f64).abs() / (1.0 + fd.abs());
                    worst = worst.max(err);
                }
                assert!(
                    worst < 2e-2,
                    "{kind:?} param {which}: worst relative error {worst}"
                );
            }
            assert!(gd.iter().any(|&v| v != 0.0) && ge.iter().any(|&v| v != 0.0));
        }
    }

    /// Raw counts see scale; the RMS-normalised counts do not: a block and the same block
    /// times 100 differ in the first, not in the second. A flat block has every entry at its
    /// RMS (none strictly above 1·RMS); a one-hot block has one entry above its RMS.
    #[test]
    fn rms_normalised_counts_ignore_scale() {
        let mut rng = Rng::new(7);
        let j = randv(&mut rng, 16, 0.003);
        let big: Vec<f32> = j.iter().map(|v| v * 100.0).collect();
        let (mut a, mut b) = (JacStats::new(4, 4), JacStats::new(4, 4));
        a.add_block(&j);
        b.add_block(&big);
        assert!(a.frac_above(0.02) < b.frac_above(0.02));
        for tau in RMS_THRESHOLDS {
            assert_eq!(a.frac_above_rms(tau), b.frac_above_rms(tau));
        }
        let mut flat = JacStats::new(4, 4);
        flat.add_block(&[0.5; 16]);
        assert_eq!(flat.frac_above_rms(0.1), 1.0);
        assert_eq!(flat.frac_above_rms(1.0), 0.0);
        let mut one_hot = JacStats::new(4, 4);
        let mut oh = [0.0f32; 16];
        oh[3] = -2.0;
        one_hot.add_block(&oh);
        assert_eq!(one_hot.frac_above_rms(1.0), 1.0 / 16.0);
        assert_eq!(one_hot.frac_above(0.005), 1.0 / 16.0);
        let mut zero = JacStats::new(4, 4);
        zero.add_block(&[0.0; 16]);
        assert_eq!(zero.frac_above_rms(0.1), 0.0);
        // merge adds both kinds of counts
        a.merge(&one_hot);
        assert_eq!(a.above_rms[1], b.above_rms[1] + 1);
    }
}
