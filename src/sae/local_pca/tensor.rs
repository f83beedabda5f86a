//! `local_pca` / `kflats` on candle tensors (the trainer's tensor backend, issue #13): the
//! encode and the accumulators' sums on the device, the eigendecompositions on the host.
//!
//! ```text
//! tensor_forward:  x̃ = x − b_dec;  p = x̃ Wᵀ + bias  (one [n, d_sae] GEMM; bias −½‖μ_c‖² on
//!                  centroid latents, −⟨u_{c,j}, μ_c⟩ on subspace latents, as `encode_xt`)
//!                  score_c = p_{c,0} (+ ½ Σ_j p_{c,j}², kflats);  c = argmax;
//!                  codes = 1 on c's centroid latent, p_{c,j} on its subspace latents;
//!                  x̂ = codes W + b_dec
//! update_state:    segment 0: Σ_{b∈c} x̃_b, m_c (device index-add, f64) → mini-batch step;
//!                  later: y = x̃ − μ_c, Σ y (index-add) and Σ y yᵀ (one f64 GEMM per
//!                  cluster on its gathered rows) → the f64 accumulators; at a segment's
//!                  end the host refit (nalgebra) as in the kernels' path
//! ```
//!
//! Nothing here is trainable (all parameters are state), so the backend differentiates
//! nothing. Cost: the second moments come back as `K·d²` f64 per step (the host keeps the
//! checkpointed double-float accumulators), which bounds a step at about `K·d²·8` bytes of
//! device-to-host traffic (190 MB at K = 144, d = 576).

use candle_core::{DType, Result as CResult, Tensor};

use super::*;
use crate::sae::tensor::{self as t, ClusterStep, TensorForward, TensorInput};

impl Flats {
    /// The tensor forward (see the module doc).
    pub(super) fn tensor_step(&self, p: &[Tensor], input: &TensorInput) -> CResult<TensorForward> {
        let (d, f, s, k, n) = (self.d, self.f, self.stride(), self.k, input.n);
        let x = input.x;
        let xt = x.broadcast_sub(&p[B_DEC])?.detach();
        let mut w = p[W_DEC].detach();
        if self.params[SEEDED].data[0] == 0.0 {
            // not seeded by init_from_sample: the kernels' k-means++ draws on this batch
            let xh = xt.flatten_all()?.to_vec1::<f32>()?;
            if k > n {
                candle_core::bail!(
                    "{k} regions (d_sae / (1 + rank)) are more than the {n} tokens k-means++ seeds them from; raise train.init_tokens or lower d_sae"
                );
            }
            let mut wh = self.params[W_DEC].data.clone();
            for (cl, pick) in super::super::kmeans::kmeans_pp(&xh, n, d, k, self.seed)
                .into_iter()
                .enumerate()
            {
                let lat = cl * s;
                wh[lat * d..(lat + 1) * d].copy_from_slice(&xh[pick * d..(pick + 1) * d]);
            }
            w = Tensor::from_vec(wh, (f, d), x.device())?;
        }
        // 1. bias per latent: [-½‖μ‖², −⟨u_j, μ⟩ …] per cluster, 0 past k·s
        let w3 = w.narrow(0, 0, k * s)?.reshape((k, s, d))?;
        let mu = w3.narrow(1, 0, 1)?; // [k, 1, d]
        let dots = w3.broadcast_mul(&mu)?.sum(2)?; // [k, s]
        let mut sc = vec![-1.0f32; s];
        sc[0] = -0.5;
        let sc = Tensor::from_vec(sc, (1, s), x.device())?;
        let bias = dots
            .broadcast_mul(&sc)?
            .reshape((1, k * s))?
            .pad_with_zeros(1, 0, f - k * s)?;
        let pre = xt.matmul(&w.t()?)?.broadcast_add(&bias)?; // [n, f]
        // 2. assignment: nearest centroid, or smallest residual to the flat (kflats)
        let p3 = pre.narrow(1, 0, k * s)?.reshape((n, k, s))?;
        let mut score = p3.narrow(2, 0, 1)?.squeeze(2)?;
        if self.residual() {
            score = (score + (p3.narrow(2, 1, s - 1)?.sqr()?.sum(2)? * 0.5)?)?;
        }
        let assign = t::row_argmax(&score)?;
        // 3. codes and reconstruction
        let mask = t::cluster_mask(&assign, k, s, f)?;
        let cen = t::centroid_latents(k, s, f, x)?;
        let vals = pre.broadcast_mul(&cen.affine(-1.0, 1.0)?)?.broadcast_add(&cen)?;
        let codes = (mask * vals)?;
        let recon = codes.matmul(&w)?.broadcast_add(&p[B_DEC])?;
        let mse = (t::sse(&recon, x)? / n as f64)?;
        self.slot.put(ClusterStep {
            step: input.step,
            n,
            xt,
            assign,
        });
        let (seg, _) = self.segment(input.step);
        Ok(TensorForward {
            losses: vec![("mse", mse)],
            metrics: vec![("fit_pass", seg as f64)],
            codes,
        })
    }

    /// The state update of `update_state` from the tensor forward's device results. A
    /// device failure falls back to the host sums (the engine's `update_state` cannot fail).
    pub(super) fn tensor_update_state(
        &mut self,
        st: ClusterStep,
        input: &StepInput,
        ws: &Workspace,
    ) {
        let d = self.d;
        if self.params[SEEDED].data[0] == 0.0 {
            let mut xt = Vec::new();
            c::prepare_input(input.x, d, Some(&self.params[B_DEC].data), &mut xt);
            if self.seed_centroids(&xt, input.n).is_err() {
                return;
            }
        }
        let (seg, last) = self.segment(input.step);
        if let Err(e) = self.device_update(&st, seg) {
            tracing::warn!(
                "{}: device accumulation failed ({e}); this step's update uses host sums",
                self.arch
            );
            let mut host = Workspace::default();
            c::prepare_input(input.x, d, Some(&self.params[B_DEC].data), &mut host.xt);
            if ws.codes.n() != input.n {
                return;
            }
            let groups = self.groups(ws);
            if seg == 0 {
                self.update_centroids(&host.xt, &groups);
                return;
            }
            self.accumulate(&host.xt, &groups);
        }
        if seg > 0 && last {
            self.refit(seg >= 2);
        }
    }

    /// Segment 0: device cluster sums → mini-batch step; later: device moments → accumulators.
    fn device_update(&mut self, st: &ClusterStep, seg: u64) -> CResult<()> {
        let (d, s, k) = (self.d, self.stride(), self.k);
        if seg == 0 {
            let (sums, m) = t::cluster_sums(&st.xt, &st.assign, k)?;
            self.apply_centroid_step(&sums, &m);
            return Ok(());
        }
        let w = Tensor::from_slice(&self.params[W_DEC].data, (self.f, d), st.xt.device())?;
        let mu = t::centroid_rows(&w, k, s)?;
        // y in f64 from the f32 values, as the kernels' accumulation
        let y = (st.xt.to_dtype(DType::F64)? - mu.index_select(&st.assign, 0)?.to_dtype(DType::F64)?)?;
        let (s1, m) = t::cluster_sums(&y, &st.assign, k)?;
        let assign: Vec<u32> = st.assign.to_vec1()?;
        let mut groups = vec![Vec::new(); k];
        for (b, &cl) in assign.iter().enumerate() {
            groups[cl as usize].push(b as u32);
        }
        // every device result first, so that a failure leaves the accumulators untouched
        let mut s2 = Vec::with_capacity(k);
        for toks in &groups {
            s2.push(if toks.is_empty() {
                Vec::new()
            } else {
                t::second_moment(&y, toks)?
            });
        }
        for (cl, m2) in s2.iter().enumerate() {
            if m[cl] > 0.0 {
                self.add_moments(cl, m[cl], &s1[cl * d..(cl + 1) * d], m2);
            }
        }
        Ok(())
    }
}
