//! The JSAE pair's Jacobian term on candle tensors (issue #13 items 2–3): the second
//! implementation of [`super::jacobian::penalty_step`], on any [`Device`], with its gradient
//! from candle autograd instead of the hand-written one (so on the CPU device it is the
//! oracle of the kernels, `tests/it/jsae_tensor.rs`).
//!
//! ```text
//! P_p = W^x_dec W_pᵀ [m_x, h]     Qᵀ = W^y_enc W_out [m_y, h]           (per step)
//! M_t = Σ_p P_p[A_x(t)] ⊙ g_{p,t}       [k, h]                         (per token)
//! J_t = r · Qᵀ[A_y(t)] M_tᵀ             [k_y, k_x]
//! L_J = coef · Σ_t Σ |J_t|              (entries outside the active sets masked out)
//! ```
//!
//! The active sets are each row's nonzero codes (ReLU∘TopK: at most `k`), gathered into
//! `[n, k]` index tensors by a row-wise prefix count and a scatter (no sort, no host copy of
//! the codes); rows with fewer than `k` actives are padded with index 0 and masked.
//!
//! Decision: memory is bounded by chunks of tokens, each differentiated on its own: the
//! chunk's `|J|` sum is differentiated by autograd with respect to detached copies of `P_p`
//! and `Qᵀ` ([`Var`]s), the gradients are summed over chunks, and the loss handed to the
//! engine is `value + Σ ⟨dP_p, P_p⟩ + ⟨dQᵀ, Qᵀ⟩ − (the same, detached)`: its value is the
//! penalty and its gradient with respect to `W^x_dec` and `W^y_enc` is the chain rule
//! through the per-step tables, so the whole batch's per-token `k×h` buffers never coexist
//! (at paper scale, 4096 tokens × 64 × 8192 floats would be 8 GiB per buffer).
//! Decision: a prefix count along rows of 16k–65k latents by a two-level blocked scan (a
//! `[B, B]` triangular matmul inside blocks of [`SCAN_BLOCK`], then one across block
//! totals): candle's `cumsum` multiplies by a dense `[f, f]` triangle (16 GiB at f = 65536).

use candle_core::{DType, Device, Result, Tensor, Var};

use crate::models::{MlpAct, MlpKind, MlpWeights};

/// Tokens per differentiated chunk of the Jacobian term.
pub const TOKEN_CHUNK: usize = 256;

/// Block of the row-wise prefix count.
pub const SCAN_BLOCK: usize = 256;

/// The MLP of a pair on a device: `[h, d]` input projections (and biases), `[d, h]` output.
#[derive(Debug, Clone)]
pub struct DeviceMlp {
    kind: MlpKind,
    act: MlpAct,
    w_in: Vec<Tensor>,
    b_in: Vec<Tensor>,
    w_out: Tensor,
    b_out: Tensor,
}

impl DeviceMlp {
    /// Upload `mlp` to `device` (f32).
    pub fn new(mlp: &MlpWeights, device: &Device) -> Result<Self> {
        let (d, h) = (mlp.d, mlp.h);
        let w_in = mlp
            .w_in
            .iter()
            .map(|w| Tensor::from_slice(w, (h, d), device))
            .collect::<Result<Vec<_>>>()?;
        let b_in = mlp
            .b_in
            .iter()
            .map(|b| Tensor::from_slice(b, h, device))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kind: mlp.kind,
            act: mlp.act,
            w_in,
            b_in,
            w_out: Tensor::from_slice(&mlp.w_out, (d, h), device)?,
            b_out: Tensor::from_slice(&mlp.b_out, d, device)?,
        })
    }

    /// The device it lives on.
    pub fn device(&self) -> &Device {
        self.w_out.device()
    }

    /// `x W_pᵀ + b_p`, `[n, h]`.
    fn pre(&self, p: usize, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.w_in[p].t()?)?.broadcast_add(&self.b_in[p])
    }

    /// `φ(z)` as [`MlpAct::value`].
    fn value(&self, z: &Tensor) -> Result<Tensor> {
        match self.act {
            MlpAct::GeluErf => z.gelu_erf(),
            MlpAct::GeluTanh => z.gelu(),
            MlpAct::Silu => z.silu(),
            MlpAct::Relu => z.relu(),
        }
    }

    /// `φ'(z)` as [`MlpAct::deriv`].
    fn deriv(&self, z: &Tensor) -> Result<Tensor> {
        match self.act {
            MlpAct::GeluErf => {
                let cdf = ((z * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5;
                let pdf = ((z.sqr()? * -0.5)?.exp()? * 0.398_942_280_401_432_7)?;
                cdf? + (z * pdf)?
            }
            MlpAct::GeluTanh => {
                let (s, c) = (0.797_884_560_802_865_4f64, 0.044_715f64);
                let z2 = z.sqr()?;
                let t = z.affine(s, 0.0)?.mul(&z2.affine(c, 1.0)?)?.tanh()?;
                let left = t.affine(0.5, 0.5)?;
                let dt = t.sqr()?.affine(-1.0, 1.0)?.mul(&z2.affine(3.0 * c, 1.0)?)?;
                left.add(&z.affine(0.5 * s, 0.0)?.mul(&dt)?)
            }
            MlpAct::Silu => {
                let sg = sigmoid(z)?;
                let one_m = sg.affine(-1.0, 1.0)?;
                sg * ((z * one_m)? + 1.0)?
            }
            MlpAct::Relu => z.gt(0f32)?.to_dtype(DType::F32),
        }
    }

    /// The MLP on every row of raw inputs `x: [n, d]`: `f(x)`, `[n, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.value(&self.pre(0, x)?)?;
        let a = match self.kind {
            MlpKind::Plain => a,
            MlpKind::Gated => (a * self.pre(1, x)?)?,
        };
        a.matmul(&self.w_out.t()?)?.broadcast_add(&self.b_out)
    }

    /// The gains at raw inputs `x: [n, d]` (as [`MlpWeights::gains`]): one `[n, h]` tensor
    /// per input projection (plain: `φ'(a)`; gated: `φ'(a) ⊙ u` and `φ(a)`).
    pub fn gains(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let a = self.pre(0, x)?;
        match self.kind {
            MlpKind::Plain => Ok(vec![self.deriv(&a)?]),
            MlpKind::Gated => {
                let u = self.pre(1, x)?;
                Ok(vec![(self.deriv(&a)? * u)?, self.value(&a)?])
            }
        }
    }
}

/// `σ(z) = 1 / (1 + e^{−z})` with core ops.
fn sigmoid(z: &Tensor) -> Result<Tensor> {
    (z.neg()?.exp()? + 1.0)?.recip()
}

/// Row-wise inclusive prefix sums of a `[n, f]` `f32` tensor by the blocked scan (module
/// docs); exact for 0/1 entries up to `2²⁴` per row.
pub fn row_prefix_count(m: &Tensor) -> Result<Tensor> {
    let (n, f) = m.dims2()?;
    let b = SCAN_BLOCK.min(f.max(1));
    let nb = f.div_ceil(b);
    let padded = m.pad_with_zeros(1, 0, nb * b - f)?;
    let dev = m.device();
    let tri = Tensor::triu2(b, DType::F32, dev)?; // tri[i, j] = 1 for i ≤ j
    let blocks = padded.reshape((n * nb, b))?;
    let within = blocks.matmul(&tri)?.reshape((n, nb, b))?;
    let totals = within.narrow(2, b - 1, 1)?.squeeze(2)?; // [n, nb]
                                                          // exclusive prefix of the block totals: totals · strict upper triangle
    let strict = (Tensor::triu2(nb, DType::F32, dev)? - Tensor::eye(nb, DType::F32, dev)?)?;
    let offsets = totals.matmul(&strict)?; // [n, nb]
    within
        .broadcast_add(&offsets.unsqueeze(2)?)?
        .reshape((n, nb * b))?
        .narrow(1, 0, f)
}

/// The active latents of every row of dense `codes: [n, f]` (nonzero entries, at most `k`
/// per row): `(idx u32 [n, k], valid f32 [n, k])`, in increasing latent order, padded with
/// index 0 and `valid = 0`.
pub fn active_sets(codes: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (n, f) = codes.dims2()?;
    let dev = codes.device();
    let mask = codes.detach().ne(0f32)?.to_dtype(DType::F32)?;
    let count = row_prefix_count(&mask)?;
    // slot of each active entry (0..k−1); inactive entries go to the dump slot k
    let slot = ((&count - 1.0)? * &mask)?.add(&mask.affine(-(k as f64), k as f64)?)?;
    let slot = slot.clamp(0f32, k as f32)?.to_dtype(DType::U32)?;
    let ids = Tensor::arange(0u32, f as u32, dev)?
        .to_dtype(DType::F32)?
        .reshape((1, f))?
        .broadcast_as((n, f))?
        .mul(&mask)?;
    let zeros = Tensor::zeros((n, k + 1), DType::F32, dev)?;
    let idx = zeros.scatter_add(&slot, &ids, 1)?.narrow(1, 0, k)?;
    let valid = zeros.scatter_add(&slot, &mask, 1)?.narrow(1, 0, k)?;
    Ok((idx.to_dtype(DType::U32)?, valid))
}

/// What [`penalty`] returns.
#[derive(Debug)]
pub struct Penalty {
    /// `coef · Σ|J|` (scaled units) with the gradient of the chain rule (module docs).
    pub loss: Tensor,
    /// `Σ |J| / r` (the exported SAEs' units), a device scalar.
    pub sum_abs_export: Tensor,
    /// `#{|J| / r > 0.01}` over the active blocks, a device scalar.
    pub above_0_01: Tensor,
}

/// The Jacobian term of one step (module docs): `w_dec_x: [m_x, d]` and `w_enc_y: [m_y, d]`
/// (autograd variables or tensors of them), dense codes `[n, m]` of both SAEs (detached),
/// the gains at the Jacobian's point, `r = c_y / c_x`, `coef = λ_t·d/(n k²)`.
#[allow(clippy::too_many_arguments)] // two SAEs' weights and codes, data, scale, coefficient
pub fn penalty(
    mlp: &DeviceMlp,
    w_dec_x: &Tensor,
    w_enc_y: &Tensor,
    codes_x: &Tensor,
    codes_y: &Tensor,
    gains: &[Tensor],
    k: usize,
    r: f32,
    coef: f32,
) -> Result<Penalty> {
    let dev = w_dec_x.device();
    let n = codes_x.dim(0)?;
    let h = mlp.w_out.dim(1)?;
    // per-step tables, attached, and detached variables to differentiate the chunks against
    let p: Vec<Tensor> = mlp
        .w_in
        .iter()
        .map(|w| w_dec_x.matmul(&w.t()?))
        .collect::<Result<_>>()?;
    let qt = w_enc_y.matmul(&mlp.w_out)?;
    let pv: Vec<Var> = p
        .iter()
        .map(|t| Var::from_tensor(&t.detach()))
        .collect::<Result<_>>()?;
    let qv = Var::from_tensor(&qt.detach())?;
    let (ix, vx) = active_sets(codes_x, k)?;
    let (iy, vy) = active_sets(codes_y, k)?;
    let mut dp: Vec<Option<Tensor>> = vec![None; p.len()];
    let mut dq: Option<Tensor> = None;
    let zero = Tensor::zeros((), DType::F32, dev)?;
    let (mut sum_abs, mut above) = (zero.clone(), zero.clone());
    let mut lo = 0;
    while lo < n {
        let c = TOKEN_CHUNK.min(n - lo);
        let ixc = ix.narrow(0, lo, c)?.flatten_all()?;
        let iyc = iy.narrow(0, lo, c)?.flatten_all()?;
        let mut m: Option<Tensor> = None;
        for (pp, g) in pv.iter().zip(gains) {
            let rows = pp.as_tensor().index_select(&ixc, 0)?.reshape((c, k, h))?;
            let term = rows.broadcast_mul(&g.narrow(0, lo, c)?.unsqueeze(1)?)?;
            m = Some(match m {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
        let Some(m) = m else {
            candle_core::bail!("the MLP has no input projection")
        };
        let q = qv.as_tensor().index_select(&iyc, 0)?.reshape((c, k, h))?;
        // [c, k_y, k_x]
        let j = (q.matmul(&m.transpose(1, 2)?.contiguous()?)? * r as f64)?;
        let mask = vy
            .narrow(0, lo, c)?
            .unsqueeze(2)?
            .broadcast_mul(&vx.narrow(0, lo, c)?.unsqueeze(1)?)?;
        let abs = (j * &mask)?.abs()?;
        let chunk_sum = abs.sum_all()?;
        let grads = (&chunk_sum * coef as f64)?.backward()?;
        for (acc, v) in dp.iter_mut().zip(&pv) {
            if let Some(g) = grads.get(v.as_tensor()) {
                *acc = Some(match acc.take() {
                    None => g.clone(),
                    Some(a) => (a + g)?,
                });
            }
        }
        if let Some(g) = grads.get(qv.as_tensor()) {
            dq = Some(match dq.take() {
                None => g.clone(),
                Some(a) => (a + g)?,
            });
        }
        let abs = abs.detach();
        sum_abs = (sum_abs + abs.sum_all()?)?;
        let hits = (abs * (1.0 / r as f64))?
            .gt(0.01f32)?
            .to_dtype(DType::F32)?;
        above = (above + (hits * &mask)?.sum_all()?)?;
        lo += c;
    }
    let value = (&sum_abs * coef as f64)?.detach();
    let mut surrogate = zero.clone();
    for (t, g) in p.iter().zip(&dp) {
        if let Some(g) = g {
            surrogate = (surrogate + (t * g.detach())?.sum_all()?)?;
        }
    }
    if let Some(g) = &dq {
        surrogate = (surrogate + (&qt * g.detach())?.sum_all()?)?;
    }
    let loss = ((&surrogate - surrogate.detach())? + value)?;
    Ok(Penalty {
        loss,
        sum_abs_export: (sum_abs * (1.0 / r as f64))?,
        above_0_01: above,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::Rng;

    #[test]
    fn blocked_prefix_count_matches_a_running_sum_across_block_edges() {
        let mut rng = Rng::new(5);
        for f in [1, 7, SCAN_BLOCK, SCAN_BLOCK + 1, 3 * SCAN_BLOCK - 5] {
            let n = 3;
            let v: Vec<f32> = (0..n * f)
                .map(|_| if rng.uniform() < 0.3 { 1.0 } else { 0.0 })
                .collect();
            let t = Tensor::from_slice(&v, (n, f), &Device::Cpu).unwrap();
            let got = row_prefix_count(&t).unwrap().to_vec2::<f32>().unwrap();
            for r in 0..n {
                let mut run = 0.0;
                for c in 0..f {
                    run += v[r * f + c];
                    assert_eq!(got[r][c], run, "f {f} row {r} col {c}");
                }
            }
        }
    }

    #[test]
    fn active_sets_list_the_nonzero_latents_in_order_padded_and_masked() {
        let codes = Tensor::from_slice(
            &[
                0.0f32, 2.0, 0.0, 0.5, 0.0, 1.0, //
                0.0, 0.0, 0.0, 0.0, 0.0, 0.0, //
                3.0, 0.0, 0.0, 0.0, 0.0, -1.0,
            ],
            (3, 6),
            &Device::Cpu,
        )
        .unwrap();
        let (idx, valid) = active_sets(&codes, 3).unwrap();
        assert_eq!(
            idx.to_vec2::<u32>().unwrap(),
            vec![vec![1, 3, 5], vec![0, 0, 0], vec![0, 5, 0]]
        );
        assert_eq!(
            valid.to_vec2::<f32>().unwrap(),
            vec![vec![1.0, 1.0, 1.0], vec![0.0; 3], vec![1.0, 1.0, 0.0]]
        );
    }

    #[test]
    fn device_mlp_forward_and_gains_equal_the_host_mlp() {
        let mut rng = Rng::new(9);
        let (d, h, n) = (6, 10, 5);
        let mut rnd = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal() as f32).collect() };
        for (kind, act) in [
            (MlpKind::Plain, MlpAct::GeluErf),
            (MlpKind::Plain, MlpAct::GeluTanh),
            (MlpKind::Gated, MlpAct::Silu),
        ] {
            let np = if kind == MlpKind::Gated { 2 } else { 1 };
            let mlp = MlpWeights::new(
                kind,
                act,
                d,
                h,
                (0..np).map(|_| rnd(h * d)).collect(),
                (0..np).map(|_| rnd(h)).collect(),
                rnd(d * h),
                rnd(d),
            );
            let x = rnd(n * d);
            let dm = DeviceMlp::new(&mlp, &Device::Cpu).unwrap();
            let xt = Tensor::from_slice(&x, (n, d), &Device::Cpu).unwrap();
            let y = dm.forward(&xt).unwrap().flatten_all().unwrap();
            let g: Vec<f32> = {
                let gs = dm.gains(&xt).unwrap();
                let gs = Tensor::cat(&gs, 1).unwrap();
                gs.flatten_all().unwrap().to_vec1().unwrap()
            };
            let (mut hy, mut hg) = (Vec::new(), Vec::new());
            crate::jsae::jacobian::mlp_outputs(&mlp, &x, n, &mut hy);
            crate::jsae::jacobian::gains_of(&mlp, &x, n, &mut hg);
            for (a, b) in y.to_vec1::<f32>().unwrap().iter().zip(&hy) {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{act:?} y {a} vs {b}"
                );
            }
            for (a, b) in g.iter().zip(&hg) {
                assert!(
                    (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                    "{act:?} g {a} vs {b}"
                );
            }
        }
    }
}
