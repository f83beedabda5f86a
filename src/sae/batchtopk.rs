//! BatchTopK SAE (Bussmann, Leask & Nanda 2024), sae_variants.md §3.5.
//!
//! ```text
//! training:  A = ReLU(W_enc (x − b_dec) + b_enc);  keep the B·k largest entries of A over
//!            the whole batch, zero the rest;  x̂ = Σ f_i d_i + b_dec;  loss and AuxK as TopK
//! inference: f_i = π_i · 1[π_i > θ]   (a JumpReLU with one global threshold θ)
//!            θ ← 0.99 θ + 0.01 m_t,  m_t = smallest kept activation of batch t (f64)
//! ```
//! Exported as SAELens `jumprelu` with `threshold = θ·1`.
//!
//! Decision: the batch selection runs over per-token candidate lists of the
//! `candidates_per_token` (default 4k) largest activations instead of the full `B × d_sae`
//! matrix, so memory stays at one encoder chunk. It is exact unless some token would keep
//! more than that many latents; such steps are counted in the `batchtopk_capped` term.
//! Decision: θ starts at the first batch's `m_t` (dictionary_learning), then the SAELens EMA;
//! it is updated in [`Sae::update_state`] from the kept codes (`m_t = min ws.codes.val`).

use serde::{Deserialize, Serialize};

use super::registry::divide_k;
use super::topk_family::{self, dead_list, push_aux, TopKParams};
use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Fold, Param, Sae, SaeError, StepInput,
    StepOutput, Variant,
};
use super::tensor::{self, TensorForward, TensorInput};
use crate::kernels::{self as c, Workspace};
use candle_core::{DType, Tensor};
use crate::util::rng::Rng;

/// Variant name.
pub const ARCH: &str = "batchtopk";

/// BatchTopK hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Mean active latents per token over a batch (B·k kept). Default 32.
    pub k: usize,
    /// AuxK latents per token; `None` = d_in/2. Default None.
    pub aux_k: Option<usize>,
    /// AuxK loss coefficient α. Default 1/32.
    pub aux_coefficient: f32,
    /// Candidates kept per token before the batch-wide selection; `None` = 4k. Default None.
    pub candidates_per_token: Option<usize>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            k: 32,
            aux_k: None,
            aux_coefficient: 1.0 / 32.0,
            candidates_per_token: None,
        }
    }
}

/// The registration (see [`super::registry`]); files load as SAELens `jumprelu`, the
/// format registered by [`super::jumprelu`].
pub static VARIANT: Variant = Variant {
    kind: ARCH,
    parse: Variant::parse::<Config>,
    example: || {
        Config {
            k: 4,
            ..Config::default()
        }
        .into()
    },
    formats: &[],
};

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        Ok(Box::new(BatchTopK::new(self.clone(), d, f, rng)?))
    }
    fn with_sparsity(&self, factor: f32) -> ArchConfig {
        Config {
            k: divide_k(self.k, factor),
            ..self.clone()
        }
        .into()
    }
    fn sparsity_param(&self) -> (&'static str, f64) {
        ("k", self.k as f64)
    }
    fn recommended_adam(&self, d_sae: usize, steps: u64) -> (f32, f32, f32) {
        super::topk::recommended_adam(d_sae, steps)
    }
    fn supports_tensor(&self) -> bool {
        true
    }
    fn problems(&self, d_sae: Option<usize>) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        crate::sae::registry::check_k(&mut out, "k", self.k, d_sae);
        crate::sae::registry::check_nonneg(&mut out, "aux_coefficient", self.aux_coefficient);
        if let Some(c) = self.candidates_per_token.filter(|&c| c < self.k) {
            out.push((
                "candidates_per_token",
                format!("{c} is less than k = {}; it must be >= k (or left unset: 4k)", self.k),
            ));
        }
        out
    }
}

/// The BatchTopK SAE.
pub struct BatchTopK {
    cfg: Config,
    d: usize,
    f: usize,
    params: TopKParams,
    /// Index of `threshold` among the extra parameters.
    threshold: usize,
    sel: Vec<f32>,
}

impl BatchTopK {
    /// Initialise as TopK, with θ = 0 (unset).
    pub fn new(cfg: Config, d: usize, f: usize, rng: &mut Rng) -> Result<Self, SaeError> {
        if cfg.k == 0 || cfg.k > f {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: format!("k = {} must be between 1 and d_sae = {f}", cfg.k),
            });
        }
        if cfg.candidates_per_token.is_some_and(|c| c < cfg.k) {
            return Err(SaeError::Config {
                arch: ARCH,
                msg: "candidates_per_token must be >= k".into(),
            });
        }
        let mut params = TopKParams::new(d, f, rng);
        let mut th = Param::new("threshold", vec![1], vec![0.0]);
        th.trainable = false;
        let threshold = params.push(th);
        Ok(Self {
            cfg,
            d,
            f,
            params,
            threshold,
            sel: Vec::new(),
        })
    }

    /// The current inference threshold θ.
    pub fn threshold(&self) -> f32 {
        self.params.extra(self.threshold)[0]
    }

    /// One step of the threshold EMA from the step's smallest kept activation (none kept:
    /// `∞`, no change).
    fn threshold_ema(&mut self, min_kept: f32) {
        if min_kept.is_finite() {
            let th = &mut self.params.extra_mut(self.threshold)[0];
            *th = if *th == 0.0 {
                min_kept
            } else {
                (0.99 * *th as f64 + 0.01 * min_kept as f64) as f32
            };
        }
    }
}

impl Sae for BatchTopK {
    fn arch(&self) -> &'static str {
        ARCH
    }
    fn config(&self) -> ArchConfig {
        self.cfg.clone().into()
    }
    fn dims(&self) -> (usize, usize) {
        (self.d, self.f)
    }
    fn params(&self) -> &[Param] {
        self.params.all()
    }
    fn params_mut(&mut self) -> &mut [Param] {
        self.params.all_mut()
    }

    fn encode(&self, x: &[f32], n: usize, ws: &mut Workspace) -> Result<(), SaeError> {
        check_width(ARCH, self.d, x, n)?;
        let p = &self.params;
        let th = self.threshold().max(0.0);
        c::prepare_input(x, self.d, Some(p.b_dec()), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            self.d,
            p.w_enc(),
            self.f,
            Some(p.b_enc()),
            |_, row, buf| {
                buf.main.extend(
                    row.iter()
                        .enumerate()
                        .filter(|(_, &v)| v > th)
                        .map(|(i, &v)| (i as u32, v)),
                );
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
        let (k, alpha) = (self.cfg.k, self.cfg.aux_coefficient);
        let cap = self.cfg.candidates_per_token.unwrap_or(4 * k).min(f);
        let mut dead = std::mem::take(&mut ws.dead);
        dead_list(input.dead, f, self.cfg.aux_k, alpha, &mut dead);
        let k_aux = self.cfg.aux_k.unwrap_or(d / 2).max(1).min(dead.len());
        let p = &self.params;
        // 1. candidates: per token the `cap` largest positive activations, plus AuxK
        c::prepare_input(input.x, d, Some(p.b_dec()), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            d,
            p.w_enc(),
            f,
            Some(p.b_enc()),
            |_, row, buf| {
                c::topk_positive(row, cap, &mut buf.scratch, &mut buf.main);
                push_aux(row, &dead, k_aux, buf);
            },
        );
        ws.dead = dead;
        // 2. batch-wide selection of the B·k largest candidates (ties: token, then latent order)
        let keep = n * k;
        let codes = &mut ws.codes;
        let mut capped = 0.0;
        if codes.nnz() > keep {
            self.sel.clear();
            self.sel.extend_from_slice(&codes.val);
            let (_, tau, _) = self
                .sel
                .select_nth_unstable_by(keep - 1, |a, b| b.total_cmp(a));
            let tau = *tau;
            let mut ties = keep - codes.val.iter().filter(|&&v| v > tau).count();
            let mut w = 0;
            let mut start = 0;
            for b in 0..n {
                let end = codes.indptr[b + 1];
                let mut kept_here = 0;
                for e in start..end {
                    let v = codes.val[e];
                    let take = v > tau
                        || (v == tau && ties > 0 && {
                            ties -= 1;
                            true
                        });
                    if take {
                        codes.idx[w] = codes.idx[e];
                        codes.val[w] = v;
                        w += 1;
                        kept_here += 1;
                    }
                }
                if kept_here == cap && cap < f {
                    capped = 1.0;
                }
                start = end;
                codes.indptr[b + 1] = w;
            }
            codes.idx.truncate(w);
            codes.val.truncate(w);
        }
        // 3. decode, losses, gradients as TopK
        let (mse, auxk) = self
            .params
            .backward((d, f), (input.x, n), alpha, grads, ws);
        Ok(StepOutput {
            loss: mse + auxk,
            losses: vec![("mse", mse), ("auxk", auxk)],
            metrics: vec![("batchtopk_capped", capped)],
        })
    }

    /// Threshold EMA (inference mode), in f64, from `m_t` = the smallest kept activation
    /// (the batch selection's `τ` when it cut, every candidate's minimum otherwise).
    fn update_state(&mut self, _input: &StepInput, ws: &Workspace) {
        let min_kept = ws.codes.val.iter().copied().fold(f32::INFINITY, f32::min);
        self.threshold_ema(min_kept);
    }

    fn tensor_state_resident(&self) -> bool {
        true
    }

    /// The same EMA from the device codes: their smallest nonzero value is one scalar.
    fn tensor_update_state(&mut self, codes: &Tensor) -> Result<(), SaeError> {
        let min_kept = (|| {
            let inf = Tensor::full(f32::INFINITY, codes.shape(), codes.device())?;
            codes
                .ne(0f32)?
                .where_cond(codes, &inf)?
                .min_all()?
                .to_scalar::<f32>()
        })()
        .map_err(|e| SaeError::tensor(ARCH, e))?;
        self.threshold_ema(min_kept);
        Ok(())
    }

    /// Per-token candidates (top `candidates_per_token` positive π, by bisection), then the
    /// `B·k` largest candidates of the batch (bisection over the flattened batch; ties to
    /// the earlier token, then the lower latent, where the kernels' order within a token is
    /// their selection order), then the family's steps.
    fn tensor_forward(
        &self,
        params: &[Tensor],
        input: &TensorInput,
    ) -> Result<TensorForward, SaeError> {
        let f = self.f;
        let (k, n) = (self.cfg.k, input.n);
        let cap = self.cfg.candidates_per_token.unwrap_or(4 * k).min(f);
        let select = |pre: &Tensor| -> candle_core::Result<Tensor> {
            let cand = (tensor::topk_mask(pre, cap)? * tensor::positive(pre)?)?;
            let keep = n * k;
            if cand.sum_all()?.to_scalar::<f32>()? <= keep as f32 {
                return Ok(cand);
            }
            // non-candidates below every candidate
            let m = pre.min_all()?.to_scalar::<f32>()?;
            let fill = Tensor::full(m - m.abs().max(1.0), pre.shape(), pre.device())?;
            let scores = cand.ne(0f32)?.where_cond(pre, &fill)?.reshape((1, n * f))?;
            tensor::topk_mask(&scores, keep)?.reshape((n, f))? * cand
        };
        let run = || -> candle_core::Result<TensorForward> {
            let mut out = topk_family::tensor_forward(
                params,
                input,
                select,
                false,
                (self.cfg.aux_k, self.cfg.aux_coefficient),
            )?;
            // a token that kept all its candidates (and could have kept more)
            let kept = out.codes.ne(0f32)?.to_dtype(DType::F32)?.sum_keepdim(1)?;
            let full = kept.eq(cap as f32)?.to_dtype(DType::F32)?.max_all()?;
            let capped = if cap < f { full.to_scalar::<f32>()? as f64 } else { 0.0 };
            out.metrics.push(("batchtopk_capped", capped));
            Ok(out)
        };
        run().map_err(|e| SaeError::tensor(ARCH, e))
    }

    fn export_parts(&self) -> ExportParts {
        let mut e = self.params.export("jumprelu");
        e.per_latent.push((
            "threshold",
            vec![self.threshold().max(0.0); self.f],
            Fold::ByDecoderNorm,
        ));
        e
    }
}
