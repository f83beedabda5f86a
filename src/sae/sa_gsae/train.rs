//! SA-GSAE training step: forward with the two-sided gate, the three loss terms and the
//! hand-written backward pass of sae_variants.md §6.4 (formulas in the parent module's doc).

use super::*;

impl SaGsae {
    pub(super) fn train_step(
        &mut self,
        input: &StepInput,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, SaeError> {
        let (d, f, n) = (self.d, self.f, input.n);
        check_width(ARCH, d, input.x, n)?;
        // a tensor step's calibration is not this step's
        *self.calibrated.get_mut().unwrap_or_else(|e| e.into_inner()) = None;
        if let (0, Some(q)) = (input.step, self.cfg.init_threshold_quantile) {
            self.calibrate_thresholds(input.x, n, q);
        }
        let lambda = self.cfg.l1_coefficient * input.sparsity_scale;
        let (eps, half) = (self.cfg.bandwidth, 0.5 * self.cfg.bandwidth);
        let unit = self.cfg.decoder_norm == DecoderNorm::Unit;
        let l0 = self.cfg.sparsity == SparsityPenalty::L0;
        let ste = self.cfg.threshold_ste;
        self.derive();
        let ix = self.ix;
        // 1. u = W_enc x̃; active → codes (f), open gates → aux (s), closed band → aux (±0)
        {
            let (th, a) = (std::mem::take(&mut self.th), std::mem::take(&mut self.a));
            let gate = self.gate(&th, &a, true);
            c::prepare_input(input.x, d, self.pre_sub(), &mut ws.xt);
            c::encode_collect(
                ws,
                n,
                d,
                &self.params[ix.w_enc].data,
                f,
                None,
                |_, row, buf| gate.row(row, buf, true),
            );
            self.th = th;
            self.a = a;
        }
        let codes = std::mem::take(&mut ws.codes);
        let aux = std::mem::take(&mut ws.aux);
        self.main_sides(&codes, &aux);
        let p = &self.params;
        let w_dec = &p[ix.w_dec].data;
        let b_dec = &p[ix.b_dec].data;
        // 2. main reconstruction: g = 2(x̂ − x)/B, G = d_i·g on active (and, STE, aux) entries
        c::decode(
            &mut ws.scratch,
            &codes,
            w_dec,
            d,
            f,
            Some(b_dec),
            &mut ws.recon,
        );
        let sse = c::residual(&ws.recon, input.x, d, 2.0 / n as f32, &mut ws.resid);
        c::dots_and_accumulate(
            &mut ws.scratch,
            &codes,
            w_dec,
            d,
            f,
            &ws.resid,
            &mut ws.gvals,
            &codes.val,
            &mut grads[ix.w_dec],
        );
        if ste {
            c::entry_dots(
                &mut ws.scratch,
                &aux,
                w_dec,
                d,
                f,
                &ws.resid,
                &mut self.band_g,
            );
        }
        // 3. aux reconstruction through the gate: h = 2(x̂_aux − x)/B, A = d_i·h
        c::decode(
            &mut ws.scratch,
            &aux,
            w_dec,
            d,
            f,
            Some(b_dec),
            &mut ws.aux_recon,
        );
        let sse_aux = c::residual(&ws.aux_recon, input.x, d, 2.0 / n as f32, &mut ws.aux_resid);
        c::entry_dots(
            &mut ws.scratch,
            &aux,
            w_dec,
            d,
            f,
            &ws.aux_resid,
            &mut ws.aux_gvals,
        );
        // 4. magnitude path on active entries: ∂u = a_σ G, ∂r_σ = G (m − b_mag_σ), ∂b_mag_σ = G
        c::resize(&mut ws.coef, codes.nnz());
        for e in 0..codes.nnz() {
            let (i, s, g) = (codes.idx[e] as usize, self.side[e] as usize, ws.gvals[e]);
            ws.coef[e] = self.a[s][i] * g;
            let bm = p[ix.bm[s]].data[i];
            grads[ix.r[s]][i] += g * (codes.val[e] - bm);
            grads[ix.bm[s]][i] += g;
        }
        // 5. gate path on aux entries: ∂π (→ u, b_gate) and ∂θ (→ t = ln θ)
        if ste {
            for s in 0..2 {
                let (bg, bm) = (&p[ix.b_gate].data, &p[ix.bm[s]].data);
                self.jump[s].clear();
                self.jump[s].extend((0..f).map(|i| {
                    let u = if s == 0 {
                        self.th[0][i] - bg[i]
                    } else {
                        -self.th[1][i] - bg[i]
                    };
                    let m = self.a[s][i] * u + bm[i];
                    match (self.cfg.output, s) {
                        (OutputSign::Raw, _) => m,
                        (_, 0) => m.max(0.0),
                        _ => m.min(0.0),
                    }
                }));
            }
        }
        let lb = lambda / n as f32;
        let mut n_open = 0usize;
        let mut l1_sum = 0.0f64;
        c::resize(&mut ws.aux_coef, aux.nnz());
        for e in 0..aux.nnz() {
            let (i, sv) = (aux.idx[e] as usize, aux.val[e]);
            let side = aux_side(sv);
            let open = sv != 0.0;
            let sgn = if side == 0 { 1.0 } else { -1.0 };
            let a_val = ws.aux_gvals[e];
            let (mut dpi, mut dth) = (0.0f32, 0.0f32);
            if open {
                n_open += 1;
                if l0 {
                    dpi = a_val;
                } else {
                    dpi = sgn * lb * self.norms[i] + a_val;
                    l1_sum += (self.norms[i] * sv.abs()) as f64;
                }
                dth = -sgn * dpi;
            }
            let in_band = !open || sv.abs() < half;
            if in_band && (l0 || ste) {
                if l0 {
                    dth -= lb / eps;
                }
                if ste {
                    dth -= self.band_g[e] * self.jump[side][i] / eps;
                }
            }
            ws.aux_coef[e] = dpi;
            grads[ix.t[side]][i] += self.th[side][i] * dth;
        }
        // 6. encoder rows, b_gate
        c::accumulate_rows(
            &mut ws.scratch,
            &codes,
            &ws.coef,
            &ws.xt,
            d,
            f,
            &mut grads[ix.w_enc],
        );
        c::accumulate_rows(
            &mut ws.scratch,
            &aux,
            &ws.aux_coef,
            &ws.xt,
            d,
            f,
            &mut grads[ix.w_enc],
        );
        c::scatter_add(&aux, &ws.aux_coef, &mut grads[ix.b_gate]);
        // 7. decoder and b_dec
        c::col_sums(&ws.resid, n, d, &mut grads[ix.b_dec]);
        if !unit {
            // live decoder in the aux term, and the norm-weighted penalty λ/B Σ|s| d_i/‖d_i‖
            c::accumulate_rows(
                &mut ws.scratch,
                &aux,
                &aux.val,
                &ws.aux_resid,
                d,
                f,
                &mut grads[ix.w_dec],
            );
            let mut bsum = vec![0.0f32; d];
            c::col_sums(&ws.aux_resid, n, d, &mut bsum);
            grads[ix.b_dec]
                .iter_mut()
                .zip(&bsum)
                .for_each(|(g, v)| *g += v);
            if !l0 {
                c::resize(&mut ws.lat2, f);
                ws.lat2.fill(0.0);
                for (&i, &sv) in aux.idx.iter().zip(&aux.val) {
                    ws.lat2[i as usize] += sv.abs();
                }
                let gw = &mut grads[ix.w_dec];
                for i in 0..f {
                    let k = ws.lat2[i] * lb / self.norms[i].max(1e-12);
                    if k != 0.0 {
                        c::axpy(k, &w_dec[i * d..(i + 1) * d], &mut gw[i * d..(i + 1) * d]);
                    }
                }
            }
        }
        if self.cfg.pre_encoder_bias {
            c::resize(&mut ws.lat, f);
            ws.lat.fill(0.0);
            c::scatter_add(&codes, &ws.coef, &mut ws.lat);
            c::scatter_add(&aux, &ws.aux_coef, &mut ws.lat);
            ws.lat.iter_mut().for_each(|v| *v = -*v);
            c::add_weighted_rows(
                &mut ws.scratch,
                &ws.lat,
                &p[ix.w_enc].data,
                d,
                &mut grads[ix.b_dec],
            );
        }
        ws.codes = codes;
        ws.aux = aux;
        let mse = sse / n as f64;
        let sparsity = if l0 {
            lambda as f64 * n_open as f64 / n as f64
        } else {
            lambda as f64 * l1_sum / n as f64
        };
        let aux_loss = sse_aux / n as f64;
        Ok(StepOutput {
            loss: mse + sparsity + aux_loss,
            losses: vec![
                ("mse", mse),
                (if l0 { "l0_penalty" } else { "l1" }, sparsity),
                ("aux", aux_loss),
            ],
            metrics: vec![("revived", p[ix.revived].data[0] as f64)],
        })
    }

    /// θ_i ← quantile `q` of |π_i| over the first ≤ [`c::CHUNK`] tokens of `x` (step 0).
    pub(super) fn calibrate_thresholds(&mut self, x: &[f32], n: usize, q: f32) {
        let (d, f) = (self.d, self.f);
        let rows = n.min(c::CHUNK);
        let mut xt = Vec::new();
        c::prepare_input(&x[..rows * d], d, self.pre_sub(), &mut xt);
        let mut pre = vec![0.0; rows * f];
        let p = &self.params;
        c::gemm_xwt(
            &xt,
            rows,
            d,
            &p[self.ix.w_enc].data,
            f,
            Some(&p[self.ix.b_gate].data),
            &mut pre,
        );
        let t = log_quantiles(&pre, rows, f, q);
        for s in 0..2 {
            self.params[self.ix.t[s]].data.copy_from_slice(&t);
        }
    }
}

/// `ln max(quantile q of |π_i|, 1e-6)` per latent `i` of `pre [rows, f]` (the element of rank
/// `⌊q·rows⌋`, as `select_nth`): the calibrated log-thresholds of `init_threshold_quantile`,
/// for the kernels' and the tensor step alike.
pub(super) fn log_quantiles(pre: &[f32], rows: usize, f: usize, q: f32) -> Vec<f32> {
    let k = ((q as f64 * rows as f64) as usize).min(rows - 1);
    let mut col = vec![0.0f32; rows];
    let mut t = vec![0.0f32; f];
    for (i, ti) in t.iter_mut().enumerate() {
        for (b, v) in col.iter_mut().enumerate() {
            *v = pre[b * f + i].abs();
        }
        col.select_nth_unstable_by(k, f32::total_cmp);
        *ti = col[k].max(1e-6).ln();
    }
    t
}
