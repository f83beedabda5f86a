//! AbsTopK SAE: the K largest |pre-activations| per token, kept with their signs
//! (`jsae_pamsgd.md` §2.1–2.2: the activation of the SplInterp authors' code; also
//! arXiv 2510.00404), with AuxK for dead latents as in TopK (sae_variants.md §3.3).
//!
//! ```text
//! π = W_enc (x − b_dec) + b_enc
//! S = indices of the k largest |π_i|;  z_i = π_i for i ∈ S, else 0     (signed, L0 = k)
//! x̂ = Σ_{i∈S} z_i d_i + b_dec
//! L = (1/B) Σ_b ‖x_b − x̂_b‖²  +  α · ‖e − ê‖² / ‖e − ē‖²
//!     e = sg(x − x̂),  ê = Σ_{i ∈ top-k_aux of |π| over dead latents} π_i d_i   (no b_dec)
//! ```
//! Unit-norm decoder rows; exact gradients (∂z_i/∂π_i = 1 on S, whatever the sign), so the
//! TopK family's backward pass ([`TopKParams::backward`]) applies unchanged.
//!
//! Power-diagram view (§2.1): S is the cell of the K-th-order power diagram of the 2m sites
//! `(±w_i, ±b_i)`: ranking `|π_i|` is ranking the 2m values `±π_i`, and a site and its
//! antipode are never both among the K best while K ≤ m.
//!
//! Decision: SAELens has no AbsTopK architecture (its `topk` applies a ReLU after the
//! selection), so the file is written under our own architecture name `abs_topk`
//! (`W_enc`, `b_enc`, `W_dec`, `b_dec`, cfg key `k`, `apply_b_dec_to_input = true`),
//! which saepipe loads back (the format below) and SAELens does not.
//! Decision: an exactly zero π among the k largest |π| is dropped from the codes (a code
//! of 0 is no activation), so L0 = k except on such ties.
//! Decision: PAM-SGD is supported as for TopK (the authors train AbsTopK with it):
//! the solved decoder is installed with unit rows and the norms moved into the encoder.

use serde::{Deserialize, Serialize};

use super::export::{Folded, Format};
use super::registry::divide_k;
use super::tensor::{self, TensorForward, TensorInput};
use super::topk_family::{self, dead_list, TopKParams};
use super::{
    check_width, ArchConfig, ArchSpec, ExportParts, Param, Sae, SaeError, StepInput, StepOutput,
    Variant,
};
use crate::kernels::{self as c, TaskBuf, Workspace};
use candle_core::Tensor;
use crate::util::rng::Rng;

/// Variant name (also the exported `architecture`).
pub const ARCH: &str = "abs_topk";

/// AbsTopK hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Active latents per token (L0 = k). Default 32.
    pub k: usize,
    /// AuxK latents per token; `None` = d_in/2. Default None.
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

/// The registration (see [`super::registry`]).
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
    formats: &[Format {
        architecture: ARCH,
        per_latent: &["b_enc"],
        read_cfg,
        encode: encode_loaded,
        tensor_encode: tensor_encode_loaded,
    }],
};

impl ArchSpec for Config {
    fn kind(&self) -> &'static str {
        ARCH
    }
    fn build(&self, d: usize, f: usize, rng: &mut Rng) -> Result<Box<dyn Sae>, SaeError> {
        Ok(Box::new(AbsTopK::new(self.clone(), d, f, rng)?))
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
    fn supports_pam_sgd(&self) -> bool {
        true
    }
    fn supports_tensor(&self) -> bool {
        true
    }
}

/// `cfg.json` of the `abs_topk` format: an integer `k` in `1..=d_sae`.
fn read_cfg(
    cfg: &serde_json::Value,
    f: usize,
) -> Result<Vec<(String, serde_json::Value)>, String> {
    if !cfg["k"].as_u64().is_some_and(|k| k >= 1 && k as usize <= f) {
        return Err("abs_topk needs an integer `k` in 1..=d_sae".into());
    }
    Ok(Vec::new())
}

/// Encode of an exported `abs_topk` file: [`select_abs`] on `x W_enc + b_enc`.
fn encode_loaded(t: &Folded, n: usize, ws: &mut Workspace) {
    let k = t.k.unwrap_or(1);
    c::encode_collect(
        ws,
        n,
        t.d_in,
        &t.w_enc,
        t.d_sae,
        Some(t.per("b_enc")),
        |_, row, buf| select_abs(row, k, buf),
    );
}

/// [`encode_loaded`] on tensors ([`crate::sae::export_tensor`]).
fn tensor_encode_loaded(
    s: &crate::sae::export_tensor::DeviceSae,
    xt: &candle_core::Tensor,
) -> candle_core::Result<candle_core::Tensor> {
    let pre = s.pre(xt, Some("b_enc"))?;
    let sel = crate::sae::tensor::topk_mask(&pre.abs()?, s.k())?;
    pre * sel
}


/// The AbsTopK activation of one token, appended to `buf.main`: the `k` largest `|π_i|`
/// (ties: lower index first) with their signed values `π_i`, exact zeros dropped.
/// Uses `buf.scratch2` (|π|) and `buf.scratch`.
pub fn select_abs(row: &[f32], k: usize, buf: &mut TaskBuf) {
    buf.scratch2.clear();
    buf.scratch2.extend(row.iter().map(|v| v.abs()));
    let s = buf.main.len();
    c::topk_select(&buf.scratch2, k, &mut buf.scratch, &mut buf.main);
    let mut w = s;
    for r in s..buf.main.len() {
        let i = buf.main[r].0;
        let v = row[i as usize];
        if v != 0.0 {
            buf.main[w] = (i, v);
            w += 1;
        }
    }
    buf.main.truncate(w);
}

/// The AuxK selection of one token, appended to `buf.aux`: top-`k_aux` of `|π|` over
/// `dead`, signed values, exact zeros dropped.
fn push_aux_abs(row: &[f32], dead: &[u32], k_aux: usize, buf: &mut TaskBuf) {
    if k_aux == 0 {
        return;
    }
    buf.scratch2.clear();
    buf.scratch2
        .extend(dead.iter().map(|&i| row[i as usize].abs()));
    let s = buf.aux.len();
    c::topk_select(&buf.scratch2, k_aux, &mut buf.scratch, &mut buf.aux);
    let mut w = s;
    for r in s..buf.aux.len() {
        let i = dead[buf.aux[r].0 as usize];
        let v = row[i as usize];
        if v != 0.0 {
            buf.aux[w] = (i, v);
            w += 1;
        }
    }
    buf.aux.truncate(w);
}

/// The AbsTopK SAE.
pub struct AbsTopK {
    cfg: Config,
    d: usize,
    f: usize,
    params: TopKParams,
}

impl AbsTopK {
    /// Initialise as TopK (§3.4): random unit decoder rows, `W_enc = W_decᵀ`, zero biases.
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
            params: TopKParams::new(d, f, rng),
            cfg,
            d,
            f,
        })
    }
}

impl Sae for AbsTopK {
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
        let k = self.cfg.k;
        c::prepare_input(x, self.d, Some(p.b_dec()), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            self.d,
            p.w_enc(),
            self.f,
            Some(p.b_enc()),
            |_, row, buf| select_abs(row, k, buf),
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
        // 1. x̃ = x − b_dec; π = W_enc x̃ + b_enc chunk by chunk; AbsTopK and AuxK selection
        c::prepare_input(input.x, d, Some(p.b_dec()), &mut ws.xt);
        c::encode_collect(
            ws,
            n,
            d,
            p.w_enc(),
            f,
            Some(p.b_enc()),
            |_, row, buf| {
                select_abs(row, k, buf);
                push_aux_abs(row, &dead, k_aux, buf);
            },
        );
        // 2. decode, losses and gradients: z = π on the selection, so ∂z/∂π = 1 there
        ws.dead = dead;
        let (mse, auxk) = p.backward((d, f), (input.x, n), alpha, grads, ws);
        Ok(StepOutput {
            loss: mse + auxk,
            losses: vec![("mse", mse), ("auxk", auxk)],
            metrics: vec![],
        })
    }

    /// Top-k of `|π|` per row by bisection, signed values kept, then the family's steps.
    fn tensor_forward(
        &self,
        params: &[Tensor],
        input: &TensorInput,
    ) -> Result<TensorForward, SaeError> {
        let k = self.cfg.k;
        topk_family::tensor_forward(
            params,
            input,
            |scores| tensor::topk_mask(scores, k),
            true,
            (self.cfg.aux_k, self.cfg.aux_coefficient),
        )
        .map_err(|e| SaeError::tensor(ARCH, e))
    }

    /// PAM-SGD: see [`TopKParams::install_decoder`].
    fn install_decoder(&mut self, w_dec: &[f32], b_dec: &[f32]) -> Result<(), SaeError> {
        self.params.install_decoder(w_dec, b_dec, self.d);
        Ok(())
    }

    fn export_parts(&self) -> ExportParts {
        let mut e = self.params.export(ARCH);
        e.extra_cfg = vec![("k", serde_json::json!(self.cfg.k))];
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random weights (not the tied init) so that pre-activations of both signs occur.
    fn random_sae(d: usize, f: usize, k: usize, seed: u64) -> AbsTopK {
        let mut rng = Rng::new(seed);
        let mut sae = AbsTopK::new(
            Config {
                k,
                ..Config::default()
            },
            d,
            f,
            &mut rng,
        )
        .unwrap();
        for p in sae.params_mut() {
            if p.name != "W_dec" {
                for v in &mut p.data {
                    *v = 0.5 * rng.normal() as f32;
                }
            }
        }
        sae
    }

    #[test]
    fn codes_keep_their_signs_and_exactly_k_are_nonzero() {
        let (d, f, k, n) = (12, 40, 5, 64);
        let sae = random_sae(d, f, k, 3);
        let mut rng = Rng::new(9);
        let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let mut ws = Workspace::default();
        sae.encode(&x, n, &mut ws).unwrap();
        let p = &sae.params;
        let (mut neg, mut pos) = (0, 0);
        for b in 0..n {
            // π by hand, in f64
            let pre: Vec<f64> = (0..f)
                .map(|i| {
                    p.b_enc()[i] as f64
                        + (0..d)
                            .map(|j| {
                                p.w_enc()[i * d + j] as f64
                                    * (x[b * d + j] - p.b_dec()[j]) as f64
                            })
                            .sum::<f64>()
                })
                .collect();
            let mut order: Vec<usize> = (0..f).collect();
            order.sort_by(|&a, &c| pre[c].abs().total_cmp(&pre[a].abs()));
            let want: std::collections::BTreeSet<u32> =
                order[..k].iter().map(|&i| i as u32).collect();
            let (ix, vs) = ws.codes.row(b);
            assert_eq!(ix.len(), k, "token {b}: exactly k codes");
            assert!(vs.iter().all(|&v| v != 0.0));
            let got: std::collections::BTreeSet<u32> = ix.iter().copied().collect();
            assert_eq!(got, want, "token {b}: the k largest |π|");
            for (&i, &v) in ix.iter().zip(vs) {
                let e = pre[i as usize];
                assert!(
                    (v as f64 - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "token {b} latent {i}: code {v} vs π {e}"
                );
                neg += (v < 0.0) as usize;
                pos += (v > 0.0) as usize;
            }
        }
        assert!(neg > n && pos > n, "both signs kept: {neg} negative, {pos} positive");
    }

    #[test]
    fn export_round_trip_encodes_the_same_codes() {
        let (d, f, k, n) = (8, 24, 3, 20);
        let sae = random_sae(d, f, k, 5);
        let dir = tempfile::tempdir().unwrap();
        let scale = 2.5;
        crate::sae::export::save_saelens(&sae, scale, &Default::default(), dir.path()).unwrap();
        let loaded = crate::sae::export::LoadedSae::load(dir.path()).unwrap();
        assert_eq!(loaded.t.architecture, "abs_topk");
        let mut rng = Rng::new(1);
        let raw: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
        let scaled: Vec<f32> = raw.iter().map(|v| v * scale).collect();
        let (mut a, mut b) = (Workspace::default(), Workspace::default());
        sae.encode(&scaled, n, &mut a).unwrap();
        loaded.encode(&raw, n, &mut b);
        assert_eq!(a.codes.indptr, b.codes.indptr);
        assert_eq!(a.codes.idx, b.codes.idx);
        // unit decoder rows divided by the input scale: folded codes are `code / scale`
        for (u, v) in a.codes.val.iter().zip(&b.codes.val) {
            let u = u / scale;
            assert!((u - v).abs() <= 1e-4 * u.abs().max(1.0), "{u} vs {v}");
            assert_eq!(u.signum(), v.signum());
        }
    }
}
