//! SA-GSAE training loss on candle tensors (the trainer's tensor backend, `crate::sae::tensor`):
//! the same forward as `train.rs`, with the gates as detached masks and the rectangle-kernel
//! threshold terms (L0 penalty, `threshold_ste`) composed as `c ⊙ zero_with_grad(θ)`, so
//! autograd reproduces the hand-written gradients of the parent module's doc.

use candle_core::{DType, Result as CResult, Tensor};

use super::*;
use crate::sae::tensor::{self as t, TensorForward, TensorInput};

/// `f32` 0/1 mask of a `u8` comparison.
fn m(t: Tensor) -> CResult<Tensor> {
    t.to_dtype(DType::F32)
}

impl SaGsae {
    /// [`Self::tensor_step`], with `init_threshold_quantile`'s step-0 calibration: π of the
    /// first ≤ [`c::CHUNK`] tokens on the device (the forward's own GEMM), the per-latent
    /// quantile on the host (`train::log_quantiles`, as the kernels), the forward run with
    /// θ = the calibrated values (a constant plus `zero_with_grad(θ)`, so the gradient still
    /// reaches the parameter) and the values kept for `update_state` to install.
    pub(super) fn tensor_calibrated_step(
        &self,
        p: &[Tensor],
        input: &TensorInput,
    ) -> CResult<TensorForward> {
        let q = match (input.step, self.cfg.init_threshold_quantile) {
            (0, Some(q)) => q,
            _ => return self.tensor_step(p, input),
        };
        let ix = self.ix;
        let rows = input.n.min(c::CHUNK);
        let xt = if self.cfg.pre_encoder_bias {
            input.x.broadcast_sub(&p[ix.b_dec])?
        } else {
            input.x.clone()
        };
        let pre = xt
            .matmul(&p[ix.w_enc].t()?)?
            .broadcast_add(&p[ix.b_gate])?
            .narrow(0, 0, rows)?
            .detach()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let cal = super::train::log_quantiles(&pre, rows, self.f, q);
        let mut p2 = p.to_vec();
        for s in 0..2 {
            let i = ix.t[s];
            let fixed = Tensor::from_slice(&cal, p[i].shape(), p[i].device())?;
            p2[i] = (fixed + t::zero_with_grad(&p[i])?)?;
        }
        *self.calibrated.lock().unwrap_or_else(|e| e.into_inner()) = Some(cal);
        self.tensor_step(&p2, input)
    }

    pub(super) fn tensor_step(&self, p: &[Tensor], input: &TensorInput) -> CResult<TensorForward> {
        let cfg = &self.cfg;
        let ix = self.ix;
        let (x, n) = (input.x, input.n as f64);
        let f = self.f;
        let lb = (cfg.l1_coefficient * input.sparsity_scale) as f64 / n;
        let (eps, half) = (cfg.bandwidth as f64, 0.5 * cfg.bandwidth);
        let unit = cfg.decoder_norm == DecoderNorm::Unit;
        let l0 = cfg.sparsity == SparsityPenalty::L0;
        let raw = cfg.output == OutputSign::Raw;
        let (w_dec, b_dec) = (&p[ix.w_dec], &p[ix.b_dec]);
        // 1. u = x̃ W_encᵀ, π = u + b_gate: [n, d_sae]; θ±, a± = exp(r±): [1, d_sae]
        let xt = if cfg.pre_encoder_bias {
            x.broadcast_sub(b_dec)?
        } else {
            x.clone()
        };
        let u = t::mm(&xt, &p[ix.w_enc].t()?, input.gemm)?;
        let pi = u.broadcast_add(&p[ix.b_gate])?;
        let row = |i: usize| p[i].reshape((1, f));
        let th = [row(ix.t[0])?.exp()?, row(ix.t[1])?.exp()?];
        let a = [row(ix.r[0])?.exp()?, row(ix.r[1])?.exp()?];
        let bm = [row(ix.bm[0])?, row(ix.bm[1])?];
        // 2. the two-sided gate (detached): side 0 if π > θ⁺, else side 1 if −π > θ⁻
        let pid = pi.detach();
        let d0 = pid.broadcast_sub(&th[0].detach())?; // π − θ⁺
        let d1 = pid.broadcast_add(&th[1].detach())?; // π + θ⁻
        let g0 = m(d0.gt(0f32)?)?;
        let g1 = if cfg.negative_side {
            (m(d1.lt(0f32)?)? * g0.affine(-1.0, 1.0)?)?
        } else {
            g0.zeros_like()?
        };
        // 3. magnitudes and the codes: f = g⁺ keep(m⁺) m⁺ + g⁻ keep(m⁻) m⁻
        let mag = [
            u.broadcast_mul(&a[0])?.broadcast_add(&bm[0])?,
            u.broadcast_mul(&a[1])?.broadcast_add(&bm[1])?,
        ];
        let keep = |m_: &Tensor, side: usize| -> CResult<Tensor> {
            let v = m_.detach();
            m(if raw {
                v.ne(0f32)?
            } else if side == 0 {
                v.gt(0f32)?
            } else {
                v.lt(0f32)?
            })
        };
        let on0 = (&g0 * keep(&mag[0], 0)?)?;
        let on1 = (&g1 * keep(&mag[1], 1)?)?;
        let codes = ((&mag[0] * &on0)? + (&mag[1] * &on1)?)?;
        // 4. the STE/L0 band: open entries with |s| < ε/2, closed ones within ε/2 of a side
        let closed = (g0.affine(-1.0, 1.0)? - &g1)?;
        let near0 = m(d0.abs()?.lt(half)?)?;
        let near1 = if cfg.negative_side {
            m(d1.abs()?.lt(half)?)?
        } else {
            near0.zeros_like()?
        };
        let band0 = ((&g0 * &near0)? + (&closed * &near0)?)?;
        let band1 = ((&g1 * &near1)? + (&closed * near0.affine(-1.0, 1.0)?)?.mul(&near1)?)?;
        let st = [t::zero_with_grad(&th[0])?, t::zero_with_grad(&th[1])?];
        let mut feat = codes.clone();
        if cfg.threshold_ste {
            // G·(−J_σ/ε) per band entry, J_σ the (clipped) magnitude at the boundary
            let bg = row(ix.b_gate)?.detach();
            let ub = [
                (th[0].detach() - &bg)?,
                (th[1].detach().neg()? - &bg)?,
            ];
            for s in 0..2 {
                let j = (ub[s].mul(&a[s].detach())? + bm[s].detach())?;
                let j = match (raw, s) {
                    (true, _) => j,
                    (_, 0) => j.relu()?,
                    _ => j.neg()?.relu()?.neg()?,
                };
                let band = if s == 0 { &band0 } else { &band1 };
                let c = band.broadcast_mul(&(j * (-1.0 / eps))?)?;
                feat = (feat + c.broadcast_mul(&st[s])?)?;
            }
        }
        // 5. main reconstruction
        let recon = t::mm(&feat, w_dec, input.gemm)?.broadcast_add(b_dec)?;
        let mse = (t::sse(&recon, x)? / n)?;
        // 6. s = (π − θ⁺) on side 0, (π + θ⁻) on side 1; sparsity; aux reconstruction
        let s_val = ((pi.broadcast_sub(&th[0])? * &g0)? + (pi.broadcast_add(&th[1])? * &g1)?)?;
        let norms = if unit {
            None
        } else {
            Some(w_dec.sqr()?.sum_keepdim(1)?.sqrt()?) // [d_sae, 1]
        };
        let sparsity = if l0 {
            let count = (g0.sum_all()? + g1.sum_all()?)?;
            let ste0 = band0.broadcast_mul(&st[0])?.sum_all()?;
            let ste1 = band1.broadcast_mul(&st[1])?.sum_all()?;
            ((count + ((ste0 + ste1)? * (-1.0 / eps))?)? * lb)?
        } else {
            let abs_s = (&s_val * (&g0 - &g1)?)?;
            match &norms {
                None => (abs_s.sum_all()? * lb)?,
                Some(nr) => (abs_s.matmul(nr)?.sum_all()? * lb)?,
            }
        };
        let (wd_aux, bd_aux) = if unit {
            (w_dec.detach(), b_dec.detach())
        } else {
            (w_dec.clone(), b_dec.clone())
        };
        let aux_recon = s_val.matmul(&wd_aux)?.broadcast_add(&bd_aux)?;
        let aux = (t::sse(&aux_recon, x)? / n)?;
        let revived = p[ix.revived].flatten_all()?.get(0)?.to_scalar::<f32>()? as f64;
        Ok(TensorForward {
            losses: vec![
                ("mse", mse),
                (if l0 { "l0_penalty" } else { "l1" }, sparsity),
                ("aux", aux),
            ],
            metrics: vec![("revived", revived)],
            codes: codes.detach(),
        })
    }
}
