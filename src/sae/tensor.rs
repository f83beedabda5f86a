//! The variants' second implementation, on candle tensors (issue #13 items 2–3): what a
//! variant's [`super::Sae::tensor_forward`] receives and returns, and the tensor pieces the
//! variants share (per-row top-k by bisection, the AuxK term).
//!
//! A tensor forward computes the training loss with standard candle ops on any
//! [`candle_core::Device`]; the trainer's tensor backend (`crate::train::tensor`) gets every
//! gradient from candle autograd. On the CPU device the two implementations must agree on
//! loss, codes and gradients (`tests/it/tensor_oracle.rs`): the tensor path is the oracle of the
//! hand-written backward passes.
//!
//! Decision: top-k without a sort (candle has no top-k and its CUDA argsort fails on rows of
//! 16k–65k latents, STYLE.md §2.11): per row, bisect a threshold `t` on counts
//! (`#{π ≥ lo} ≥ k > #{π > hi}`) until every row has exactly `k` entries `≥ lo` or has
//! reached adjacent floats, then break the remaining (exact) ties by index with a second
//! bisection on the index (lower index wins, as in [`crate::kernels::topk_select`]). The
//! selection equals the kernels' for every finite row: [`MAX_BISECT`] halvings take any
//! f32 range down to adjacent floats, and rows of ordinary activations stop after 30–40.
//! Decision: activations are `π ⊙ mask` with a detached 0/1 mask (not `relu`), because candle's
//! `relu` passes gradient at exactly 0 while the kernels treat `π = 0` as inactive.

use candle_core::{DType, Result, Tensor};

/// Bisection steps of the value threshold, at most: enough to go from the widest f32 range
/// (`±3.4e38`) to adjacent subnormals (`2²⁷⁹` → 1).
pub const MAX_BISECT: usize = 288;

/// What the trainer's tensor backend hands to [`super::Sae::tensor_forward`].
#[derive(Debug, Clone, Copy)]
pub struct TensorInput<'a> {
    /// Scaled activations `[n, d_in]`, on the backend's device.
    pub x: &'a Tensor,
    /// Tokens in the batch.
    pub n: usize,
    /// Optimiser step (0-based).
    pub step: u64,
    /// Sparsity-coefficient warmup factor in `[0, 1]` (multiplies λ).
    pub sparsity_scale: f32,
    /// `dead[i]`: latent `i` has not fired for more than the dead window (AuxK input).
    pub dead: &'a [bool],
    /// Operand dtype of the encoder/decoder GEMMs ([`mm`]; `train.compute_dtype`).
    pub gemm: DType,
}

/// `a · b` with both operands in `dt` and the product back in f32 (mixed precision as in
/// autocast; autograd casts the gradients back to the f32 parameters). f32: a plain matmul.
pub fn mm(a: &Tensor, b: &Tensor, dt: DType) -> Result<Tensor> {
    if dt == DType::F32 {
        a.matmul(b)
    } else {
        a.to_dtype(dt)?
            .matmul(&b.to_dtype(dt)?)?
            .to_dtype(DType::F32)
    }
}

/// The result of one tensor forward pass.
#[derive(Debug)]
pub struct TensorForward {
    /// Named loss parts (scalar tensors, each already weighted) whose sum is differentiated;
    /// the names are those of [`super::StepOutput::losses`].
    pub losses: Vec<(&'static str, Tensor)>,
    /// Diagnostics that are not part of the loss.
    pub metrics: Vec<(&'static str, f64)>,
    /// Training codes `[n, d_sae]`, dense, detached (`≠ 0` = active).
    pub codes: Tensor,
}

/// Rows of `f32` 0/1 values: `1` where `pre` is positive (detached).
pub fn positive(pre: &Tensor) -> Result<Tensor> {
    pre.detach().gt(0f32)?.to_dtype(DType::F32)
}

/// `[1, len]` `f32` 0/1 mask from booleans, on `like`'s device.
pub fn bool_mask(mask: &[bool], like: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = mask.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
    Tensor::from_slice(&v, (1, mask.len()), like.device())
}

/// `Σ (a − b)²` over every element, a scalar.
pub fn sse(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a - b)?.sqr()?.sum_all()
}

fn count_ge(pre: &Tensor, t: &Tensor) -> Result<Tensor> {
    pre.broadcast_ge(t)?.to_dtype(DType::F32)?.sum_keepdim(1)
}

/// Whether every entry of the `u8` tensor `t` is nonzero (one host sync).
fn all(t: &Tensor) -> Result<bool> {
    Ok(t.to_dtype(DType::F32)?.min_all()?.to_scalar::<f32>()? > 0.0)
}

/// `f32` 0/1 mask `[n, f]` of the `k` largest entries of each row of `pre` (detached),
/// ties to the lower index: the set [`crate::kernels::topk_select`] picks.
///
/// 1. bisect per-row `lo ≤ v_k ≤ hi` with `#{π ≥ lo} ≥ k` and `#{π > hi} < k`;
/// 2. `t` = `hi` when `#{π ≥ hi} ≥ k`, else `lo`; `sure` = entries certainly selected,
///    `band` = entries tied at the k-th place;
/// 3. if some row has more band entries than places left, bisect an index bound per row
///    so that the lowest-index band entries fill them.
pub fn topk_mask(pre: &Tensor, k: usize) -> Result<Tensor> {
    let pre = pre.detach();
    let (n, f) = pre.dims2()?;
    if k == 0 || n == 0 {
        return pre.zeros_like();
    }
    if k >= f {
        return pre.ones_like();
    }
    let kf = k as f64;
    // 1. value bisection
    let mut lo = pre.min_keepdim(1)?;
    let mut hi = pre.max_keepdim(1)?;
    for it in 0..MAX_BISECT {
        // no overflow at the extremes; a midpoint that rounds outside [lo, hi] keeps both
        // invariants (it only moves lo down or hi up)
        let mid = ((&lo * 0.5)? + (&hi * 0.5)?)?;
        let ok = count_ge(&pre, &mid)?.ge(kf)?;
        let (new_lo, new_hi) = (ok.where_cond(&mid, &lo)?, ok.where_cond(&hi, &mid)?);
        if it % 8 == 7 {
            // exact (k entries ≥ lo) or stalled at adjacent floats, on every row
            let exact = count_ge(&pre, &new_lo)?.eq(kf)?;
            let stalled = mid.eq(&lo)?.maximum(&mid.eq(&hi)?)?;
            if all(&exact.maximum(&stalled)?)? {
                lo = new_lo;
                hi = new_hi;
                break;
            }
        }
        lo = new_lo;
        hi = new_hi;
    }
    // 2. sure entries and the band tied at the k-th place
    let ge_hi = pre.broadcast_ge(&hi)?.to_dtype(DType::F32)?;
    let gt_hi = pre.broadcast_gt(&hi)?.to_dtype(DType::F32)?;
    let eq_hi = (&ge_hi - &gt_hi)?;
    let below_hi = (pre.broadcast_ge(&lo)?.to_dtype(DType::F32)? - &ge_hi)?;
    let t_hi = ge_hi.sum_keepdim(1)?.ge(kf)?.to_dtype(DType::F32)?; // [n, 1]
    let t_lo = t_hi.affine(-1.0, 1.0)?;
    let sure = (&gt_hi + eq_hi.broadcast_mul(&t_lo)?)?;
    let band = (eq_hi.broadcast_mul(&t_hi)? + below_hi.broadcast_mul(&t_lo)?)?;
    let left = sure.sum_keepdim(1)?.affine(-1.0, kf)?; // places left, [n, 1]
    if all(&band.sum_keepdim(1)?.le(&left)?)? {
        return sure + band;
    }
    // 3. index bisection: the smallest bound j with #{band, index < j} ≥ left
    let idx = Tensor::arange(0u32, f as u32, pre.device())?
        .to_dtype(DType::F32)?
        .reshape((1, f))?;
    let mut jlo = Tensor::full(-1f32, (n, 1), pre.device())?;
    let mut jhi = Tensor::full(f as f32, (n, 1), pre.device())?;
    for _ in 0..=(usize::BITS - f.leading_zeros()) {
        let mid = ((&jlo + &jhi)? * 0.5)?.floor()?;
        let below = idx.broadcast_lt(&mid)?.to_dtype(DType::F32)?;
        let cnt = band.broadcast_mul(&below)?.sum_keepdim(1)?;
        let ok = cnt.ge(&left)?;
        jhi = ok.where_cond(&mid, &jhi)?;
        jlo = ok.where_cond(&jlo, &mid)?;
    }
    let below = idx.broadcast_lt(&jhi)?.to_dtype(DType::F32)?;
    sure + band.broadcast_mul(&below)?
}

/// The AuxK term of the TopK family (sae_variants.md §3.3, OpenAI's form as in
/// `topk_family.rs`): `α ‖e − ê‖² / ‖e − ē‖²` with `e = sg(x − x̂)` and `ê` the decode
/// without bias of `π` on the top-`k_aux` `scores` among the dead latents where `keep`
/// (TopK: `scores = π`, `keep = π > 0`; AbsTopK: `|π|` and `π ≠ 0`). `None` when nothing
/// is selected (the kernels then report no AuxK term either).
#[allow(clippy::too_many_arguments)]
pub fn auxk(
    pre: &Tensor,
    (scores, keep): (&Tensor, &Tensor),
    x: &Tensor,
    recon: &Tensor,
    w_dec: &Tensor,
    dead: &[bool],
    k_aux: usize,
    alpha: f32,
) -> Result<Option<Tensor>> {
    if k_aux == 0 || alpha == 0.0 {
        return Ok(None);
    }
    let (n, f) = pre.dims2()?;
    let dead_m = bool_mask(dead, pre)?;
    // alive latents below every dead one, so that the top-k_aux are dead ones
    let scores = scores.detach();
    let m = scores.min_all()?.to_scalar::<f32>()?;
    let fill = Tensor::full(m - m.abs().max(1.0), (n, f), pre.device())?;
    let dead_b = dead_m.broadcast_as((n, f))?.ne(0f32)?;
    let masked = dead_b.where_cond(&scores, &fill)?;
    let sel = topk_mask(&masked, k_aux)?
        .broadcast_mul(&dead_m)?
        .mul(keep)?;
    if sel.sum_all()?.to_scalar::<f32>()? == 0.0 {
        return Ok(None);
    }
    let z_aux = (pre * &sel)?;
    let e = (x - recon)?.detach();
    let var = e
        .broadcast_sub(&e.mean_keepdim(0)?)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()?;
    let var = (var as f64).max(1e-12);
    let ehat = z_aux.matmul(w_dec)?;
    Ok(Some((sse(&e, &ehat)? * (alpha as f64 / var))?))
}

/// A tensor whose value is exactly 0 and whose gradient with respect to `t` is 1: the
/// straight-through pieces are `c ⊙ zero_with_grad(θ)` with a detached `c` (JumpReLU).
pub fn zero_with_grad(t: &Tensor) -> Result<Tensor> {
    t - t.detach()
}

/// What a k-means baseline's tensor forward leaves for its [`super::Sae::update_state`]
/// (`kmeans/`, `local_pca/`): the step's centred inputs `x̃ = x − b_dec` and its assignment,
/// on the device, so that the state update (cluster sums, second moments) runs on device
/// results instead of recomputing them on the host.
#[derive(Debug)]
pub struct ClusterStep {
    /// Step it belongs to.
    pub step: u64,
    /// Tokens.
    pub n: usize,
    /// `x̃ [n, d]`, `f32`, detached.
    pub xt: Tensor,
    /// Cluster of every token, `u32 [n]`.
    pub assign: Tensor,
}

/// The hand-over slot of [`ClusterStep`]: filled by the `&self` tensor forward, emptied by
/// the `&mut self` state update of the same step (and by the kernels' step, so a stale
/// entry is never used).
///
/// Decision: a slot inside the variant instead of an engine hook, so that the engine keeps
/// calling only `tensor_forward` then `update_state`, as for every variant.
#[derive(Debug, Default)]
pub struct StepSlot(std::sync::Mutex<Option<ClusterStep>>);

impl StepSlot {
    /// Keep `s` for the state update.
    pub fn put(&self, s: ClusterStep) {
        // a poisoned slot only held a previous step's tensors
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *g = Some(s);
    }

    /// Take what the tensor forward of step `step` on `n` tokens left, if anything.
    pub fn take(&mut self, step: u64, n: usize) -> Option<ClusterStep> {
        let g = self.0.get_mut().unwrap_or_else(|e| e.into_inner());
        g.take().filter(|s| s.step == step && s.n == n)
    }

    /// Forget any pending step.
    pub fn clear(&mut self) {
        *self.0.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Index of the largest entry of every row (`u32 [n]`), ties to the lower index as the
/// kernels' argmax.
pub fn row_argmax(scores: &Tensor) -> Result<Tensor> {
    scores.argmax(1)?.to_dtype(DType::U32)
}

/// `f32` 0/1 mask `[n, f]` of the `s` latents `c·s … c·s + s − 1` of each token's cluster
/// `c = assign[b]` (the latent layout of the k-means baselines; latents past `k·s` stay 0).
pub fn cluster_mask(assign: &Tensor, k: usize, s: usize, f: usize) -> Result<Tensor> {
    let n = assign.dims1()?;
    let ids = Tensor::arange(0u32, k as u32, assign.device())?.reshape((1, k))?;
    let onehot = ids
        .broadcast_eq(&assign.reshape((n, 1))?)?
        .to_dtype(DType::F32)?;
    onehot
        .reshape((n, k, 1))?
        .broadcast_as((n, k, s))?
        .reshape((n, k * s))?
        .pad_with_zeros(1, 0, f - k * s)
}

/// `[1, f]` `f32` indicator of the centroid latents `c·s` (`c < k`).
pub fn centroid_latents(k: usize, s: usize, f: usize, like: &Tensor) -> Result<Tensor> {
    let mask: Vec<bool> = (0..f).map(|i| i < k * s && i % s == 0).collect();
    bool_mask(&mask, like)
}

/// Rows `0, s, 2s, …` (`k` of them) of `w`: the centroid rows of the k-means layout.
pub fn centroid_rows(w: &Tensor, k: usize, s: usize) -> Result<Tensor> {
    let idx = Tensor::arange_step(0u32, (k * s) as u32, s as u32, w.device())?;
    w.index_select(&idx, 0)
}

/// Per-cluster row sums of `y [n, d]` and token counts, accumulated in `f64` on the device
/// and brought back: `(Σ_{b ∈ c} y_b` as `[k·d]`, `m_c` as `[k]`).
pub fn cluster_sums(y: &Tensor, assign: &Tensor, k: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (n, d) = y.dims2()?;
    let dev = y.device();
    let sums =
        Tensor::zeros((k, d), DType::F64, dev)?.index_add(assign, &y.to_dtype(DType::F64)?, 0)?;
    let m = Tensor::zeros(k, DType::F64, dev)?.index_add(
        assign,
        &Tensor::ones(n, DType::F64, dev)?,
        0,
    )?;
    Ok((sums.flatten_all()?.to_vec1()?, m.to_vec1()?))
}

/// Second moment `Σ_{b ∈ toks} y_b y_bᵀ` (`[d, d]` row-major, `f64`) of the rows `toks` of
/// `y`: one device GEMM on the gathered rows.
pub fn second_moment(y: &Tensor, toks: &[u32]) -> Result<Vec<f64>> {
    let idx = Tensor::from_slice(toks, toks.len(), y.device())?;
    let yc = y.index_select(&idx, 0)?.to_dtype(DType::F64)?;
    yc.t()?.matmul(&yc)?.flatten_all()?.to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::topk_naive;
    use crate::util::rng::Rng;
    use candle_core::Device;

    fn check(rows: &[Vec<f32>], k: usize) {
        let f = rows[0].len();
        let flat: Vec<f32> = rows.concat();
        let t = Tensor::from_slice(&flat, (rows.len(), f), &Device::Cpu).unwrap();
        let m = topk_mask(&t, k).unwrap().to_vec2::<f32>().unwrap();
        for (r, row) in rows.iter().enumerate() {
            let mut want = vec![0.0f32; f];
            for (i, _) in topk_naive(row, k) {
                want[i as usize] = 1.0;
            }
            assert_eq!(m[r], want, "row {r} k {k}: {row:?}");
        }
    }

    #[test]
    fn bisection_topk_matches_the_sort_with_ties_to_the_lower_index() {
        let mut rng = Rng::new(7);
        let rows: Vec<Vec<f32>> = (0..9)
            .map(|_| (0..300).map(|_| rng.normal() as f32).collect())
            .collect();
        for k in [1, 2, 17, 150, 299, 300] {
            check(&rows, k);
        }
        // ties at the k-th place, constant rows, huge and tiny values
        let ties = vec![
            vec![1.0, 2.0, 2.0, 2.0, 0.0, 2.0, -1.0, 3.0],
            vec![0.0; 8],
            vec![5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 5.0, 4.0],
            vec![1e30, -1e30, 1e-30, -1e-30, 0.0, 2e-30, 1e30, 7.0],
            vec![3e38, -3e38, 1e-44, 3e-45, 0.0, -1e-44, 3e38, 1e-44],
        ];
        for k in 1..8 {
            check(&ties, k);
        }
    }
}
