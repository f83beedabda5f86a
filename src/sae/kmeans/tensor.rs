//! `kmeans` / `kmeans_pca` on candle tensors (the trainer's tensor backend, issue #13): the
//! same step as the kernels in `mod.rs`, with the heavy part on the device.
//!
//! ```text
//! tensor_forward:  x̃ = x − b_dec;  scores = x̃ μᵀ − ½‖μ‖²  (one [n, K] GEMM);  c = argmax
//!                  kmeans:      codes = 1 on c's centroid latent,  x̂ = b_dec + μ_c
//!                  kmeans_pca:  a = (x̃ − sg(μ_c)) W_encᵀ on c's subspace latents,
//!                               x̂ = b_dec + sg(μ_c) + Σ_j a_j d_{c,j}      (autograd → e, d)
//! update_state:    Σ_{b∈c} x̃_b and m_c by a device index-add in f64, brought back;
//!                  the host applies the mini-batch step exactly as the kernels' path does
//! ```
//!
//! The first step seeds the centroids by k-means++ on the host (the same draws as the
//! kernels, from the same `x̃`): the forward uses the seeded rows (as a constant offset on
//! the parameters, so gradients still reach them) and `update_state` installs them.
//! Centroid rows get no gradient (they are `sg(·)` everywhere), as in the kernels.

use candle_core::{Result as CResult, Tensor};

use super::*;
use crate::sae::tensor::{self as t, ClusterStep, TensorForward, TensorInput};

impl KMeans {
    /// Whether the centroids are still unseeded (no token counted yet).
    fn unseeded(&self) -> bool {
        self.params[COUNTS].data.iter().all(|&v| v == 0.0)
    }

    /// The tensor forward (see the module doc).
    pub(super) fn tensor_step(
        &self,
        p: &[Tensor],
        input: &TensorInput,
    ) -> Result<TensorForward, SaeError> {
        let arch = self.arch();
        let n = input.n;
        if self.unseeded() && self.k > n {
            return Err(SaeError::Config {
                arch,
                msg: format!(
                    "{} clusters (d_sae / (1 + rank)) are more than the {n} tokens of the first batch that k-means++ seeds them from; raise train.batch_tokens or lower d_sae",
                    self.k
                ),
            });
        }
        self.forward_on(p, input)
            .map_err(|e| SaeError::tensor(arch, e))
    }

    fn forward_on(&self, p: &[Tensor], input: &TensorInput) -> CResult<TensorForward> {
        let (d, f, s, k, n) = (self.d, self.f, self.stride(), self.k, input.n);
        let x = input.x;
        let xt = x.broadcast_sub(&p[B_DEC])?.detach();
        let (mut w_enc, mut w_dec) = (p[W_ENC].clone(), p[W_DEC].clone());
        if self.unseeded() {
            // seed on the host (the kernels' draws), as a constant offset on the centroid rows
            let xh = xt.flatten_all()?.to_vec1::<f32>()?;
            let mut delta = vec![0.0f32; f * d];
            for (cl, pick) in kmeans_pp(&xh, n, d, k, self.seed).into_iter().enumerate() {
                let lat = cl * s;
                let mu = &xh[pick * d..(pick + 1) * d];
                for ((o, m), w) in delta[lat * d..(lat + 1) * d]
                    .iter_mut()
                    .zip(mu)
                    .zip(&self.params[W_DEC].data[lat * d..(lat + 1) * d])
                {
                    *o = m - w;
                }
            }
            let delta = Tensor::from_vec(delta, (f, d), x.device())?;
            w_enc = (&w_enc + &delta)?;
            w_dec = (&w_dec + &delta)?;
        }
        // 1. assignment: nearest centroid
        let mu = t::centroid_rows(&w_dec, k, s)?.detach(); // [k, d]
        let bias = (mu.sqr()?.sum_keepdim(1)? * -0.5)?.reshape((1, k))?;
        let scores = xt.matmul(&mu.t()?)?.broadcast_add(&bias)?;
        let assign = t::row_argmax(&scores)?;
        let mu_tok = mu.index_select(&assign, 0)?; // [n, d]
        let mask = t::cluster_mask(&assign, k, s, f)?;
        // 2. codes and reconstruction
        let (codes, recon) = if self.rank == 0 {
            (mask, mu_tok.broadcast_add(&p[B_DEC])?)
        } else {
            let cen = t::centroid_latents(k, s, f, x)?;
            let sub = mask.broadcast_mul(&cen.affine(-1.0, 1.0)?)?;
            let a = ((&xt - &mu_tok)?.matmul(&w_enc.t()?)? * &sub)?; // subspace coordinates
            let codes = (mask.broadcast_mul(&cen)? + a.detach())?;
            let recon = (a.matmul(&w_dec)? + mu_tok)?.broadcast_add(&p[B_DEC])?;
            (codes, recon)
        };
        let mse = (t::sse(&recon, x)? / n as f64)?;
        self.slot.put(ClusterStep {
            step: input.step,
            n,
            xt,
            assign,
        });
        Ok(TensorForward {
            losses: vec![("mse", mse)],
            metrics: vec![],
            codes: codes.detach(),
        })
    }

    /// The mini-batch step from the tensor forward's device results: seed (first step),
    /// then the per-cluster sums by a device index-add. A device failure here falls back to
    /// the host sums from the step's codes (the engine's `update_state` cannot fail).
    pub(super) fn tensor_update_state(&mut self, st: ClusterStep, input: &StepInput, ws: &Workspace) {
        let d = self.d;
        if self.unseeded() {
            let mut xt = Vec::new();
            c::prepare_input(input.x, d, Some(&self.params[B_DEC].data), &mut xt);
            self.seed_centroids(&xt, input.n);
        }
        match t::cluster_sums(&st.xt, &st.assign, self.k) {
            Ok((sums, m)) => self.apply_centroid_step(&sums, &m),
            Err(e) => {
                tracing::warn!(
                    "{}: device cluster sums failed ({e}); this step's centroid update uses host sums",
                    self.arch()
                );
                let s = self.stride() as u32;
                let assign: Vec<u32> = (0..ws.codes.n())
                    .map(|b| ws.codes.row(b).0.first().map_or(0, |&i| i / s))
                    .collect();
                let mut xt = Vec::new();
                c::prepare_input(input.x, d, Some(&self.params[B_DEC].data), &mut xt);
                if assign.len() == input.n {
                    self.update_centroids(&xt, &assign);
                }
            }
        }
    }
}

/// The `kmeans` format's encode ([`super::encode_loaded`]) on tensors: the argmax over the
/// centroid latents of the pre-activations (with `assignment = "residual"`, of
/// `p_c / s_c + ½ Σ_j p_{c,j}²`), `code_value` on the cluster's centroid latent and the
/// linear codes on its subspace latents.
pub(super) fn encode_loaded(
    sd: &crate::sae::export_tensor::DeviceSae,
    xt: &Tensor,
) -> CResult<Tensor> {
    let num = |k: &str| sd.extra(k).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    let (s, k) = (1 + num("rank"), num("n_clusters"));
    let f = sd.dims().1;
    let residual = sd.extra("assignment").is_some_and(|v| v == "residual");
    let cv = sd.per("code_value")?;
    let pre = sd.pre(xt, Some("b_enc"))?;
    let n = pre.dims2()?.0;
    let p3 = pre.narrow(1, 0, k * s)?.reshape((n, k, s))?;
    let mut score = p3.narrow(2, 0, 1)?.squeeze(2)?;
    if residual {
        // 1/s_c = code_value / ‖W_enc row‖ on centroid latents (0 for an empty row)
        let cvc = t::centroid_rows(&cv.t()?.contiguous()?, k, s)?.t()?; // [1, k]
        let nw = t::centroid_rows(&sd.w_enc_t.t()?.contiguous()?, k, s)?
            .sqr()?
            .sum_keepdim(1)?
            .sqrt()?
            .t()?; // [1, k]
        let pos = nw.gt(0f32)?;
        let inv = pos.where_cond(&(&cvc / &nw.maximum(1e-30f32)?)?, &nw.zeros_like()?)?;
        score = (score.broadcast_mul(&inv)? + (p3.narrow(2, 1, s - 1)?.sqr()?.sum(2)? * 0.5)?)?;
    }
    let assign = t::row_argmax(&score)?;
    let mask = t::cluster_mask(&assign, k, s, f)?;
    let cen = t::centroid_latents(k, s, f, xt)?;
    let vals = pre
        .broadcast_mul(&cen.affine(-1.0, 1.0)?)?
        .broadcast_add(&cen.broadcast_mul(cv)?)?;
    vals.broadcast_mul(&mask)
}
