//! SAELens v6 on-disk format (ecosystem.md §4.1): `cfg.json` + `sae_weights.safetensors`,
//! written atomically, and a loader that runs the exported SAE ([`LoadedSae`]).
//!
//! This file is format I/O only. What each `architecture` reads and how it encodes is a
//! [`Format`] registered by the variant file that owns it (`standard` in `relu_l1`, `topk`,
//! `jumprelu` (also BatchTopK's format), `gated`, `kmeans`, `bi_jumprelu` and `sa_gsae` in
//! `sa_gsae/export.rs`); [`LoadedSae`] finds it through the registry.
//!
//! Export folds, in order (sae_variants.md §1.1, §1.3 B):
//! 1. the input scale `c`: `W_enc ← c·W_enc`, `W_dec ← W_dec/c`, `b_dec ← b_dec/c`
//!    (pre-activations unchanged), so the file runs on raw activations and
//!    `normalize_activations = "none"`;
//! 2. the decoder row norms `n_i`: `w_i ← n_i w_i`, per-latent pre-activation tensors
//!    (`b_enc`, `threshold`, `b_gate`, `b_mag`) `← n_i·v`, `d_i ← d_i/n_i`, so decoder rows
//!    are unit-norm (SAEBench) and codes are in "norm-weighted" units.
//!
//! Tensors: `W_enc [d_in, d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`, plus `b_enc`
//! (standard/topk/jumprelu), `threshold` (jumprelu, BatchTopK), `b_gate`, `b_mag`, `r_mag`
//! (gated; no `b_enc`). Extra `cfg.json` key `metadata.saepipe_arch` names our variant
//! (SAELens drops unknown keys).
//!
//! Two architectures are our own (SA-GSAE, sae_variants.md §6.3; SAELens cannot load them):
//! - `bi_jumprelu`: `W_enc`, `b_enc`, `threshold_pos` (τ⁺ ≥ 0 when sign-consistent),
//!   `threshold_neg` (τ⁻), `apply_b_dec_to_input = false`;
//!   `m = x W_enc + b_enc`, `f = m·(1[m > τ⁺] + 1[m < τ⁻])`, `x̂ = f W_dec + b_dec`.
//! - `sa_gsae` (untied magnitudes): the gate form with `b_gate`, `threshold_pos`,
//!   `threshold_neg`, `r_mag_pos`, `r_mag_neg`, `b_mag_pos`, `b_mag_neg` and the cfg key
//!   `sign_consistent`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};

use super::{registry, Fold, Sae};
use crate::kernels::{self as c, Codes, Workspace};
use crate::util::fs as fsutil;

/// SAELens config file name.
pub const CFG_FILE: &str = "cfg.json";
/// SAELens weights file name.
pub const WEIGHTS_FILE: &str = "sae_weights.safetensors";
/// The SAELens version our files claim to follow.
pub const SAE_LENS_VERSION: &str = "6.0.0";

/// Errors reading or writing SAELens files.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Filesystem error.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not what we expect.
    #[error("{path}: {msg}")]
    Format {
        /// File.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
}

fn fmt_err(path: &Path, msg: impl Into<String>) -> ExportError {
    ExportError::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Where the SAE came from; goes into `cfg.json` `metadata`. Every field is what the run
/// did (the pipeline fills it from the training activations' own metadata), never a
/// default: SAELens users re-create the training distribution from it.
#[derive(Debug, Clone, Default)]
pub struct ExportMeta {
    /// Model name (e.g. `pythia-1b`).
    pub model_name: String,
    /// Hookpoint (`blocks.6.hook_resid_post`).
    pub hook_name: String,
    /// Tokens per training sequence (0 if unknown).
    pub context_size: usize,
    /// Dataset the activations came from.
    pub dataset_path: String,
    /// Whether every window started with BOS (SAELens `prepend_bos`).
    pub prepend_bos: bool,
    /// Whether special-token positions were left out of the training activations (SAELens
    /// `exclude_special_tokens`); the ids are `saepipe_excluded_token_ids`.
    pub exclude_special_tokens: bool,
    /// The token ids whose positions were not captured.
    pub excluded_token_ids: Vec<u32>,
    /// Token between concatenated documents (SAELens `sequence_separator_token`: `"bos"`,
    /// `"eos"`, or `None` for none).
    pub sequence_separator_token: Option<String>,
    /// One document per window instead of concatenation (SAELens
    /// `disable_concat_sequences`).
    pub disable_concat_sequences: bool,
    /// Extra `saepipe_*` metadata keys (model revision, activation dtype, …), written as given.
    pub extra: Vec<(String, serde_json::Value)>,
}

/// Folded export tensors, ready to write.
#[derive(Debug, Clone)]
pub struct Folded {
    /// SAELens architecture.
    pub architecture: String,
    /// `d_in`.
    pub d_in: usize,
    /// `d_sae`.
    pub d_sae: usize,
    /// Encoder rows `[d_sae, d_in]` (written transposed).
    pub w_enc: Vec<f32>,
    /// Decoder rows `[d_sae, d_in]`, unit norm.
    pub w_dec: Vec<f32>,
    /// `[d_in]`.
    pub b_dec: Vec<f32>,
    /// Per-latent tensors by SAELens name.
    pub per_latent: Vec<(String, Vec<f32>)>,
    /// SAELens `apply_b_dec_to_input`.
    pub apply_b_dec_to_input: bool,
    /// TopK `k`.
    pub k: Option<usize>,
    /// Extra cfg keys.
    pub extra_cfg: Vec<(String, serde_json::Value)>,
    /// Our variant name.
    pub saepipe_arch: String,
}

impl Folded {
    /// These tensors on `device`, for the tensor evaluation encode
    /// ([`super::export_tensor`]).
    pub fn to_device(
        &self,
        device: &candle_core::Device,
    ) -> candle_core::Result<super::export_tensor::DeviceSae> {
        use candle_core::Tensor;
        let (d, f) = (self.d_in, self.d_sae);
        // a hand-built `Folded` of an unknown architecture runs as `standard`, as the kernels'
        let format = registry::format(&self.architecture)
            .or_else(|| registry::format("standard"))
            .expect("invariant: relu_l1 registers the `standard` format");
        let w_enc = Tensor::from_slice(&self.w_enc, (f, d), device)?;
        Ok(super::export_tensor::DeviceSae {
            w_enc_t: w_enc.t()?.contiguous()?,
            w_dec: Tensor::from_slice(&self.w_dec, (f, d), device)?,
            b_dec: Tensor::from_slice(&self.b_dec, (1, d), device)?,
            per_latent: self
                .per_latent
                .iter()
                .map(|(n, v)| Ok((n.clone(), Tensor::from_slice(v, (1, f), device)?)))
                .collect::<candle_core::Result<_>>()?,
            k: self.k,
            extra_cfg: self.extra_cfg.clone(),
            apply_b_dec_to_input: self.apply_b_dec_to_input,
            d_in: d,
            d_sae: f,
            encode: format.tensor_encode,
        })
    }

    /// The per-latent tensor `name`.
    pub fn per(&self, name: &str) -> &[f32] {
        &self
            .per_latent
            .iter()
            .find(|(n, _)| n == name)
            .expect("invariant: load() read the per-latent tensors of this architecture")
            .1
    }

    /// The integer extra `cfg.json` key `name` (0 when absent).
    pub fn extra_usize(&self, name: &str) -> usize {
        self.extra_cfg
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_u64())
            .unwrap_or(0) as usize
    }
}

/// [`Format::read_cfg`]: check the `cfg.json` (`cfg`, `d_sae`), return the extra keys to keep.
pub type ReadCfg =
    fn(&serde_json::Value, usize) -> Result<Vec<(String, serde_json::Value)>, String>;

/// One SAELens `architecture` our loader runs, registered by the variant file that owns it
/// ([`super::Variant::formats`]).
pub struct Format {
    /// The `cfg.json` `architecture` string.
    pub architecture: &'static str,
    /// Per-latent tensors `[d_sae]` the file must hold, besides `W_enc`, `W_dec`, `b_dec`.
    pub per_latent: &'static [&'static str],
    /// Check the architecture's own `cfg.json` keys (`cfg`, `d_sae`) and return the extra keys
    /// to keep in [`Folded::extra_cfg`]; the error says what is wrong.
    pub read_cfg: ReadCfg,
    /// Encode `n` rows of `ws.xt` (raw input, minus `b_dec` when `apply_b_dec_to_input`)
    /// into `ws.codes` with the loaded tensors.
    pub encode: fn(&Folded, usize, &mut Workspace),
    /// The same encode on candle tensors (the evaluation encode of the tensor backend,
    /// [`super::export_tensor`]).
    pub tensor_encode: super::export_tensor::TensorEncode,
}

/// [`Format::read_cfg`] for architectures without extra keys.
pub fn no_extra_cfg(
    _cfg: &serde_json::Value,
    _d_sae: usize,
) -> Result<Vec<(String, serde_json::Value)>, String> {
    Ok(Vec::new())
}

/// Fold the input scale `scale` and the decoder norms into `sae`'s export tensors.
pub fn fold(sae: &dyn Sae, scale: f32) -> Folded {
    let (d, f) = sae.dims();
    let parts = sae.export_parts();
    let mut w_enc = parts.w_enc;
    let mut w_dec = parts.w_dec;
    let mut b_dec = parts.b_dec;
    // 1. input scale
    w_enc.iter_mut().for_each(|v| *v *= scale);
    w_dec.iter_mut().for_each(|v| *v /= scale);
    b_dec.iter_mut().for_each(|v| *v /= scale);
    // 2. decoder norms
    let mut norms = Vec::new();
    c::row_norms(&w_dec, d, &mut norms);
    let mut per_latent = Vec::new();
    for (name, mut v, rule) in parts.per_latent {
        if rule == Fold::ByDecoderNorm {
            v.iter_mut().zip(&norms).for_each(|(x, n)| *x *= n);
        }
        per_latent.push((name.to_string(), v));
    }
    for i in 0..f {
        let n = norms[i];
        if n > 0.0 {
            w_enc[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= n);
            w_dec[i * d..(i + 1) * d].iter_mut().for_each(|v| *v /= n);
        }
    }
    let k = parts
        .extra_cfg
        .iter()
        .find(|(k, _)| *k == "k")
        .and_then(|(_, v)| v.as_u64())
        .map(|v| v as usize);
    Folded {
        architecture: parts.architecture.to_string(),
        d_in: d,
        d_sae: f,
        w_enc,
        w_dec,
        b_dec,
        per_latent,
        apply_b_dec_to_input: parts.apply_b_dec_to_input,
        k,
        extra_cfg: parts
            .extra_cfg
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        saepipe_arch: sae.arch().to_string(),
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Transpose `[r, c]` → `[c, r]`.
pub fn transpose(v: &[f32], r: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for i in 0..r {
        for j in 0..cols {
            out[j * r + i] = v[i * cols + j];
        }
    }
    out
}

/// Write `sae` in SAELens v6 format into `dir` (`cfg.json`, `sae_weights.safetensors`),
/// each file atomically; `cfg.json` is written last.
pub fn save_saelens(
    sae: &dyn Sae,
    scale: f32,
    meta: &ExportMeta,
    dir: &Path,
) -> Result<Folded, ExportError> {
    let folded = fold(sae, scale);
    write_folded(&folded, meta, dir)?;
    Ok(folded)
}

/// Write already folded tensors.
pub fn write_folded(fd: &Folded, meta: &ExportMeta, dir: &Path) -> Result<(), ExportError> {
    let (d, f) = (fd.d_in, fd.d_sae);
    let w_enc_t = f32_bytes(&transpose(&fd.w_enc, f, d));
    let w_dec = f32_bytes(&fd.w_dec);
    let b_dec = f32_bytes(&fd.b_dec);
    let per: Vec<(String, Vec<u8>)> = fd
        .per_latent
        .iter()
        .map(|(n, v)| (n.clone(), f32_bytes(v)))
        .collect();
    let wpath = dir.join(WEIGHTS_FILE);
    fn mk<'a>(
        shape: Vec<usize>,
        data: &'a [u8],
        path: &Path,
    ) -> Result<TensorView<'a>, ExportError> {
        TensorView::new(Dtype::F32, shape, data).map_err(|e| fmt_err(path, e.to_string()))
    }
    let mut tensors: Vec<(String, TensorView)> = vec![
        ("W_enc".into(), mk(vec![d, f], &w_enc_t, &wpath)?),
        ("W_dec".into(), mk(vec![f, d], &w_dec, &wpath)?),
        ("b_dec".into(), mk(vec![d], &b_dec, &wpath)?),
    ];
    for (n, b) in &per {
        tensors.push((n.clone(), mk(vec![f], b, &wpath)?));
    }
    let bytes =
        safetensors::serialize(tensors, None).map_err(|e| fmt_err(&wpath, e.to_string()))?;
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| ExportError::Io { path: p, source }
    };
    fsutil::atomic_write(&wpath, &bytes).map_err(io(&wpath))?;
    let mut cfg = serde_json::json!({
        "d_in": d, "d_sae": f, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": fd.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "architecture": fd.architecture,
        "metadata": {
            "sae_lens_version": SAE_LENS_VERSION,
            "sae_lens_training_version": SAE_LENS_VERSION,
            "model_name": meta.model_name,
            "model_class_name": "HookedTransformer",
            "hook_name": meta.hook_name,
            "hook_head_index": null,
            "context_size": meta.context_size,
            "prepend_bos": meta.prepend_bos,
            "dataset_path": meta.dataset_path,
            "model_from_pretrained_kwargs": {},
            "exclude_special_tokens": meta.exclude_special_tokens,
            "saepipe_excluded_token_ids": meta.excluded_token_ids,
            "sequence_separator_token": meta.sequence_separator_token,
            "disable_concat_sequences": meta.disable_concat_sequences,
            "neuronpedia_id": null,
            "saepipe_arch": fd.saepipe_arch,
        }
    });
    for (k, v) in &meta.extra {
        cfg["metadata"][k.as_str()] = v.clone();
    }
    for (k, v) in &fd.extra_cfg {
        cfg[k.as_str()] = v.clone();
    }
    let cpath = dir.join(CFG_FILE);
    let text = serde_json::to_string_pretty(&cfg).map_err(|e| fmt_err(&cpath, e.to_string()))?;
    fsutil::atomic_write(&cpath, text.as_bytes()).map_err(io(&cpath))?;
    Ok(())
}

/// An SAE loaded from SAELens v6 files, runnable on raw activations.
#[derive(Debug, Clone)]
pub struct LoadedSae {
    /// The tensors and config.
    pub t: Folded,
    /// Hook name from the metadata.
    pub hook_name: String,
}

impl LoadedSae {
    /// Load `dir/cfg.json` and `dir/sae_weights.safetensors`.
    pub fn load(dir: &Path) -> Result<Self, ExportError> {
        let cpath = dir.join(CFG_FILE);
        let text = std::fs::read_to_string(&cpath).map_err(|source| ExportError::Io {
            path: cpath.clone(),
            source,
        })?;
        let cfg: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| fmt_err(&cpath, e.to_string()))?;
        let get_usize = |k: &str| {
            cfg[k]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| fmt_err(&cpath, format!("missing integer `{k}`")))
        };
        let (d, f) = (get_usize("d_in")?, get_usize("d_sae")?);
        let architecture = cfg["architecture"]
            .as_str()
            .ok_or_else(|| fmt_err(&cpath, "missing `architecture`"))?
            .to_string();
        let Some(format) = registry::format(&architecture) else {
            return Err(fmt_err(
                &cpath,
                format!(
                    "architecture `{architecture}` is not supported ({})",
                    registry::architectures().join(", ")
                ),
            ));
        };
        let version = cfg["metadata"]["sae_lens_version"].as_str().unwrap_or("0");
        if version
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .unwrap_or(0)
            < 6
        {
            return Err(fmt_err(
                &cpath,
                format!("metadata.sae_lens_version = {version}; only v6 files are supported"),
            ));
        }
        if cfg["normalize_activations"].as_str().unwrap_or("none") != "none" {
            return Err(fmt_err(
                &cpath,
                "normalize_activations must be \"none\" (scaling folded into the weights)",
            ));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&wpath).map_err(|source| ExportError::Io {
            path: wpath.clone(),
            source,
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fmt_err(&wpath, e.to_string()))?;
        let read = |name: &str, shape: &[usize]| -> Result<Vec<f32>, ExportError> {
            let t = st
                .tensor(name)
                .map_err(|e| fmt_err(&wpath, format!("tensor {name}: {e}")))?;
            if t.dtype() != Dtype::F32 || t.shape() != shape {
                return Err(fmt_err(
                    &wpath,
                    format!(
                        "tensor {name}: expected F32 {shape:?}, found {:?} {:?}",
                        t.dtype(),
                        t.shape()
                    ),
                ));
            }
            Ok(t.data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let w_enc = transpose(&read("W_enc", &[d, f])?, d, f);
        let w_dec = read("W_dec", &[f, d])?;
        let b_dec = read("b_dec", &[d])?;
        let mut per_latent = Vec::new();
        for n in format.per_latent {
            per_latent.push((n.to_string(), read(n, &[f])?));
        }
        let k = cfg["k"].as_u64().map(|v| v as usize);
        let extra_cfg = (format.read_cfg)(&cfg, f).map_err(|msg| fmt_err(&cpath, msg))?;
        Ok(Self {
            hook_name: cfg["metadata"]["hook_name"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            t: Folded {
                architecture,
                d_in: d,
                d_sae: f,
                w_enc,
                w_dec,
                b_dec,
                per_latent,
                apply_b_dec_to_input: cfg["apply_b_dec_to_input"].as_bool().unwrap_or(true),
                k,
                extra_cfg,
                saepipe_arch: cfg["metadata"]["saepipe_arch"]
                    .as_str()
                    .unwrap_or("")
                    .to_string(),
            },
        })
    }

    /// Encode raw activations `x: [n, d_in]` into `ws.codes` with SAELens semantics.
    pub fn encode(&self, x: &[f32], n: usize, ws: &mut Workspace) {
        let t = &self.t;
        c::prepare_input(
            x,
            t.d_in,
            t.apply_b_dec_to_input.then_some(&t.b_dec[..]),
            &mut ws.xt,
        );
        // load() accepts only registered architectures; a hand-built `Folded` with another
        // one runs as `standard` (ReLU), as it always did.
        let format = registry::format(&t.architecture)
            .or_else(|| registry::format("standard"))
            .expect("invariant: relu_l1 registers the `standard` format");
        (format.encode)(t, n, ws);
    }

    /// Decode codes into raw-space reconstructions `[n, d_in]`.
    pub fn decode(&self, codes: &Codes, out: &mut Vec<f32>, ws: &mut Workspace) {
        c::decode(
            &mut ws.scratch,
            codes,
            &self.t.w_dec,
            self.t.d_in,
            self.t.d_sae,
            Some(&self.t.b_dec),
            out,
        );
    }

    /// Tensor names and values as written (for tests).
    pub fn tensors(&self) -> HashMap<String, Vec<f32>> {
        let mut m: HashMap<String, Vec<f32>> = self.t.per_latent.iter().cloned().collect();
        m.insert("W_enc_rows".into(), self.t.w_enc.clone());
        m.insert("W_dec".into(), self.t.w_dec.clone());
        m.insert("b_dec".into(), self.t.b_dec.clone());
        m
    }
}
