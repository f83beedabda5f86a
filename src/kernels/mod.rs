//! Shared SAE kernels on plain `f32` buffers (sae_variants.md §8): the dense encoder GEMM,
//! top-k selection, sparse decode, sparse gradients through a CSR→CSC transpose, decoder
//! unit-norm handling (§1.3 A) and initialisation. Variants are built from these pieces and
//! never copy them.
//!
//! Layouts: every weight matrix is row-major `[d_sae, d_in]` (row *i* = latent *i*'s encoder
//! or decoder direction, contiguous); activations are row-major `[n, d_in]`.
//!
//! Decision: when more than [`DENSE_FALLBACK`] of all (token, latent) pairs are active
//! (ReLU/JumpReLU/Gated early in training), decode and the gradient accumulations switch to
//! dense GEMMs over token chunks, as §8 recommends; the sparse path wins below that.
//! Decision: all reductions have a fixed order (per-latent tasks, per-column tasks, fixed
//! token chunks), so results do not depend on the thread schedule: a resumed run is bit-exact.

pub mod cholesky;

use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::util::profile::{self, Phase};
use crate::util::rng::Rng;

/// Runtime SIMD dispatch for the hot elementwise loops: the crate is built for baseline
/// x86-64 (SSE2, four lanes), so `$name` runs `$generic` compiled for AVX-512F or AVX2 when
/// the CPU has it (detected once, cached by std). Rust never fuses `a·x + y` into an FMA, so
/// each lane computes exactly what the SSE2 code does: the results are bit-identical.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $generic:ident;
     $avx512:ident, $avx2:ident) => {
        $(#[$m])*
        #[inline]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F (checked just above).
                    return unsafe { $avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2 (checked just above).
                    return unsafe { $avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        fn $avx512($($arg: $ty),*) $(-> $ret)? {
            $generic($($arg),*)
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        fn $avx2($($arg: $ty),*) $(-> $ret)? {
            $generic($($arg),*)
        }
    };
}

/// [`simd_dispatch!`] for `unsafe fn`s (the blocked sparse passes, which write through
/// [`Shared`]): the caller's safety contract is passed on unchanged.
macro_rules! simd_dispatch_unsafe {
    ($(#[$m:meta])* $vis:vis unsafe fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)?
        = $generic:ident; $avx512:ident, $avx2:ident) => {
        $(#[$m])*
        #[inline]
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has AVX-512F; the rest is the caller's contract.
                    return unsafe { $avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU has AVX2; the rest is the caller's contract.
                    return unsafe { $avx2($($arg),*) };
                }
            }
            // SAFETY: the caller's contract.
            unsafe { $generic($($arg),*) }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx512($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: the caller's contract.
            unsafe { $generic($($arg),*) }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($arg: $ty),*) $(-> $ret)? {
            // SAFETY: the caller's contract.
            unsafe { $generic($($arg),*) }
        }
    };
}

/// Tokens per chunk of the dense fallbacks' `[chunk, d_sae]` buffers (64 MiB at d_sae =
/// 16384), and the fewest tokens per encoder GEMM call (see `PRE_BYTES`).
pub const CHUNK: usize = 1024;
/// Bytes of the encoder's `[chunk, d_sae]` pre-activation buffer. The encoder takes as many
/// tokens per GEMM call as fit (at least [`CHUNK`]): every call packs all of `W_enc`, so at
/// d_sae 16384 four calls of 1024 tokens took 17% longer than one of 4096 (issue 16).
const PRE_BYTES: usize = 256 << 20;

/// Tokens per encoder GEMM call at width `f` (see [`PRE_BYTES`]).
fn encode_chunk(f: usize) -> usize {
    (PRE_BYTES / (4 * f.max(1))).max(CHUNK)
}

/// Density of active pairs above which the dense-GEMM fallback is used.
pub const DENSE_FALLBACK: f64 = 0.05;
/// Tokens per rayon task in the per-token passes.
const TOKENS_PER_TASK: usize = 16;
/// Tokens from which sparse decode, the per-entry dots and the accumulations run
/// latent-major over column blocks (CSC order, `build_csc`): each pass streams the weights once
/// and gathers only `[n, block]` strips of the token rows, which stay in cache; below it the
/// token-major loops need no transpose.
const CSC_MIN_TOKENS: usize = 256;
/// Column width of one block of the blocked per-entry dots. Fixed, not derived from the thread
/// count, so that the summation order, and so the result, is the same on every machine.
const DOT_BLOCK: usize = 256;

/// Sparse latent codes in CSR form: token `b` owns entries `indptr[b]..indptr[b+1]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Codes {
    /// Row offsets, `n + 1` entries.
    pub indptr: Vec<usize>,
    /// Latent index of each entry.
    pub idx: Vec<u32>,
    /// Value of each entry.
    pub val: Vec<f32>,
}

impl Codes {
    /// Number of tokens.
    pub fn n(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }
    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.idx.len()
    }
    /// Remove everything (capacity is kept).
    pub fn clear(&mut self) {
        self.indptr.clear();
        self.indptr.push(0);
        self.idx.clear();
        self.val.clear();
    }
    /// Entries of token `b`.
    pub fn row(&self, b: usize) -> (&[u32], &[f32]) {
        let (s, e) = (self.indptr[b], self.indptr[b + 1]);
        (&self.idx[s..e], &self.val[s..e])
    }
    /// Dense `[n, d_sae]` matrix (for tests and small exports).
    pub fn to_dense(&self, d_sae: usize) -> Vec<f32> {
        let mut out = vec![0.0; self.n() * d_sae];
        for b in 0..self.n() {
            let (ix, vs) = self.row(b);
            for (&i, &v) in ix.iter().zip(vs) {
                out[b * d_sae + i as usize] = v;
            }
        }
        out
    }
}

/// Per-task output buffers of [`encode_collect`]; kept in the [`Workspace`] so that their
/// capacity is reused from step to step.
#[derive(Debug, Default)]
pub struct TaskBuf {
    /// Main entries (usually the active latents) of this task's tokens.
    pub main: Vec<(u32, f32)>,
    main_counts: Vec<u32>,
    /// Secondary entries (AuxK selection, JumpReLU band, open gates).
    pub aux: Vec<(u32, f32)>,
    aux_counts: Vec<u32>,
    /// Selection scratch.
    pub scratch: Vec<(f32, u32)>,
    /// Second selection scratch (AuxK candidates).
    pub scratch2: Vec<f32>,
}

/// Reused scratch memory for one SAE: after the first step nothing `d_sae`-sized is
/// allocated again.
#[derive(Debug, Default)]
pub struct Workspace {
    /// Codes of the last forward pass (training or inference), one row per token.
    pub codes: Codes,
    /// Secondary codes of the last training step (AuxK / band / open gates).
    pub aux: Codes,
    /// Reconstruction `[n, d_in]` of the last forward pass.
    pub recon: Vec<f32>,
    /// Encoder input (`x` or `x − b_dec`), `[n, d_in]`.
    pub xt: Vec<f32>,
    /// Residual gradient `2(x̂ − x)/B`, `[n, d_in]`.
    pub resid: Vec<f32>,
    /// Secondary reconstruction / residual, `[n, d_in]`.
    pub aux_recon: Vec<f32>,
    /// Secondary residual gradient, `[n, d_in]`.
    pub aux_resid: Vec<f32>,
    /// Per-entry values aligned with `codes` (e.g. `G = d_i·g`).
    pub gvals: Vec<f32>,
    /// Per-entry values aligned with `aux`.
    pub aux_gvals: Vec<f32>,
    /// Per-entry coefficients (scratch).
    pub coef: Vec<f32>,
    /// Per-entry coefficients aligned with `aux` (scratch).
    pub aux_coef: Vec<f32>,
    /// Per-latent scratch `[d_sae]`.
    pub lat: Vec<f32>,
    /// Second per-latent scratch `[d_sae]`.
    pub lat2: Vec<f32>,
    /// Dead-latent list (AuxK).
    pub dead: Vec<u32>,
    /// Kernel scratch (chunk buffers, CSC transpose).
    pub scratch: Scratch,
}

/// Scratch buffers of the kernels, separate from [`Workspace`]'s outputs so that a kernel
/// can read `ws.codes` while writing here.
#[derive(Debug, Default)]
pub struct Scratch {
    pre: Vec<f32>,
    dense: Vec<f32>,
    dense2: Vec<f32>,
    tasks: Vec<TaskBuf>,
    csc_ptr: Vec<usize>,
    csc_tok: Vec<u32>,
    csc_coef: Vec<f32>,
    csc_ent: Vec<u32>,
    partial: Vec<f32>,
    fill: Vec<usize>,
}

/// A raw pointer to an output buffer that parallel tasks write in disjoint column blocks.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: only used by `strip`, whose callers write disjoint ranges from different tasks.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// `len` elements from `at`.
    ///
    /// # Safety
    /// `at + len` is within the buffer, the buffer outlives `'a`, and no other live slice
    /// overlaps the range.
    unsafe fn strip<'a>(self, at: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(at), len)
    }
}

/// Column blocks `(j0, j1)` covering `0..d` for the blocked sparse passes: about four per
/// thread, at least 64 columns, multiples of 16. Results do not depend on the split (each
/// output element is summed in the same order whatever the blocks).
fn col_blocks(d: usize) -> Vec<(usize, usize)> {
    let nb = (d / 64).clamp(1, 4 * rayon::current_num_threads().max(1));
    let w = d.div_ceil(nb).next_multiple_of(16).max(1);
    (0..d.div_ceil(w))
        .map(|b| (b * w, ((b + 1) * w).min(d)))
        .collect()
}

/// Transpose `codes` CSR→CSC into `s` by a counting sort on the latent index, stable in token
/// order: latent `i` owns positions `csc_ptr[i]..csc_ptr[i+1]`, each with its token
/// (`csc_tok`), its CSR entry (`csc_ent`) and `coef` of that entry (`csc_coef`).
fn build_csc(codes: &Codes, coef: &[f32], f: usize, s: &mut Scratch) {
    s.csc_ptr.clear();
    s.csc_ptr.resize(f + 1, 0);
    for &i in &codes.idx {
        s.csc_ptr[i as usize + 1] += 1;
    }
    for i in 0..f {
        s.csc_ptr[i + 1] += s.csc_ptr[i];
    }
    s.fill.clear();
    s.fill.extend_from_slice(&s.csc_ptr[..f]);
    let nnz = codes.nnz();
    s.csc_tok.resize(nnz, 0);
    s.csc_coef.resize(nnz, 0.0);
    s.csc_ent.resize(nnz, 0);
    for b in 0..codes.n() {
        let (lo, hi) = (codes.indptr[b], codes.indptr[b + 1]);
        for (e, (&i, &cf)) in codes.idx[lo..hi].iter().zip(&coef[lo..hi]).enumerate() {
            let i = i as usize;
            let p = s.fill[i];
            s.fill[i] += 1;
            s.csc_tok[p] = b as u32;
            s.csc_coef[p] = cf;
            s.csc_ent[p] = (lo + e) as u32;
        }
    }
}

/// Resize `v` to `n` elements (contents unspecified, capacity kept).
pub fn resize(v: &mut Vec<f32>, n: usize) {
    if v.len() != n {
        v.resize(n, 0.0);
    }
}

/// Parallel fill with zeros.
pub fn zero(v: &mut [f32]) {
    v.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
}

/// `ln c` of the least-squares scale `c = Σ target·recon / Σ recon²` (the data-dependent
/// initialisations of Gated and SA-GSAE), clamped to `[−10, 10]`; `None` when `c ≤ 0`.
pub fn ln_lsq_scale(recon: &[f32], target: &[f32]) -> Option<f32> {
    let num: f64 = recon
        .iter()
        .zip(target)
        .map(|(&a, &b)| a as f64 * b as f64)
        .sum();
    let den: f64 = recon.iter().map(|&a| a as f64 * a as f64).sum();
    (den > 0.0 && num > 0.0).then(|| (num / den).ln().clamp(-10.0, 10.0) as f32)
}

/// `out[b, i] = Σ_j x[b, j]·w[i, j] + bias[i]` for `x: [c, d]`, `w: [f, d]`,
/// `out: [c, f]`, using the multi-threaded `gemm` crate.
pub fn gemm_xwt(
    x: &[f32],
    c: usize,
    d: usize,
    w: &[f32],
    f: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    assert_eq!(x.len(), c * d, "invariant: callers size x as [c, d]");
    assert_eq!(w.len(), f * d, "invariant: callers size w as [f, d]");
    assert_eq!(out.len(), c * f, "invariant: callers size out as [c, f]");
    if let Some(b) = bias {
        out.par_chunks_mut(f).for_each(|row| row.copy_from_slice(b));
    }
    // SAFETY: the three buffers have the asserted sizes and the strides below stay within them.
    unsafe {
        gemm(
            c,
            f,
            d,
            out.as_mut_ptr(),
            1,
            f as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            d as isize,
            w.as_ptr(),
            d as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// `out[i, :] += Σ_b a[b, i]·v[b, :]` for dense `a: [c, f]`, `v: [c, d]`, `out: [f, d]`.
fn gemm_atv_acc(a: &[f32], c: usize, f: usize, v: &[f32], d: usize, out: &mut [f32]) {
    // SAFETY: sizes are checked by the callers (`a` is a [c, f] chunk, `v` a [c, d] chunk).
    unsafe {
        gemm(
            f,
            d,
            c,
            out.as_mut_ptr(),
            1,
            d as isize,
            true,
            a.as_ptr(),
            f as isize,
            1,
            v.as_ptr(),
            1,
            d as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// `out[b, :] = Σ_i a[b, i]·w[i, :]` for `a: [c, f]`, `w: [f, d]`, `out: [c, d]` (overwrites).
fn gemm_aw(a: &[f32], c: usize, f: usize, w: &[f32], d: usize, out: &mut [f32]) {
    // SAFETY: sizes are checked by the callers.
    unsafe {
        gemm(
            c,
            d,
            f,
            out.as_mut_ptr(),
            1,
            d as isize,
            false,
            a.as_ptr(),
            1,
            f as isize,
            w.as_ptr(),
            1,
            d as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}

/// Dense encoder pass followed by a per-token selection, chunk by chunk (§8 "Memory").
///
/// 1. `pre = xt[chunk] · Wᵀ + bias`, `[chunk, d_sae]` (the one dense GEMM);
/// 2. `row_fn(token, pre_row, buf)` pushes that token's main and aux entries.
///
/// Entries are appended to `ws.codes` (main) and `ws.aux` (aux) in token order.
pub fn encode_collect<F>(
    ws: &mut Workspace,
    n: usize,
    d: usize,
    w: &[f32],
    f: usize,
    bias: Option<&[f32]>,
    row_fn: F,
) where
    F: Fn(usize, &[f32], &mut TaskBuf) + Sync,
{
    ws.codes.clear();
    ws.aux.clear();
    let chunk = encode_chunk(f).min(n.max(1));
    resize(&mut ws.scratch.pre, chunk * f);
    let n_tasks = chunk.div_ceil(TOKENS_PER_TASK);
    if ws.scratch.tasks.len() < n_tasks {
        ws.scratch.tasks.resize_with(n_tasks, TaskBuf::default);
    }
    let mut start = 0;
    while start < n {
        let c = chunk.min(n - start);
        let pre = &mut ws.scratch.pre[..c * f];
        let t_gemm = profile::time(Phase::EncoderGemm);
        gemm_xwt(&ws.xt[start * d..(start + c) * d], c, d, w, f, bias, pre);
        drop(t_gemm);
        let _t_select = profile::time(Phase::Selection);
        let pre = &ws.scratch.pre[..c * f];
        ws.scratch.tasks[..c.div_ceil(TOKENS_PER_TASK)]
            .par_iter_mut()
            .enumerate()
            .for_each(|(t, buf)| {
                buf.main.clear();
                buf.main_counts.clear();
                buf.aux.clear();
                buf.aux_counts.clear();
                let lo = t * TOKENS_PER_TASK;
                let hi = (lo + TOKENS_PER_TASK).min(c);
                for b in lo..hi {
                    let (m0, a0) = (buf.main.len(), buf.aux.len());
                    row_fn(start + b, &pre[b * f..(b + 1) * f], buf);
                    buf.main_counts.push((buf.main.len() - m0) as u32);
                    buf.aux_counts.push((buf.aux.len() - a0) as u32);
                }
            });
        for buf in &ws.scratch.tasks[..c.div_ceil(TOKENS_PER_TASK)] {
            append(&mut ws.codes, &buf.main, &buf.main_counts);
            append(&mut ws.aux, &buf.aux, &buf.aux_counts);
        }
        start += c;
    }
}

fn append(codes: &mut Codes, entries: &[(u32, f32)], counts: &[u32]) {
    codes.idx.extend(entries.iter().map(|e| e.0));
    codes.val.extend(entries.iter().map(|e| e.1));
    let mut last = *codes.indptr.last().unwrap_or(&0);
    for &c in counts {
        last += c as usize;
        codes.indptr.push(last);
    }
}

/// Total order used by every selection: larger value first, then smaller index.
#[inline]
fn better(a: (f32, u32), b: (f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// [`topk_select`] followed by dropping the entries that are not positive: the TopK
/// activation `ReLU(TopK(π))`, appended to `out` as `(index, value)`.
pub fn topk_positive(
    row: &[f32],
    k: usize,
    scratch: &mut Vec<(f32, u32)>,
    out: &mut Vec<(u32, f32)>,
) {
    let s = out.len();
    topk_select(row, k, scratch, out);
    let mut w = s;
    for r in s..out.len() {
        if out[r].1 > 0.0 {
            out[w] = out[r];
            w += 1;
        }
    }
    out.truncate(w);
}

/// The `k` largest entries of `row` (ties: lower index first), unsorted, appended to `out`
/// as `(index, value)`.
///
/// Selection, not a sort: a candidate buffer of at most `2k` entries with a running
/// threshold; when it fills, an introselect keeps the best `k` and raises the threshold.
/// Expected cost `O(F)` comparisons. Equal to [`topk_naive`] as a set (tested).
pub fn topk_select(
    row: &[f32],
    k: usize,
    scratch: &mut Vec<(f32, u32)>,
    out: &mut Vec<(u32, f32)>,
) {
    let k = k.min(row.len());
    if k == 0 {
        return;
    }
    scratch.clear();
    let cap = 2 * k.max(16);
    let mut thr = (f32::NEG_INFINITY, u32::MAX);
    let mut have_thr = false;
    // Blocks of SKIP entries all strictly below the threshold's value (IEEE `<`, false for
    // NaN and for equal values, which go the exact way) cannot enter: one vectorised test
    // skips them, which is most of a row once the threshold has settled.
    const SKIP: usize = 16;
    for (blk, vals) in row.chunks(SKIP).enumerate() {
        if have_thr && vals.iter().fold(true, |all, &v| all & (v < thr.0)) {
            continue;
        }
        for (q, &v) in vals.iter().enumerate() {
            let cand = (v, (blk * SKIP + q) as u32);
            if have_thr && better(cand, thr) != std::cmp::Ordering::Less {
                continue;
            }
            scratch.push(cand);
            if scratch.len() == cap {
                scratch.select_nth_unstable_by(k - 1, |a, b| better(*a, *b));
                scratch.truncate(k);
                thr = scratch[k - 1];
                // The k-th best seen so far; later candidates must beat it.
                for e in scratch.iter() {
                    if better(*e, thr) == std::cmp::Ordering::Greater {
                        thr = *e;
                    }
                }
                have_thr = true;
            }
        }
    }
    if scratch.len() > k {
        scratch.select_nth_unstable_by(k - 1, |a, b| better(*a, *b));
        scratch.truncate(k);
    }
    out.extend(scratch.iter().map(|&(v, i)| (i, v)));
}

/// Reference top-k by full sort (tests and the property suite).
pub fn topk_naive(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(f32, u32)> = row
        .iter()
        .enumerate()
        .map(|(i, &v)| (v, i as u32))
        .collect();
    all.sort_by(|a, b| better(*a, *b));
    all.truncate(k.min(row.len()));
    all.into_iter().map(|(v, i)| (i, v)).collect()
}

fn density(codes: &Codes, f: usize) -> f64 {
    codes.nnz() as f64 / (codes.n().max(1) * f.max(1)) as f64
}

/// Scatter the codes of tokens `lo..hi` with per-entry values `vals` into a dense
/// `[hi-lo, f]` buffer.
fn densify(codes: &Codes, vals: &[f32], lo: usize, hi: usize, f: usize, out: &mut Vec<f32>) {
    resize(out, (hi - lo) * f);
    out.par_chunks_mut(f).enumerate().for_each(|(r, row)| {
        row.fill(0.0);
        let b = lo + r;
        for e in codes.indptr[b]..codes.indptr[b + 1] {
            row[codes.idx[e] as usize] = vals[e];
        }
    });
}

/// Sparse decode: `out[b] = bias + Σ_{(i,v) ∈ codes[b]} v·w[i]`, `out: [n, d]`.
/// With `bias = None` the bias is zero (AuxK reconstructs the residual without `b_dec`).
pub fn decode(
    ws_dense: &mut Scratch,
    codes: &Codes,
    w: &[f32],
    d: usize,
    f: usize,
    bias: Option<&[f32]>,
    out: &mut Vec<f32>,
) {
    let _t = profile::time(Phase::Decode);
    let n = codes.n();
    resize(out, n * d);
    if density(codes, f) > DENSE_FALLBACK && n > 0 {
        let mut lo = 0;
        while lo < n {
            let hi = (lo + CHUNK).min(n);
            densify(codes, &codes.val, lo, hi, f, &mut ws_dense.dense);
            gemm_aw(&ws_dense.dense, hi - lo, f, w, d, &mut out[lo * d..hi * d]);
            lo = hi;
        }
        if let Some(b) = bias {
            out.par_chunks_mut(d).for_each(|row| {
                for (o, bb) in row.iter_mut().zip(b) {
                    *o += bb;
                }
            });
        }
        return;
    }
    if n >= CSC_MIN_TOKENS {
        // Latent-major: each column block streams its strip of every decoder row once and
        // adds it to the `[n, block]` strip of the output rows that use it (prefetched).
        // Measured against a token-major sweep (weights gathered per entry, 128-column blocks,
        // prefetched): 85–97 vs 115–186 ms at d 2048, n 4096, k 64 (issue 16).
        build_csc(codes, &codes.val, f, ws_dense);
        let (ptr, tok, cf) = (&ws_dense.csc_ptr, &ws_dense.csc_tok, &ws_dense.csc_coef);
        let o = Shared(out.as_mut_ptr());
        col_blocks(d).into_par_iter().for_each(|(j0, j1)| {
            let wd = j1 - j0;
            for b in 0..n {
                // SAFETY: out is [n, d]; this task alone owns columns j0..j1.
                let r = unsafe { o.strip(b * d + j0, wd) };
                match bias {
                    Some(bb) => r.copy_from_slice(&bb[j0..j1]),
                    None => r.fill(0.0),
                }
            }
            // SAFETY: as above; every token index in `tok` is < n.
            unsafe { csc_decode_block(ptr, tok, cf, w, d, (0, f), (j0, j1), o) };
        });
        return;
    }
    out.par_chunks_mut(d).enumerate().for_each(|(b, row)| {
        match bias {
            Some(bb) => row.copy_from_slice(bb),
            None => row.fill(0.0),
        }
        let (ix, vs) = codes.row(b);
        for (&i, &v) in ix.iter().zip(vs) {
            axpy(v, &w[i as usize * d..(i as usize + 1) * d], row);
        }
    });
}

/// Per-entry dot products `out[e] = w[idx[e]] · v[token(e)]` (e.g. `G_{b,i} = d_i·g_b`).
pub fn entry_dots(
    ws_dense: &mut Scratch,
    codes: &Codes,
    w: &[f32],
    d: usize,
    f: usize,
    v: &[f32],
    out: &mut Vec<f32>,
) {
    let _t = profile::time(Phase::Dots);
    let n = codes.n();
    resize(out, codes.nnz());
    if density(codes, f) > DENSE_FALLBACK && n > 0 {
        // Dense: G_chunk = v_chunk · Wᵀ, then gather.
        let mut lo = 0;
        while lo < n {
            let hi = (lo + CHUNK).min(n);
            resize(&mut ws_dense.dense2, (hi - lo) * f);
            gemm_xwt(
                &v[lo * d..hi * d],
                hi - lo,
                d,
                w,
                f,
                None,
                &mut ws_dense.dense2,
            );
            let g = &ws_dense.dense2;
            let (s, e) = (codes.indptr[lo], codes.indptr[hi]);
            let ip = &codes.indptr;
            out[s..e].par_iter_mut().enumerate().for_each(|(j, o)| {
                let e = s + j;
                // token of entry e: binary search in indptr
                let b = ip.partition_point(|&p| p <= e) - 1;
                *o = g[(b - lo) * f + codes.idx[e] as usize];
            });
            lo = hi;
        }
        return;
    }
    if n >= CSC_MIN_TOKENS && codes.nnz() > 0 {
        // Latent-major over DOT_BLOCK-wide column blocks: block c's partial dots of every
        // entry into `partial[c]` (each weight strip read once, token strips from cache),
        // then the blocks summed in block order and scattered back to CSR order.
        csc_dots(ws_dense, codes, w, d, f, v, out, None);
        return;
    }
    let ip = &codes.indptr;
    let idx = &codes.idx;
    // Split the output per token, in parallel over tokens.
    let mut rows: Vec<&mut [f32]> = Vec::with_capacity(n);
    let mut rest: &mut [f32] = out.as_mut_slice();
    for b in 0..n {
        let (a, r) = rest.split_at_mut(ip[b + 1] - ip[b]);
        rows.push(a);
        rest = r;
    }
    rows.into_par_iter().enumerate().for_each(|(b, o)| {
        let vb = &v[b * d..(b + 1) * d];
        for (j, oo) in o.iter_mut().enumerate() {
            let i = idx[ip[b] + j] as usize;
            *oo = dot(&w[i * d..(i + 1) * d], vb);
        }
    });
}

/// `out[i] += Σ_{entries e of latent i} coef[e]·v[token(e)]` for `out: [f, d]`:
/// the sparse outer-product accumulation of §8 (decoder rows with `v = g`, encoder rows
/// with `v = x̃`). The codes are transposed CSR→CSC so that each rayon task owns a range
/// of latents and writes its rows without atomics.
pub fn accumulate_rows(
    ws: &mut Scratch,
    codes: &Codes,
    coef: &[f32],
    v: &[f32],
    d: usize,
    f: usize,
    out: &mut [f32],
) {
    let _t = profile::time(Phase::Accumulate);
    let n = codes.n();
    if n == 0 || codes.nnz() == 0 {
        return;
    }
    if density(codes, f) > DENSE_FALLBACK {
        let mut lo = 0;
        while lo < n {
            let hi = (lo + CHUNK).min(n);
            densify(codes, coef, lo, hi, f, &mut ws.dense);
            gemm_atv_acc(&ws.dense, hi - lo, f, &v[lo * d..hi * d], d, out);
            lo = hi;
        }
        return;
    }
    build_csc(codes, coef, f, ws);
    let (ptr, tok, cf) = (&ws.csc_ptr, &ws.csc_tok, &ws.csc_coef);
    if n < CSC_MIN_TOKENS {
        out.par_chunks_mut(d).enumerate().for_each(|(i, row)| {
            for p in ptr[i]..ptr[i + 1] {
                let b = tok[p] as usize;
                axpy(cf[p], &v[b * d..(b + 1) * d], row);
            }
        });
        return;
    }
    // Column blocks: each task gathers `[n, block]` strips of `v` (cache-resident) instead
    // of whole rows; every output element is still summed in token order.
    let o = Shared(out.as_mut_ptr());
    col_blocks(d).into_par_iter().for_each(|(j0, j1)| {
        // SAFETY: out is [f, d]; this task alone owns columns j0..j1; tokens are < n.
        unsafe { csc_acc_block(ptr, tok, cf, v, d, (0, f), (j0, j1), o) };
    });
}

/// [`entry_dots`]`(codes, w, v) → dots` and [`accumulate_rows`]`(codes, acc_coef, v) → acc` in
/// one latent-major pass that reads each token strip of `v` once for both: the decoder's
/// per-entry dots `G = d_i·g` and its rows' gradient `Σ z·g` share `g`. Equal, bit for bit,
/// to the two calls (same blocks, same orders); it falls back to them off the CSC path.
#[allow(clippy::too_many_arguments)]
pub fn dots_and_accumulate(
    ws: &mut Scratch,
    codes: &Codes,
    w: &[f32],
    d: usize,
    f: usize,
    v: &[f32],
    dots: &mut Vec<f32>,
    acc_coef: &[f32],
    acc: &mut [f32],
) {
    let n = codes.n();
    let nnz = codes.nnz();
    if n < CSC_MIN_TOKENS || nnz == 0 || density(codes, f) > DENSE_FALLBACK {
        entry_dots(ws, codes, w, d, f, v, dots);
        accumulate_rows(ws, codes, acc_coef, v, d, f, acc);
        return;
    }
    let _t = profile::time(Phase::Dots);
    assert_eq!(acc.len(), f * d, "invariant: callers size acc as [f, d]");
    resize(dots, nnz);
    csc_dots(ws, codes, w, d, f, v, dots, Some((acc_coef, acc)));
}

/// The CSC path of [`entry_dots`] (`acc = None`) and of [`dots_and_accumulate`]
/// (`acc = Some((coef, out))`: also `out[i] += Σ coef·v[token]` from the same strips): each
/// block's partial dots into `partial[c]`, then summed in block order and scattered back to
/// CSR order into `dots`.
#[allow(clippy::too_many_arguments)]
fn csc_dots(
    ws: &mut Scratch,
    codes: &Codes,
    w: &[f32],
    d: usize,
    f: usize,
    v: &[f32],
    dots: &mut [f32],
    acc: Option<(&[f32], &mut [f32])>,
) {
    let nnz = codes.nnz();
    let (coef, acc) = match acc {
        Some((c, o)) => (c, Some(Shared(o.as_mut_ptr()))),
        None => (&codes.val[..], None),
    };
    build_csc(codes, coef, f, ws);
    let nb = d.div_ceil(DOT_BLOCK);
    resize(&mut ws.partial, nb * nnz);
    let Scratch {
        csc_ptr: ptr,
        csc_tok: tok,
        csc_coef: cf,
        csc_ent: ent,
        partial,
        ..
    } = ws;
    let (ptr, tok, cf, ent) = (&*ptr, &*tok, &*cf, &*ent);
    let part = Shared(partial.as_mut_ptr());
    csc_tasks(ptr, d, f).into_par_iter().for_each(|(c, lats)| {
        // SAFETY: each task writes the partial dots of its own (block, latents) and, with
        // `acc`, the columns of block c of its own latents' rows; token indices are < n.
        unsafe { csc_dots_block(ptr, tok, w, d, v, lats, c, part, acc.map(|o| (&cf[..], o))) };
    });
    sum_partial_dots(partial, nnz, nb, ent, dots);
}

/// Tasks `(column block c of DOT_BLOCK columns, latent range)` of the blocked dots: every
/// block, split by entry count into enough latent ranges for about four tasks per thread.
fn csc_tasks(ptr: &[usize], d: usize, f: usize) -> Vec<(usize, (usize, usize))> {
    let nb = d.div_ceil(DOT_BLOCK);
    let per = (4 * rayon::current_num_threads().max(1))
        .div_ceil(nb)
        .clamp(1, f.max(1));
    let nnz = ptr[f];
    let cuts: Vec<usize> = (0..=per)
        .map(|q| {
            if q == per {
                f
            } else {
                ptr.partition_point(|&p| p < nnz * q / per).min(f)
            }
        })
        .collect();
    (0..nb)
        .flat_map(|c| {
            cuts.windows(2)
                .filter(|r| r[0] < r[1])
                .map(move |r| (c, (r[0], r[1])))
        })
        .collect()
}

/// Sum the per-block partial dots in block order and scatter them back to CSR order.
fn sum_partial_dots(partial: &mut [f32], nnz: usize, nb: usize, ent: &[u32], out: &mut [f32]) {
    let (first, rest) = partial.split_at_mut(nnz);
    let o = Shared(out.as_mut_ptr());
    first
        .par_chunks_mut(1 << 12)
        .enumerate()
        .for_each(|(ci, ch)| {
            let p0 = ci << 12;
            for (q, acc) in ch.iter_mut().enumerate() {
                let p = p0 + q;
                for c in 0..nb - 1 {
                    *acc += rest[c * nnz + p];
                }
                // SAFETY: `ent` is a permutation of 0..nnz, so each entry is written once.
                unsafe { o.strip(ent[p] as usize, 1)[0] = *acc };
            }
        });
}

/// CSC entries ahead whose token strip the latent-major passes request while they work on
/// the current one: the strips are scattered over `[n, block]`, which the hardware
/// prefetcher cannot guess. Measured at d 2048, n 4096, k 64 (issue 16): sparse decode
/// 180 → 110 ms; 16 entries ahead was no better.
/// A hint only; results do not depend on it.
const PREFETCH: usize = 8;

/// Ask for the cache lines of `len` floats from `p` (a hint: never faults).
#[inline(always)]
fn prefetch(p: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut l = 0;
        while l < len {
            // SAFETY: prefetching is a hint and never faults; wrapping_add keeps the pointer
            // arithmetic defined whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(l) as *const i8) };
            l += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// Latent-major sparse decode of latents `lats` into columns `cols` of `out: [n, d]`:
/// `out[tok(p)] += cf(p)·w[i]` over each latent's entries in token order.
///
/// # Safety
/// Every `tok` is a row of `out`, and no other task touches these columns of those rows.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn csc_decode_block_generic(
    ptr: &[usize],
    tok: &[u32],
    cf: &[f32],
    w: &[f32],
    d: usize,
    lats: (usize, usize),
    cols: (usize, usize),
    out: Shared,
) {
    let (j0, j1) = cols;
    let wd = j1 - j0;
    for i in lats.0..lats.1 {
        let wi = &w[i * d + j0..i * d + j1];
        for p in ptr[i]..ptr[i + 1] {
            if let Some(&t) = tok.get(p + PREFETCH) {
                prefetch(out.0.wrapping_add(t as usize * d + j0), wd);
            }
            // SAFETY: the caller's contract.
            let r = unsafe { out.strip(tok[p] as usize * d + j0, wd) };
            axpy_generic(cf[p], wi, r);
        }
    }
}

simd_dispatch_unsafe! {
    /// [`csc_decode_block_generic`] at the CPU's widest vectors.
    unsafe fn csc_decode_block(ptr: &[usize], tok: &[u32], cf: &[f32], w: &[f32], d: usize,
        lats: (usize, usize), cols: (usize, usize), out: Shared) = csc_decode_block_generic;
    csc_decode_block_avx512, csc_decode_block_avx2
}

/// Latent-major accumulation of latents `lats` over columns `cols`:
/// `out[i] += Σ_p cf(p)·v[tok(p)]` in token order, `out: [f, d]`.
///
/// # Safety
/// No other task touches these columns of these latents' rows of `out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn csc_acc_block_generic(
    ptr: &[usize],
    tok: &[u32],
    cf: &[f32],
    v: &[f32],
    d: usize,
    lats: (usize, usize),
    cols: (usize, usize),
    out: Shared,
) {
    let (j0, j1) = cols;
    let wd = j1 - j0;
    for i in lats.0..lats.1 {
        // SAFETY: the caller's contract.
        let row = unsafe { out.strip(i * d + j0, wd) };
        for p in ptr[i]..ptr[i + 1] {
            if let Some(&t) = tok.get(p + PREFETCH) {
                prefetch(v.as_ptr().wrapping_add(t as usize * d + j0), wd);
            }
            let b = tok[p] as usize;
            axpy_generic(cf[p], &v[b * d + j0..b * d + j1], row);
        }
    }
}

/// Partial dots of column block `c` (DOT_BLOCK columns) for latents `lats`:
/// `part[c·nnz + p] = w[i, block]·v[tok(p), block]`; with `acc = Some((cf, out))` also
/// `out[i, block] += cf(p)·v[tok(p), block]` in token order from the same strip.
///
/// # Safety
/// No other task writes these partial dots or these columns of these latents' rows of `out`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn csc_dots_block_generic(
    ptr: &[usize],
    tok: &[u32],
    w: &[f32],
    d: usize,
    v: &[f32],
    lats: (usize, usize),
    c: usize,
    part: Shared,
    acc: Option<(&[f32], Shared)>,
) {
    let nnz = tok.len();
    let (j0, j1) = (c * DOT_BLOCK, ((c + 1) * DOT_BLOCK).min(d));
    let wd = j1 - j0;
    for i in lats.0..lats.1 {
        let wi = &w[i * d + j0..i * d + j1];
        let (s, e) = (ptr[i], ptr[i + 1]);
        // SAFETY: the caller's contract.
        let part = unsafe { part.strip(c * nnz + s, e - s) };
        // SAFETY: the caller's contract.
        let mut row = acc.map(|(cf, o)| (cf, unsafe { o.strip(i * d + j0, wd) }));
        for (q, p) in (s..e).enumerate() {
            if let Some(&t) = tok.get(p + PREFETCH) {
                prefetch(v.as_ptr().wrapping_add(t as usize * d + j0), wd);
            }
            let b = tok[p] as usize;
            let vb = &v[b * d + j0..b * d + j1];
            part[q] = dot_generic(wi, vb);
            if let Some((cf, row)) = row.as_mut() {
                axpy_generic(cf[p], vb, row);
            }
        }
    }
}

simd_dispatch_unsafe! {
    /// [`csc_acc_block_generic`] at the CPU's widest vectors.
    unsafe fn csc_acc_block(ptr: &[usize], tok: &[u32], cf: &[f32], v: &[f32], d: usize,
        lats: (usize, usize), cols: (usize, usize), out: Shared) = csc_acc_block_generic;
    csc_acc_block_avx512, csc_acc_block_avx2
}

simd_dispatch_unsafe! {
    /// [`csc_dots_block_generic`] at the CPU's widest vectors.
    unsafe fn csc_dots_block(ptr: &[usize], tok: &[u32], w: &[f32], d: usize, v: &[f32],
        lats: (usize, usize), c: usize, part: Shared, acc: Option<(&[f32], Shared)>)
        = csc_dots_block_generic;
    csc_dots_block_avx512, csc_dots_block_avx2
}

/// Per-latent sums of per-entry values: `out[i] += Σ_{e of latent i} vals[e]` (`out: [f]`).
pub fn scatter_add(codes: &Codes, vals: &[f32], out: &mut [f32]) {
    for (&i, &v) in codes.idx.iter().zip(vals) {
        out[i as usize] += v;
    }
}

/// `out[j] += Σ_i s[i]·w[i, j]` over the latents with `s[i] ≠ 0`, parallel over column
/// blocks (the encoder's contribution to the `b_dec` gradient when `x̃ = x − b_dec`).
pub fn add_weighted_rows(scratch: &mut Scratch, s: &[f32], w: &[f32], d: usize, out: &mut [f32]) {
    let _t = profile::time(Phase::Backward);
    scratch.fill.clear();
    scratch.fill.extend((0..s.len()).filter(|&i| s[i] != 0.0));
    let nz = &scratch.fill;
    let block = 64;
    out.par_chunks_mut(block).enumerate().for_each(|(cb, o)| {
        let j0 = cb * block;
        for &i in nz {
            let wr = &w[i * d + j0..i * d + j0 + o.len()];
            axpy(s[i], wr, o);
        }
    });
}

/// Column sums `out[j] = Σ_b v[b, j]` for `v: [n, d]`, parallel over column blocks.
pub fn col_sums(v: &[f32], n: usize, d: usize, out: &mut [f32]) {
    let _t = profile::time(Phase::Backward);
    let block = 64;
    out.par_chunks_mut(block).enumerate().for_each(|(cb, o)| {
        o.fill(0.0);
        let j0 = cb * block;
        for b in 0..n {
            let r = &v[b * d + j0..b * d + j0 + o.len()];
            for (oo, rr) in o.iter_mut().zip(r) {
                *oo += rr;
            }
        }
    });
}

/// Residual gradient and loss of SumD-MeanB: `g = scale·(x̂ − x)`; returns `Σ_b ‖x̂_b − x_b‖²`
/// (f64, summed per token in a fixed order).
pub fn residual(xhat: &[f32], x: &[f32], d: usize, scale: f32, g: &mut Vec<f32>) -> f64 {
    let _t = profile::time(Phase::Backward);
    resize(g, x.len());
    let per: Vec<f64> = g
        .par_chunks_mut(d)
        .zip(xhat.par_chunks(d).zip(x.par_chunks(d)))
        .map(|(gr, (xh, xx))| {
            for ((o, a), b) in gr.iter_mut().zip(xh).zip(xx) {
                *o = a - b;
            }
            // Σe² over the row (eight f64 lanes, fixed order), then g = scale·e in place
            let s = sum_sq_f64(gr);
            gr.iter_mut().for_each(|o| *o *= scale);
            s
        })
        .collect();
    per.iter().sum()
}

/// One Adam step over a chunk (sae_variants.md §1.4) on gradients `gscale·g`:
/// `m ← β1 m + (1−β1) g`, `v ← β2 v + (1−β2) g²`, `p ← p − step·m/(√v + eps)`, with the bias
/// corrections already folded into `step` and `eps` by the caller. Multiplying by `gscale`
/// here equals scaling the gradient buffer first, bit for bit (the same one rounding).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_chunk_generic(
    (b1, b2): (f32, f32),
    step: f32,
    eps: f32,
    gscale: Option<f32>,
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let n = p.len().min(g.len()).min(m.len()).min(v.len());
    let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
    for i in 0..n {
        let gi = match gscale {
            Some(s) => g[i] * s,
            None => g[i],
        };
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        p[i] -= step * m[i] / (v[i].sqrt() + eps);
    }
}

simd_dispatch! {
    /// [`adam_chunk_generic`] at the CPU's widest vectors (IEEE `sqrt` and `/` are exactly
    /// rounded at every width, so the result does not depend on the CPU).
    #[allow(clippy::too_many_arguments)]
    pub fn adam_chunk(betas: (f32, f32), step: f32, eps: f32, gscale: Option<f32>,
        p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) = adam_chunk_generic;
    adam_chunk_avx512, adam_chunk_avx2
}

/// `Σ v²` in f64 over a chunk with eight independent accumulators combined in lane order
/// (fixed order; a single running sum waited on each add's latency).
pub fn sum_sq_f64(g: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let n8 = g.len() / 8 * 8;
    for c in g[..n8].chunks_exact(8) {
        for l in 0..8 {
            acc[l] += c[l] as f64 * c[l] as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for &x in &g[n8..] {
        s += x as f64 * x as f64;
    }
    s
}

simd_dispatch! {
    /// `y += a·x`.
    pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) = axpy_generic;
    axpy_avx512, axpy_avx2
}

simd_dispatch! {
    /// Dot product with 8 independent accumulators (vectorises; fixed order).
    pub fn dot(a: &[f32], b: &[f32]) -> f32 = dot_generic;
    dot_avx512, dot_avx2
}

#[inline(always)]
fn axpy_generic(a: f32, x: &[f32], y: &mut [f32]) {
    for (yy, xx) in y.iter_mut().zip(x) {
        *yy += a * xx;
    }
}

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let n8 = a.len() / 8 * 8;
    for (ca, cb) in a[..n8].chunks_exact(8).zip(b[..n8].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += ca[l] * cb[l];
        }
    }
    let mut s = acc.iter().sum::<f32>();
    for (x, y) in a[n8..].iter().zip(&b[n8..]) {
        s += x * y;
    }
    s
}

/// Euclidean norms of the rows of `w: [f, d]`.
pub fn row_norms(w: &[f32], d: usize, out: &mut Vec<f32>) {
    resize(out, w.len() / d.max(1));
    out.par_iter_mut()
        .zip(w.par_chunks(d))
        .for_each(|(o, r)| *o = dot(r, r).sqrt());
}

/// Remove from each gradient row its component along the (unit) weight row:
/// `g_i ← g_i − (g_i·d̂_i) d̂_i` (§1.3 A step 1).
pub fn project_rows(grad: &mut [f32], w: &[f32], d: usize) {
    grad.par_chunks_mut(d)
        .zip(w.par_chunks(d))
        .for_each(|(g, r)| {
            let nn = dot(r, r);
            if nn > 0.0 {
                let c = dot(g, r) / nn;
                axpy(-c, r, g);
            }
        });
}

/// Rescale every row of `w` to unit norm (§1.3 A step 3). Zero rows are left alone.
pub fn normalize_rows(w: &mut [f32], d: usize) {
    w.par_chunks_mut(d).for_each(normalize_row);
}

/// Rescale one row to unit norm (left alone if zero), as [`normalize_rows`] does to each.
#[inline]
pub fn normalize_row(r: &mut [f32]) {
    let n = dot(r, r).sqrt();
    if n > 0.0 {
        let inv = 1.0 / n;
        r.iter_mut().for_each(|v| *v *= inv);
    }
}

/// Install a PAM-SGD decoder solution `new_w` into `w_dec` with unit rows, moving each
/// row's norm `s_i` into the encoder (`w_enc` row `i` and `b_enc[i]` times `s_i`), so a latent
/// with the same pre-activation sign contributes exactly what the solved decoder would (exact
/// for ReLU, which is positively homogeneous; for TopK the ranking becomes `s_i·π_i`). Rows
/// solved to (near) zero keep their old direction and leave the encoder alone.
pub fn install_unit_decoder(
    new_w: &[f32],
    w_dec: &mut [f32],
    w_enc: &mut [f32],
    b_enc: &mut [f32],
    d: usize,
) {
    w_dec
        .par_chunks_mut(d)
        .zip(w_enc.par_chunks_mut(d))
        .zip(b_enc.par_iter_mut())
        .zip(new_w.par_chunks(d))
        .for_each(|(((dec, enc), be), nw)| {
            let s = dot(nw, nw).sqrt();
            if s > 1e-6 && s.is_finite() {
                for (o, v) in dec.iter_mut().zip(nw) {
                    *o = v / s;
                }
                enc.iter_mut().for_each(|v| *v *= s);
                *be *= s;
            }
        });
}

/// `f` random directions in `R^d` with norm `norm` each, `[f, d]`.
pub fn random_rows(rng: &mut Rng, f: usize, d: usize, norm: f32) -> Vec<f32> {
    let mut w: Vec<f32> = (0..f * d).map(|_| rng.normal() as f32).collect();
    normalize_rows(&mut w, d);
    if norm != 1.0 {
        w.iter_mut().for_each(|v| *v *= norm);
    }
    w
}

/// `xt = x − b` row-wise (`sub = Some(b)`) or a plain copy.
pub fn prepare_input(x: &[f32], d: usize, sub: Option<&[f32]>, xt: &mut Vec<f32>) {
    resize(xt, x.len());
    xt.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, xx)| match sub {
            Some(b) => {
                for ((oo, a), bb) in o.iter_mut().zip(xx).zip(b) {
                    *oo = a - bb;
                }
            }
            None => o.copy_from_slice(xx),
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive() {
        let mut r = Rng::new(3);
        let (c, d, f) = (5, 7, 9);
        let x: Vec<f32> = (0..c * d).map(|_| r.normal() as f32).collect();
        let w: Vec<f32> = (0..f * d).map(|_| r.normal() as f32).collect();
        let b: Vec<f32> = (0..f).map(|_| r.normal() as f32).collect();
        let mut out = vec![0.0; c * f];
        gemm_xwt(&x, c, d, &w, f, Some(&b), &mut out);
        for bb in 0..c {
            for i in 0..f {
                let want: f32 = (0..d).map(|j| x[bb * d + j] * w[i * d + j]).sum::<f32>() + b[i];
                assert!((out[bb * f + i] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn sparse_and_dense_paths_agree() {
        // Codes with density above and below the fallback give the same accumulations.
        let mut r = Rng::new(5);
        let (n, d, f) = (40, 6, 10);
        let w: Vec<f32> = (0..f * d).map(|_| r.normal() as f32).collect();
        let v: Vec<f32> = (0..n * d).map(|_| r.normal() as f32).collect();
        let mut codes = Codes::default();
        codes.clear();
        for _ in 0..n {
            for i in 0..f {
                if r.uniform() < 0.3 {
                    codes.idx.push(i as u32);
                    codes.val.push(r.normal() as f32);
                }
            }
            codes.indptr.push(codes.idx.len());
        }
        assert!(density(&codes, f) > DENSE_FALLBACK);
        let mut ws = Scratch::default();
        let mut dense_out = vec![0.0; f * d];
        accumulate_rows(
            &mut ws,
            &codes,
            &codes.val.clone(),
            &v,
            d,
            f,
            &mut dense_out,
        );
        let mut want = vec![0.0f32; f * d];
        for b in 0..n {
            let (ix, vs) = codes.row(b);
            for (&i, &c) in ix.iter().zip(vs) {
                for j in 0..d {
                    want[i as usize * d + j] += c * v[b * d + j];
                }
            }
        }
        for (a, b) in dense_out.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4, "{a} {b}");
        }
        let mut g = Vec::new();
        entry_dots(&mut ws, &codes, &w, d, f, &v, &mut g);
        for b in 0..n {
            let (s, e) = (codes.indptr[b], codes.indptr[b + 1]);
            for (&i, &ge) in codes.idx[s..e].iter().zip(&g[s..e]) {
                let i = i as usize;
                let want = dot(&w[i * d..(i + 1) * d], &v[b * d..(b + 1) * d]);
                assert!((ge - want).abs() < 1e-4);
            }
        }
    }

    /// Random CSR codes over `f` latents with per-pair probability `p`; every `zero_every`-th
    /// token (if nonzero) gets no entry at all.
    fn random_codes(r: &mut Rng, n: usize, f: usize, p: f64, zero_every: usize) -> Codes {
        let mut codes = Codes::default();
        codes.clear();
        for b in 0..n {
            if zero_every == 0 || b % zero_every != 0 {
                for i in 0..f {
                    if r.uniform() < p {
                        codes.idx.push(i as u32);
                        codes.val.push(r.normal() as f32);
                    }
                }
            }
            codes.indptr.push(codes.idx.len());
        }
        codes
    }

    fn close(a: f32, b: f64) -> bool {
        (a as f64 - b).abs() <= 1e-4 * b.abs().max(1.0)
    }

    #[test]
    fn blocked_passes_do_not_depend_on_the_thread_count() {
        // The column blocks follow the thread count; the results must not (resume on another
        // machine is bit-exact).
        let mut r = Rng::new(8);
        let (n, d, f) = (CSC_MIN_TOKENS + 40, DOT_BLOCK + 100, 96);
        let codes = random_codes(&mut r, n, f, 0.02, 5);
        let w: Vec<f32> = (0..f * d).map(|_| r.normal() as f32).collect();
        let v: Vec<f32> = (0..n * d).map(|_| r.normal() as f32).collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            pool.install(|| {
                let mut s = Scratch::default();
                let (mut rec, mut dots, mut acc) = (Vec::new(), Vec::new(), vec![0.5f32; f * d]);
                decode(&mut s, &codes, &w, d, f, None, &mut rec);
                entry_dots(&mut s, &codes, &w, d, f, &v, &mut dots);
                accumulate_rows(&mut s, &codes, &dots, &v, d, f, &mut acc);
                let (mut fdots, mut facc) = (Vec::new(), vec![0.25f32; f * d]);
                dots_and_accumulate(&mut s, &codes, &w, d, f, &v, &mut fdots, &dots, &mut facc);
                (rec, dots, acc, fdots, facc)
            })
        };
        let one = run(1);
        for t in [2, 3, 7] {
            assert!(run(t) == one, "{t} threads differ from 1");
        }
    }

    #[test]
    fn fused_dots_and_accumulation_equal_the_two_passes_bit_for_bit() {
        // On the CSC path (several dot blocks, the last partial; skewed latents so that the
        // latent ranges of the tasks hold unequal counts) and on the fallbacks below
        // CSC_MIN_TOKENS and above DENSE_FALLBACK.
        let mut r = Rng::new(44);
        for &(n, d, f, p) in &[
            (CSC_MIN_TOKENS + 9, 2 * DOT_BLOCK + 40, 120, 0.02),
            (CSC_MIN_TOKENS * 2, DOT_BLOCK / 2, 300, 0.01),
            (CSC_MIN_TOKENS - 1, 70, 50, 0.02),
            (CSC_MIN_TOKENS + 1, 40, 30, 0.3),
        ] {
            let mut codes = random_codes(&mut r, n, f, p, 4);
            // pile extra entries onto the first latents: unequal per-latent counts
            for b in 0..n {
                if b % 2 == 0 && !codes.row(b).0.contains(&0) {
                    let at = codes.indptr[b];
                    codes.idx.insert(at, 0);
                    codes.val.insert(at, r.normal() as f32);
                    for q in codes.indptr[b + 1..].iter_mut() {
                        *q += 1;
                    }
                }
            }
            let w: Vec<f32> = (0..f * d).map(|_| r.normal() as f32).collect();
            let v: Vec<f32> = (0..n * d).map(|_| r.normal() as f32).collect();
            let coef: Vec<f32> = (0..codes.nnz()).map(|_| r.normal() as f32).collect();
            let init: Vec<f32> = (0..f * d).map(|_| r.normal() as f32).collect();
            let mut s = Scratch::default();
            let (mut dots, mut acc) = (Vec::new(), init.clone());
            entry_dots(&mut s, &codes, &w, d, f, &v, &mut dots);
            accumulate_rows(&mut s, &codes, &coef, &v, d, f, &mut acc);
            let (mut fdots, mut facc) = (vec![f32::NAN; 2], init.clone());
            dots_and_accumulate(&mut s, &codes, &w, d, f, &v, &mut fdots, &coef, &mut facc);
            assert!(dots == fdots, "{n}x{d}x{f}: dots differ");
            assert!(acc == facc, "{n}x{d}x{f}: accumulations differ");
            assert!(acc != init, "{n}x{d}x{f}: the accumulation changed nothing");
        }
    }

    #[test]
    fn sparse_paths_match_naive_references() {
        // Codes below DENSE_FALLBACK take the sparse branches of decode, entry_dots and
        // accumulate_rows (the branch is decided by `density(codes, f)` alone). Shapes with n
        // below, at and above CHUNK (not multiples of it), with empty rows.
        let mut r = Rng::new(21);
        for &(n, d, f, p) in &[
            (7, 5, 64, 0.02),
            (CHUNK, 16, 200, 0.01),
            (CHUNK + 37, 9, 300, 0.004),
            (2 * CHUNK + 1, 3, 128, 0.02),
            // column-blocked CSC passes with several dot blocks, the last one partial
            (CSC_MIN_TOKENS + 3, 2 * DOT_BLOCK + 7, 80, 0.015),
        ] {
            let codes = random_codes(&mut r, n, f, p, 3);
            let dn = density(&codes, f);
            assert!(
                dn > 0.0 && dn < DENSE_FALLBACK / 2.0,
                "{n}x{f}: density {dn} must take the sparse path"
            );
            let empty = (0..n).filter(|&b| codes.row(b).0.is_empty()).count();
            assert!(empty >= n / 3, "rows with no active latent");
            let w: Vec<f32> = (0..f * d).map(|_| r.normal() as f32).collect();
            let v: Vec<f32> = (0..n * d).map(|_| r.normal() as f32).collect();
            let bias: Vec<f32> = (0..d).map(|_| r.normal() as f32).collect();
            let coef: Vec<f32> = (0..codes.nnz()).map(|_| r.normal() as f32).collect();
            let dense = codes.to_dense(f);
            let mut ws = Scratch::default();

            // decode: out[b, j] = bias[j] + Σ_i a[b, i] w[i, j], with and without the bias
            for with_bias in [true, false] {
                let mut out = vec![f32::NAN; 3]; // wrong size and contents: must be overwritten
                let b = with_bias.then_some(&bias[..]);
                decode(&mut ws, &codes, &w, d, f, b, &mut out);
                assert_eq!(out.len(), n * d);
                for bb in 0..n {
                    for j in 0..d {
                        let mut want = if with_bias { bias[j] as f64 } else { 0.0 };
                        for i in 0..f {
                            want += dense[bb * f + i] as f64 * w[i * d + j] as f64;
                        }
                        let got = out[bb * d + j];
                        assert!(
                            close(got, want),
                            "decode {n}x{f} [{bb},{j}]: {got} vs {want}"
                        );
                    }
                }
            }

            // entry_dots: out[e] = w[idx[e]] · v[token(e)]
            let mut g = vec![f32::NAN; 1];
            entry_dots(&mut ws, &codes, &w, d, f, &v, &mut g);
            assert_eq!(g.len(), codes.nnz());
            let mut e = 0;
            for bb in 0..n {
                for i in 0..f {
                    if dense[bb * f + i] != 0.0 {
                        let want: f64 = (0..d)
                            .map(|j| w[i * d + j] as f64 * v[bb * d + j] as f64)
                            .sum();
                        assert!(
                            close(g[e], want),
                            "entry_dots {n}x{f} entry {e}: {} vs {want}",
                            g[e]
                        );
                        e += 1;
                    }
                }
            }
            assert_eq!(e, codes.nnz());

            // accumulate_rows: out[i, :] += Σ_b c[b, i] v[b, :], on top of existing contents
            let init: Vec<f32> = (0..f * d).map(|_| r.normal() as f32).collect();
            let mut out = init.clone();
            accumulate_rows(&mut ws, &codes, &coef, &v, d, f, &mut out);
            let mut want: Vec<f64> = init.iter().map(|&x| x as f64).collect();
            let mut e = 0;
            for bb in 0..n {
                for i in 0..f {
                    if dense[bb * f + i] != 0.0 {
                        for j in 0..d {
                            want[i * d + j] += coef[e] as f64 * v[bb * d + j] as f64;
                        }
                        e += 1;
                    }
                }
            }
            for (k, (&a, &b)) in out.iter().zip(&want).enumerate() {
                assert!(close(a, b), "accumulate_rows {n}x{f} [{k}]: {a} vs {b}");
            }
            // a second call on the reused scratch accumulates again (CSC buffers reset)
            accumulate_rows(&mut ws, &codes, &coef, &v, d, f, &mut out);
            for (k, (&a, (&b, &i0))) in out.iter().zip(want.iter().zip(&init)).enumerate() {
                let twice = 2.0 * b - i0 as f64;
                assert!(
                    close(a, twice),
                    "accumulate_rows twice [{k}]: {a} vs {twice}"
                );
            }
        }
        // all rows empty: nothing to accumulate, decode is the bias
        let codes = random_codes(&mut r, 5, 10, 0.0, 0);
        let mut out = vec![1.0f32; 10 * 2];
        accumulate_rows(
            &mut Scratch::default(),
            &codes,
            &[],
            &[0.0; 10],
            2,
            10,
            &mut out,
        );
        assert!(out.iter().all(|&v| v == 1.0));
        let mut rec = Vec::new();
        let bias = [3.0f32, 4.0];
        decode(
            &mut Scratch::default(),
            &codes,
            &[0.0; 20],
            2,
            10,
            Some(&bias[..]),
            &mut rec,
        );
        assert_eq!(rec, bias.repeat(5));
    }
}
