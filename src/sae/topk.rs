//! TopK SAE with the AuxK dead-latent loss (Gao et al. 2024), sae_variants.md §3.1–3.4.
//!
//! ```text
//! π = W_enc (x − b_dec) + b_enc
//! S = indices of the k largest π;  z_i = ReLU(π_i) for i ∈ S, else 0    (L0 ≤ k)
//! x̂ = Σ_{i∈S} z_i d_i + b_dec
//! L = (1/B) Σ_b ‖x_b − x̂_b‖²  +  α · ‖e − ê‖² / ‖e − ē‖²
//!     e = sg(x − x̂),  ê = Σ_{i ∈ top-k_aux of π over dead latents} ReLU(π_i) d_i   (no b_dec)
//! ```
//! Unit-norm decoder rows (§1.3 A). Exact gradients (no STE).
//!
//! Decision: SumD-MeanB main loss (not OpenAI's FVU) so λ-free variants and L1 variants share
//! one convention; AuxK in OpenAI's form (§3.3 default): no bias, normalised by the batch
//! variance of `e`, α = 1/32, k_aux = min(d_in/2, #dead).
//! Decision: ReLU after selection (released OpenAI code and SAELens 6.x agree).

use serde::{Deserialize, Serialize};

use super::{
    check_width, ArchConfig, ExportParts, Fold, Param, Sae, SaeError, StepInput, StepOutput,
};
use crate::kernels::{self as c, Workspace};
use crate::util::rng::Rng;

/// Variant name.
pub const ARCH: &str = "topk";

/// TopK hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Active latents per token (L0 ≤ k). Default 32.
    pub k: usize,
    /// AuxK latents per token; `None` = d_in/2 (dictionary_learning, EleutherAI). Default None.
    pub aux_k: Option<usize>,
    /// AuxK loss coefficient α. Default 1/32 (0 disables AuxK).
    pub aux_coefficient: f32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            k: 32,
            aux_k: None,
            aux_coefficient: 1.0 / 32.0,
        }
    }
}

pub(crate) const W_ENC: usize = 0;
pub(crate) const B_ENC: usize = 1;
pub(crate) const W_DEC: usize = 2;
pub(crate) const B_DEC: usize = 3;

/// Standard TopK-family parameters: `W_enc = W_decᵀ` (tied init), unit decoder rows.
pub(crate) fn topk_params(d: usize, f: usize, rng: &mut Rng) -> Vec<Param> {
    let w_dec = c::random_rows(rng, f, d, 1.0);
    let mut dec = Param::new("W_dec", vec![f, d], w_dec.clone());
    dec.unit_rows = true;
    vec![
        Param::new("W_enc", vec![f, d], w_dec),
        Param::new("b_enc", vec![f], vec![0.0; f]),
        dec,
        Param::new("b_dec", vec![d], vec![0.0; d]),
    ]
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

/// Backward pass shared by TopK and BatchTopK once `ws.codes` (main, values `z > 0`) and
/// `ws.aux` (AuxK selection) are filled and `ws.xt = x − b_dec`. Returns `(mse, auxk)`.
#[allow(clippy::too_many_arguments)] // one call site per TopK-family variant; a struct would only rename them
pub(crate) fn topk_backward(
    params: &[Param],
    d: usize,
    f: usize,
    x: &[f32],
    n: usize,
    alpha: f32,
    grads: &mut [Vec<f32>],
    ws: &mut Workspace,
) -> (f64, f64) {
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
    // 2. δ_{b,i} = d_i·g_b on the selected latents (ReLU'd-out ones are not stored)
    c::entry_dots(
        &mut ws.scratch,
        &ws.codes,
        w_dec,
        d,
        f,
        &ws.resid,
        &mut ws.gvals,
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
        c::entry_dots(
            &mut ws.scratch,
            &ws.aux,
            w_dec,
            d,
            f,
            &ws.aux_resid,
            &mut ws.aux_gvals,
        );
    }
    // 4. gradients: W_enc, b_enc from δ (main + aux), W_dec from f·g (+ z_aux·h)
    let (ge, rest) = grads.split_at_mut(B_ENC);
    let (gb, rest) = rest.split_at_mut(1);
    let gd = &mut rest[0];
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
    c::accumulate_rows(
        &mut ws.scratch,
        &ws.codes,
        &ws.codes.val,
        &ws.resid,
        d,
        f,
        gd,
    );
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
        c::accumulate_rows(
            &mut ws.scratch,
            &ws.aux,
            &ws.aux.val,
            &ws.aux_resid,
            d,
            f,
            gd,
        );
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

/// Export parts shared by the TopK family.
pub(crate) fn topk_export(params: &[Param], architecture: &'static str) -> ExportParts {
    ExportParts {
        architecture,
        w_enc: params[W_ENC].data.clone(),
        w_dec: params[W_DEC].data.clone(),
        b_dec: params[B_DEC].data.clone(),
        per_latent: vec![("b_enc", params[B_ENC].data.clone(), Fold::ByDecoderNorm)],
        apply_b_dec_to_input: true,
        extra_cfg: vec![],
    }
}

/// The TopK SAE.
pub struct TopK {
    cfg: Config,
    d: usize,
    f: usize,
    params: Vec<Param>,
}

impl TopK {
    /// Initialise (§3.4): random unit decoder rows, `W_enc = W_decᵀ`, zero biases.
    pub fn new(cfg: Config, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        if cfg.k == 0 || cfg.k > f {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!("k = {} must be between 1 and d_sae = {f}", cfg.k),
            });
        }
        if cfg.aux_coefficient.is_nan() || cfg.aux_coefficient < 0.0 {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!("aux_coefficient = {} must be >= 0", cfg.aux_coefficient),
            });
        }
        Ok(Self {
            params: topk_params(d, f, rng),
            cfg,
            d,
            f,
        })
    }
}

impl Sae for TopK {
    fn arch(&self) -> &'static str {
        ARCH
    }
    fn config(&self) -> ArchConfig {
        ArchConfig::TopK(self.cfg.clone())
    }
    fn dims(&self) -> (usize, usize) {
        (self.d, self.f)
    }
    fn params(&self) -> &[Param] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param] {
        &mut self.params
    }

    fn encode(&self, x: &[f32], n: usize, ws: &mut Workspace) -> Result<(), SaeError> {
        check_width(ARCH, self.d, x, n)?;
        let p = &self.params;
        let k = self.cfg.k;
        c::prepare_input(x, self.d, Some(&p[B_DEC].data), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            self.d,
            &p[W_ENC].data,
            self.f,
            Some(&p[B_ENC].data),
            |_, row, buf| {
                c::topk_positive(row, k, &mut buf.scratch, &mut buf.main);
            },
        );
        Ok(())
    }

    fn forward_backward(
        &mut self,
        input: &StepInput,
        grads: &mut [Vec<f32>],
        ws: &mut Workspace,
    ) -> Result<StepOutput, SaeError> {
        let (d, f, n) = (self.d, self.f, input.n);
        check_width(ARCH, d, input.x, n)?;
        let p = &self.params;
        let (k, alpha) = (self.cfg.k, self.cfg.aux_coefficient);
        let mut dead = std::mem::take(&mut ws.dead);
        dead_list(input.dead, f, self.cfg.aux_k, alpha, &mut dead);
        let k_aux = self.cfg.aux_k.unwrap_or(d / 2).max(1).min(dead.len());
        // 1. x̃ = x − b_dec; π = W_enc x̃ + b_enc chunk by chunk; top-k and AuxK selection
        c::prepare_input(input.x, d, Some(&p[B_DEC].data), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            d,
            &p[W_ENC].data,
            f,
            Some(&p[B_ENC].data),
            |_, row, buf| {
                c::topk_positive(row, k, &mut buf.scratch, &mut buf.main);
                push_aux(row, &dead, k_aux, buf);
            },
        );
        // 2. decode, losses and gradients
        ws.dead = dead;
        let (mse, auxk) = topk_backward(p, d, f, input.x, n, alpha, grads, ws);
        Ok(StepOutput {
            loss: mse + auxk,
            terms: vec![("mse", mse), ("auxk", auxk)],
        })
    }

    /// PAM-SGD: `b_enc += W_enc (b_new − b_old)` first, so that `π = W_enc(x − b_dec) + b_enc`
    /// is unchanged by the new `b_dec`; then unit rows with the norms moved into the encoder
    /// ([`c::install_unit_decoder`]).
    fn install_decoder(&mut self, w_dec: &[f32], b_dec: &[f32]) -> Result<(), SaeError> {
        let d = self.d;
        let delta: Vec<f32> = b_dec
            .iter()
            .zip(&self.params[B_DEC].data)
            .map(|(n, o)| n - o)
            .collect();
        let (enc, rest) = self.params.split_at_mut(B_ENC);
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
        Ok(())
    }

    fn export_parts(&self) -> ExportParts {
        let mut e = topk_export(&self.params, "topk");
        e.extra_cfg = vec![
            ("k", serde_json::json!(self.cfg.k)),
            ("rescale_acts_by_decoder_norm", serde_json::json!(false)),
        ];
        e
    }
}
