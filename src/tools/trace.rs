//! `saepipe trace`: run a model on one prompt and write hookpoint activations (and logits)
//! to a safetensors file, for parity checks against other libraries and for debugging.
//!
//! Implements the `trace` command of `../shared/specs/pipeline.md` §1 with the hookpoint
//! names of §3. Output tensors:
//! - `blocks.{L}.hook_{site}`: F32 `[n_tokens, d_model]`, one per requested hookpoint
//!   (widened from the model dtype with `--dtype bf16|f16`);
//! - `logits`: F32 `[n_tokens, vocab]` with `--logits`;
//! - `token_ids`: U32 `[n_tokens]`.
//!
//! The file's metadata records the saepipe version, the model source and the prompt.
//! It is written atomically (`*.tmp`, then rename).
//!
//! Decision: non-finite activations or logits are an error (nothing is written); a prompt
//! longer than the model's trained context is a warning.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::hub::{HubError, HubOptions};
use crate::models::{Hookpoint, HookpointError, LoadedModel, ModelError, ModelSource, Recorder};
use crate::util::error::{ensure_finite, NumericError};
use crate::util::progress::Reporter;

/// What to feed the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceInput {
    /// A prompt, tokenised with the model's tokenizer (special tokens added as its
    /// post-processor says).
    Text(String),
    /// Token ids as given.
    TokenIds(Vec<u32>),
}

/// One `saepipe trace` invocation.
#[derive(Debug, Clone)]
pub struct TraceRequest {
    /// The model; a hub source is resolved through the hub cache by [`trace_source`]
    /// ([`trace`] alone opens local sources only).
    pub source: ModelSource,
    /// The prompt.
    pub input: TraceInput,
    /// Hookpoint names (`blocks.1.hook_mlp_out`).
    pub hookpoints: Vec<String>,
    /// Also write the logits.
    pub logits: bool,
    /// Output safetensors file.
    pub out: PathBuf,
    /// The model dtype (f32, bf16 or f16); the written tensors are f32 whatever it is.
    pub dtype: DType,
}

/// What a trace wrote.
#[derive(Debug, Clone)]
pub struct TraceSummary {
    /// The token ids that were run.
    pub token_ids: Vec<u32>,
    /// Names of the tensors written.
    pub tensors: Vec<String>,
    /// The output file.
    pub out: PathBuf,
}

/// Why a trace failed.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// Loading the model failed, or a hookpoint does not exist in it.
    #[error(transparent)]
    Model(Box<ModelError>),
    /// A hub source could not be resolved from the cache or downloaded.
    #[error(transparent)]
    Hub(Box<HubError>),
    /// A hookpoint name does not parse.
    #[error("--hookpoints: {0}")]
    Hookpoint(#[from] HookpointError),
    /// Nothing was asked for.
    #[error("nothing to trace: pass --hookpoints blocks.<L>.hook_<site>,... and/or --logits")]
    NothingRequested,
    /// `--text` without a tokenizer.
    #[error(
        "{}: no tokenizer (tokenizer.json) to tokenise --text with; add tokenizer.json to the \
         model directory or pass --token-ids",
        origin.display()
    )]
    NoTokenizer { origin: PathBuf },
    /// Tokenisation failed or gave nothing.
    #[error("tokenising --text: {0}")]
    Tokenize(String),
    /// A token id outside the vocabulary.
    #[error(
        "--token-ids: id {id} is outside the model's vocabulary of {vocab}; ids must be < {vocab}"
    )]
    TokenOutOfRange { id: u32, vocab: usize },
    /// The forward pass failed.
    #[error("forward pass of {source_name} failed: {source}")]
    Forward {
        source_name: String,
        #[source]
        source: candle_core::Error,
    },
    /// NaN or infinity in an output.
    #[error("{0}; the model produced non-finite values, nothing was written — check the weights")]
    NonFinite(#[from] NumericError),
    /// Writing the output failed.
    #[error("{}: cannot write: {detail}", path.display())]
    Write { path: PathBuf, detail: String },
}

impl From<ModelError> for TraceError {
    fn from(e: ModelError) -> Self {
        TraceError::Model(Box::new(e))
    }
}

impl From<HubError> for TraceError {
    fn from(e: HubError) -> Self {
        TraceError::Hub(Box::new(e))
    }
}

/// [`trace`], resolving a hub source (`org/name@revision`) first as the pipeline's
/// download stage does: from the hub cache when the files are there (no request at all),
/// else downloaded into it unless `opts.offline`. The output's `model` metadata keeps the
/// hub name, not the snapshot folder.
pub fn trace_source(
    req: &TraceRequest,
    opts: &HubOptions,
    reporter: &dyn Reporter,
    device: &Device,
) -> Result<TraceSummary, TraceError> {
    if !matches!(req.source, ModelSource::Hub { .. }) {
        return trace(req, device);
    }
    let hps = parse_hookpoints(&req.hookpoints)?;
    if hps.is_empty() && !req.logits {
        return Err(TraceError::NothingRequested);
    }
    let resolved = crate::hub::resolve_model(&req.source, opts, reporter)?;
    let model = crate::models::load_dir_with(&resolved.path, device, req.dtype, None)?;
    trace_loaded(&model, &req.source.to_string(), req, &hps)
}

/// Load the model of `req.source` on `device` in `req.dtype` and trace it.
pub fn trace(req: &TraceRequest, device: &Device) -> Result<TraceSummary, TraceError> {
    let hps = parse_hookpoints(&req.hookpoints)?;
    if hps.is_empty() && !req.logits {
        return Err(TraceError::NothingRequested);
    }
    let model = crate::models::load_source_with(&req.source, device, req.dtype, None)?;
    trace_loaded(&model, &req.source.to_string(), req, &hps)
}

/// Parse hookpoint names, keeping their order and dropping duplicates.
pub fn parse_hookpoints(names: &[String]) -> Result<Vec<Hookpoint>, HookpointError> {
    let mut out: Vec<Hookpoint> = Vec::new();
    for n in names {
        let hp: Hookpoint = n.trim().parse()?;
        if !out.contains(&hp) {
            out.push(hp);
        }
    }
    Ok(out)
}

/// Trace an already loaded model.
pub fn trace_loaded(
    loaded: &LoadedModel,
    source_name: &str,
    req: &TraceRequest,
    hps: &[Hookpoint],
) -> Result<TraceSummary, TraceError> {
    loaded.check_hookpoints(hps)?;
    let model = loaded.model.as_ref();
    let info = model.info();
    // 1. Token ids.
    let ids: Vec<u32> = match &req.input {
        TraceInput::TokenIds(ids) => ids.clone(),
        TraceInput::Text(text) => {
            let tok = loaded
                .tokenizer
                .as_ref()
                .ok_or_else(|| TraceError::NoTokenizer {
                    origin: loaded.origin.clone(),
                })?;
            tok.encode(text.as_str(), true)
                .map_err(|e| TraceError::Tokenize(e.to_string()))?
                .get_ids()
                .to_vec()
        }
    };
    if ids.is_empty() {
        return Err(TraceError::Tokenize("the prompt gave no tokens".into()));
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= info.vocab_size) {
        return Err(TraceError::TokenOutOfRange {
            id,
            vocab: info.vocab_size,
        });
    }
    let n = ids.len();
    if let Some(max) = model.max_positions() {
        if n > max {
            tracing::warn!("{n} tokens exceed the model's trained context of {max}; activations past it are out of distribution");
        }
    }
    // 2. Forward, stopping after the deepest hookpoint unless logits are wanted.
    let fwd_err = |source| TraceError::Forward {
        source_name: source_name.to_string(),
        source,
    };
    let input = Tensor::from_vec(ids.clone(), (1, n), model.device()).map_err(fwd_err)?;
    let mut rec = Recorder::new(hps.iter().copied());
    let stop = if req.logits {
        None
    } else {
        rec.deepest_layer()
    };
    let logits = model
        .forward_hooked(&input, &mut rec, stop)
        .map_err(fwd_err)?;
    // 3. Collect [n, width] f32 tensors in hookpoint order, refusing non-finite values.
    let mut tensors: Vec<(String, RawTensor)> = Vec::new();
    let mut add = |name: String, t: &Tensor| -> Result<(), TraceError> {
        let t = t
            .squeeze(0)
            .and_then(|t| t.to_dtype(DType::F32))
            .map_err(fwd_err)?;
        let shape = t.dims().to_vec();
        let data: Vec<f32> = t.flatten_all().and_then(|t| t.to_vec1()).map_err(fwd_err)?;
        ensure_finite(&data, &name, None)?;
        tensors.push((name, RawTensor::f32(shape, &data)));
        Ok(())
    };
    for hp in hps {
        let t = rec.acts.get(hp).ok_or_else(|| {
            fwd_err(candle_core::Error::Msg(format!(
                "the forward pass never reached {hp}"
            )))
        })?;
        add(hp.to_string(), t)?;
    }
    if let Some(l) = &logits {
        add("logits".to_string(), l)?;
    }
    tensors.push((
        "token_ids".to_string(),
        RawTensor {
            dtype: safetensors::Dtype::U32,
            shape: vec![n],
            bytes: ids.iter().flat_map(|i| i.to_le_bytes()).collect(),
        },
    ));
    // 4. Write atomically, with provenance metadata.
    let mut meta = HashMap::new();
    meta.insert(
        "saepipe_version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    meta.insert("model".to_string(), source_name.to_string());
    meta.insert("model_type".to_string(), info.model_type.clone());
    if let TraceInput::Text(t) = &req.input {
        meta.insert("text".to_string(), t.clone());
    }
    let names: Vec<String> = tensors.iter().map(|(n, _)| n.clone()).collect();
    write_safetensors(&req.out, tensors, meta)?;
    tracing::info!(
        "traced {n} tokens of {source_name}: {} tensors -> {}",
        names.len(),
        req.out.display()
    );
    Ok(TraceSummary {
        token_ids: ids,
        tensors: names,
        out: req.out.clone(),
    })
}

/// A tensor as little-endian bytes, for the safetensors writer.
struct RawTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl RawTensor {
    fn f32(shape: Vec<usize>, data: &[f32]) -> Self {
        Self {
            dtype: safetensors::Dtype::F32,
            shape,
            bytes: data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

impl safetensors::View for RawTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn write_safetensors(
    path: &Path,
    tensors: Vec<(String, RawTensor)>,
    meta: HashMap<String, String>,
) -> Result<(), TraceError> {
    let bytes = safetensors::serialize(tensors, Some(meta)).map_err(|e| TraceError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })?;
    crate::util::fs::atomic_write(path, &bytes).map_err(|e| TraceError::Write {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}
