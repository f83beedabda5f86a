//! The building block shared by the TopK family (TopK, BatchTopK and the JSAE pair's TopK
//! SAEs): the four parameters `W_enc`, `b_enc`, `W_dec`, `b_dec` behind named accessors
//! ([`TopKParams`]), the AuxK selection and the backward pass once the codes are chosen.
//!
//! The parameter order (`W_enc`, `b_enc`, `W_dec`, `b_dec`, then any variant extras such as
//! BatchTopK's `threshold`) is private to this file; other files use the accessors, and
//! gradients (same order as the parameters) through [`TopKParams::grad_w_enc`] and friends.

use candle_core::{Result as CResult, Tensor};

use super::tensor::{self as t, TensorForward, TensorInput};
use super::{ExportParts, Fold, Param};
use crate::kernels::{self as c, Workspace};
use crate::util::rng::Rng;

const W_ENC: usize = 0;
const B_ENC: usize = 1;
const W_DEC: usize = 2;
const B_DEC: usize = 3;
/// Index of the first parameter a variant appends with [`TopKParams::push`].
const EXTRA: usize = 4;

/// The TopK-family parameters: `W_enc [d_sae, d_in]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`
/// (unit rows), `b_dec [d_in]`, then the variant's extras.
#[derive(Debug, Clone)]
pub struct TopKParams(Vec<Param>);

impl TopKParams {
    /// Standard init: `W_enc = W_decᵀ` (tied), random unit decoder rows, zero biases.
    pub fn new(d: usize, f: usize, rng: &mut Rng) -> Self {
        let w_dec = c::random_rows(rng, f, d, 1.0);
        let mut dec = Param::new("W_dec", vec![f, d], w_dec.clone());
        dec.unit_rows = true;
        Self(vec![
            Param::new("W_enc", vec![f, d], w_dec),
            Param::new("b_enc", vec![f], vec![0.0; f]),
            dec,
            Param::new("b_dec", vec![d], vec![0.0; d]),
        ])
    }

    /// Append a variant parameter; returns its index among the extras (0 for the first).
    pub fn push(&mut self, p: Param) -> usize {
        self.0.push(p);
        self.0.len() - 1 - EXTRA
    }

    /// All parameters, in [`super::Sae::params`] order.
    pub fn all(&self) -> &[Param] {
        &self.0
    }
    /// All parameters, mutable.
    pub fn all_mut(&mut self) -> &mut [Param] {
        &mut self.0
    }
    /// Encoder rows `[d_sae, d_in]`.
    pub fn w_enc(&self) -> &[f32] {
        &self.0[W_ENC].data
    }
    /// Encoder bias `[d_sae]`.
    pub fn b_enc(&self) -> &[f32] {
        &self.0[B_ENC].data
    }
    /// Decoder rows `[d_sae, d_in]`.
    pub fn w_dec(&self) -> &[f32] {
        &self.0[W_DEC].data
    }
    /// Decoder bias `[d_in]`.
    pub fn b_dec(&self) -> &[f32] {
        &self.0[B_DEC].data
    }
    /// Decoder bias, mutable.
    pub fn b_dec_mut(&mut self) -> &mut [f32] {
        &mut self.0[B_DEC].data
    }
    /// Extra parameter `i` (in [`TopKParams::push`] order).
    pub fn extra(&self, i: usize) -> &[f32] {
        &self.0[EXTRA + i].data
    }
    /// Extra parameter `i`, mutable.
    pub fn extra_mut(&mut self, i: usize) -> &mut [f32] {
        &mut self.0[EXTRA + i].data
    }

    /// The `W_enc` gradient in a gradient list laid out like the parameters.
    pub fn grad_w_enc(grads: &mut [Vec<f32>]) -> &mut Vec<f32> {
        &mut grads[W_ENC]
    }
    /// The `W_dec` gradient in a gradient list laid out like the parameters.
    pub fn grad_w_dec(grads: &mut [Vec<f32>]) -> &mut Vec<f32> {
        &mut grads[W_DEC]
    }

    /// PAM-SGD: `b_enc += W_enc (b_new − b_old)` first, so that `π = W_enc(x − b_dec) + b_enc`
    /// is unchanged by the new `b_dec`; then unit rows with the norms moved into the encoder
    /// ([`c::install_unit_decoder`]).
    pub fn install_decoder(&mut self, w_dec: &[f32], b_dec: &[f32], d: usize) {
        let delta: Vec<f32> = b_dec
            .iter()
            .zip(&self.0[B_DEC].data)
            .map(|(n, o)| n - o)
            .collect();
        let (enc, rest) = self.0.split_at_mut(B_ENC);
        let (be, rest) = rest.split_at_mut(1);
        for (b, row) in be[0].data.iter_mut().zip(enc[W_ENC].data.chunks(d)) {
            *b += c::dot(row, &delta);
        }
        let (wd, bd) = rest.split_at_mut(1);
        c::install_unit_decoder(
            w_dec,
            &mut wd[0].data,
            &mut enc[W_ENC].data,
            &mut be[0].data,
            d,
        );
        bd[0].data.copy_from_slice(b_dec);
    }

    /// Export parts shared by the TopK family.
    pub fn export(&self, architecture: &'static str) -> ExportParts {
        ExportParts {
            architecture,
            w_enc: self.w_enc().to_vec(),
            w_dec: self.w_dec().to_vec(),
            b_dec: self.b_dec().to_vec(),
            per_latent: vec![("b_enc", self.b_enc().to_vec(), Fold::ByDecoderNorm)],
            apply_b_dec_to_input: true,
            extra_cfg: vec![],
        }
    }

    /// Backward pass once `ws.codes` (main, values `z > 0`) and `ws.aux` (AuxK selection)
    /// are filled and `ws.xt = x − b_dec`. Returns `(mse, auxk)`.
    pub fn backward(
        &self,
        (d, f): (usize, usize),
        (x, n): (&[f32], usize),
        alpha: f32,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> (f64, f64) {
        let params = &self.0;
        let w_dec = &params[W_DEC].data;
        // 1. main reconstruction and g = 2(x̂ − x)/B
        c::decode(
            &mut ws.scratch,
            &ws.codes,
            w_dec,
            d,
            f,
            Some(&params[B_DEC].data),
            &mut ws.recon,
        );
        let sse = c::residual(&ws.recon, x, d, 2.0 / n as f32, &mut ws.resid);
        c::col_sums(&ws.resid, n, d, &mut grads[B_DEC]);
        // 2. δ_{b,i} = d_i·g_b on the selected latents (ReLU'd-out ones are not stored), and
        //    in the same pass over g the decoder gradient Σ_b z_{b,i}·g_b
        c::dots_and_accumulate(
            &mut ws.scratch,
            &ws.codes,
            w_dec,
            d,
            f,
            &ws.resid,
            &mut ws.gvals,
            &ws.codes.val,
            &mut grads[W_DEC],
        );
        let mut auxk = 0.0;
        if ws.aux.nnz() > 0 {
            // 3. AuxK: ê over dead latents; h = α·2(ê − e)/V with e = x − x̂, V = ‖e − ē‖²
            //    V = Σ‖e‖² − ‖Σe‖²/B, and Σe = −(B/2)·Σg.
            let half_n = n as f64 / 2.0;
            let sum_g_sq: f64 = grads[B_DEC].iter().map(|&v| (v as f64) * (v as f64)).sum();
            let var = (sse - half_n * half_n * sum_g_sq / n as f64).max(1e-12);
            c::decode(
                &mut ws.scratch,
                &ws.aux,
                w_dec,
                d,
                f,
                None,
                &mut ws.aux_recon,
            );
            // aux_recon ← ê + x̂, so that (aux_recon − x) = ê − e
            for (a, r) in ws.aux_recon.iter_mut().zip(&ws.recon) {
                *a += r;
            }
            let sse_aux = c::residual(
                &ws.aux_recon,
                x,
                d,
                (2.0 * alpha as f64 / var) as f32,
                &mut ws.aux_resid,
            );
            auxk = alpha as f64 * sse_aux / var;
            c::dots_and_accumulate(
                &mut ws.scratch,
                &ws.aux,
                w_dec,
                d,
                f,
                &ws.aux_resid,
                &mut ws.aux_gvals,
                &ws.aux.val,
                &mut grads[W_DEC],
            );
        }
        // 4. gradients: W_enc, b_enc from δ (main + aux); W_dec's (z·g + z_aux·h) are done
        let (ge, rest) = grads.split_at_mut(B_ENC);
        let gb = &mut rest[..1];
        c::accumulate_rows(
            &mut ws.scratch,
            &ws.codes,
            &ws.gvals,
            &ws.xt,
            d,
            f,
            &mut ge[W_ENC],
        );
        c::scatter_add(&ws.codes, &ws.gvals, &mut gb[0]);
        if ws.aux.nnz() > 0 {
            c::accumulate_rows(
                &mut ws.scratch,
                &ws.aux,
                &ws.aux_gvals,
                &ws.xt,
                d,
                f,
                &mut ge[W_ENC],
            );
            c::scatter_add(&ws.aux, &ws.aux_gvals, &mut gb[0]);
        }
        // 5. b_dec through x̃ = x − b_dec: −Σ_i (Σ_b δ_{b,i}) w_i
        c::resize(&mut ws.lat, f);
        for (l, s) in ws.lat.iter_mut().zip(&gb[0]) {
            *l = -s;
        }
        c::add_weighted_rows(
            &mut ws.scratch,
            &ws.lat,
            &params[W_ENC].data,
            d,
            &mut grads[B_DEC],
        );
        (sse / n as f64, auxk)
    }
}

/// The tensor forward of the TopK family (`super::tensor`), the same steps as
/// [`TopKParams::backward`] after the kernels' encode: `params` in [`TopKParams`] order,
/// `select(scores)` the variant's detached 0/1 selection mask, AuxK over `input.dead` with
/// `k_aux = min(aux_k or d_in/2, #dead)` and coefficient `alpha` (0 = off). `signed`:
/// scores are `|π|` and every nonzero selected `π` is kept (AbsTopK); else scores are `π`
/// and only positive ones are kept (`ReLU` after the selection).
pub(crate) fn tensor_forward(
    params: &[Tensor],
    input: &TensorInput,
    select: impl Fn(&Tensor) -> CResult<Tensor>,
    signed: bool,
    (aux_k, alpha): (Option<usize>, f32),
) -> CResult<TensorForward> {
    let (w_enc, b_enc, w_dec, b_dec) = (
        &params[W_ENC],
        &params[B_ENC],
        &params[W_DEC],
        &params[B_DEC],
    );
    let x = input.x;
    let (_, d) = x.dims2()?;
    // 1. π = (x − b_dec) W_encᵀ + b_enc: [n, d_sae]; z = π on the selected positive entries
    let pre = t::mm(&x.broadcast_sub(b_dec)?, &w_enc.t()?, input.gemm)?.broadcast_add(b_enc)?;
    let (scores, keep) = if signed {
        let p = pre.detach();
        (p.abs()?, p.ne(0f32)?.to_dtype(candle_core::DType::F32)?)
    } else {
        (pre.detach(), t::positive(&pre)?)
    };
    let mask = (select(&scores)? * &keep)?;
    let z = (&pre * &mask)?;
    // 2. x̂ = z W_dec + b_dec: [n, d]; SumD-MeanB
    let recon = t::mm(&z, w_dec, input.gemm)?.broadcast_add(b_dec)?;
    let mse = (t::sse(&recon, x)? / input.n as f64)?;
    let mut losses = vec![("mse", mse)];
    // 3. AuxK over the dead latents
    let n_dead = input.dead.iter().filter(|&&b| b).count();
    let k_aux = if aux_k == Some(0) || input.dead.len() != mask.dim(1)? {
        0
    } else {
        aux_k.unwrap_or(d / 2).max(1).min(n_dead)
    };
    let auxk = t::auxk(
        &pre,
        (&scores, &keep),
        x,
        &recon,
        w_dec,
        input.dead,
        k_aux,
        alpha,
    )?;
    losses.push((
        "auxk",
        match auxk {
            Some(a) => a,
            None => Tensor::zeros((), candle_core::DType::F32, x.device())?,
        },
    ));
    Ok(TensorForward {
        losses,
        metrics: vec![],
        codes: z.detach(),
    })
}

/// Push the AuxK selection of one token: top-`k_aux` of `π` over `dead`, positive values only.
pub(crate) fn push_aux(row: &[f32], dead: &[u32], k_aux: usize, buf: &mut c::TaskBuf) {
    if k_aux == 0 {
        return;
    }
    buf.scratch2.clear();
    buf.scratch2.extend(dead.iter().map(|&i| row[i as usize]));
    let s = buf.aux.len();
    c::topk_select(&buf.scratch2, k_aux, &mut buf.scratch, &mut buf.aux);
    let mut w = s;
    for r in s..buf.aux.len() {
        let (j, v) = buf.aux[r];
        if v > 0.0 {
            buf.aux[w] = (dead[j as usize], v);
            w += 1;
        }
    }
    buf.aux.truncate(w);
}

/// Dead latents as a list (into the reused `out`), empty when AuxK is off.
pub(crate) fn dead_list(
    dead: &[bool],
    f: usize,
    aux_k: Option<usize>,
    alpha: f32,
    out: &mut Vec<u32>,
) {
    out.clear();
    if alpha == 0.0 || dead.len() != f || aux_k == Some(0) {
        return;
    }
    out.extend((0..f as u32).filter(|&i| dead[i as usize]));
}
