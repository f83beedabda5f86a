//! Errors of model loading and hookpoint validation.
//!
//! Implements the error rules of STYLE.md §2.4 for `models`: every message names the
//! file (or tensor) at fault and says what to do about it. Nothing in model loading
//! panics on bad input; everything ends up here.

use std::path::{Path, PathBuf};

use super::hooks::HookpointError;

/// The model types [`super::load_dir`] understands, for error messages.
pub const SUPPORTED_MODEL_TYPES: &str = "gpt_neox, llama, smollm3";

/// Why a model could not be loaded, or a hookpoint is not available in it.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// `config.json` is not in the model directory.
    #[error(
        "{}: config.json not found; a local:<dir> model must be a Hugging Face layout \
         directory (config.json, model.safetensors or model.safetensors.index.json with its \
         shards, tokenizer.json) — check the path, or download the model first",
        path.display()
    )]
    ConfigMissing { path: PathBuf },

    /// `config.json` is not valid JSON, or a field has the wrong type.
    #[error(
        "{}: malformed config.json: {source}{context}; fix the file, or copy config.json again \
         from the model's hub repository",
        path.display()
    )]
    ConfigMalformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
        /// The offending line, quoted (` (line 5: "hidden_size": "wide",)`), when known.
        context: String,
    },

    /// `model_type` names an architecture we have no forward pass for.
    #[error(
        "{}: model_type '{model_type}' is not supported; supported model types: {}",
        path.display(),
        SUPPORTED_MODEL_TYPES
    )]
    UnknownModelType { path: PathBuf, model_type: String },

    /// A config value we cannot honour (RoPE scaling, sliding windows, odd head sizes).
    #[error("{}: {key} = {value} is not supported: {fix}", path.display())]
    UnsupportedConfig {
        path: PathBuf,
        key: String,
        value: String,
        fix: String,
    },

    /// The directory has no safetensors weights.
    #[error(
        "{}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin or \
         pytorch_model.bin.index.json; a local:<dir> model needs one of them (safetensors \
         preferred: transformers' save_pretrained(dir, safe_serialization=True))",
        dir.display()
    )]
    WeightsMissing { dir: PathBuf },

    /// A tensor the config implies is not in the checkpoint.
    #[error(
        "{}: tensor '{name}' is missing; the weights do not match config.json \
         (model_type {model_type}) — use the config.json and weights of the same checkpoint",
        path.display()
    )]
    MissingTensor {
        path: PathBuf,
        name: String,
        model_type: String,
    },

    /// A tensor's shape disagrees with the config.
    #[error(
        "{}: tensor '{name}' has shape {found:?}, expected {expected:?} from the config; \
         the weights and config.json disagree — use the config.json that came with these weights",
        path.display()
    )]
    WrongShape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype we do not convert.
    #[error(
        "{}: tensor '{name}' is stored as {dtype}; saepipe loads f32, f16 and bf16 weights — \
         convert the checkpoint to one of them",
        path.display()
    )]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    /// A file could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A safetensors file (or its index) is unreadable.
    #[error(
        "{}: not a readable safetensors file or index ({detail}); the download is probably \
         truncated — download it again",
        path.display()
    )]
    Safetensors { path: PathBuf, detail: String },

    /// A sharded-weights index that cannot be used (the same error `local:` resolution
    /// gives).
    #[error(transparent)]
    BadIndex(#[from] IndexError),

    /// A GGUF whose architecture we have no forward pass for.
    #[error(
        "{}: GGUF general.architecture '{arch}' is not supported; gguf: sources must be \
         llama-family GGUFs (general.architecture = llama) — for other models use the Hugging \
         Face safetensors with local:<dir>",
        path.display()
    )]
    GgufArchitecture { path: PathBuf, arch: String },

    /// A GGUF file (right magic) whose header or tensor data cannot be read to its end.
    #[error(
        "{}: not a readable GGUF file ({detail}); the download is probably truncated — \
         download it again",
        path.display()
    )]
    GgufRead { path: PathBuf, detail: String },

    /// A file given as a GGUF that does not start with the GGUF magic.
    #[error(
        "{}: not a GGUF file (it starts with {found}, a GGUF file starts with \"GGUF\"); \
         gguf: sources must be llama.cpp GGUF files — check the path, or use local:<dir> for a \
         Hugging Face folder",
        path.display()
    )]
    GgufMagic { path: PathBuf, found: String },

    /// A GGUF metadata key is missing or has the wrong type.
    #[error(
        "{}: GGUF metadata '{key}' {problem}; the file was not written by a llama.cpp \
         converter saepipe understands — re-convert it with llama.cpp's convert_hf_to_gguf.py",
        path.display()
    )]
    GgufMetadata {
        path: PathBuf,
        key: String,
        problem: String,
    },

    /// The tokenizer could not be loaded or rebuilt.
    #[error("{}: cannot build the tokenizer: {detail}", path.display())]
    Tokenizer { path: PathBuf, detail: String },

    /// A model source string that is none of the known forms.
    #[error(
        "model source '{0}' is not understood; use local:<dir> (Hugging Face layout), \
         gguf:<file> (llama-family GGUF) or org/name[@revision] (hub repository)"
    )]
    BadSource(String),

    /// A hub repository given where only local sources can be opened.
    #[error(
        "model source '{repo}' is a hub repository; it must be downloaded first \
         (`saepipe download <pipeline.toml>`) and then opened from the cache, or pass \
         local:<snapshot dir>"
    )]
    HubSource { repo: String },

    /// A hookpoint does not exist in the model.
    #[error("{}: {source}", path.display())]
    Hookpoint {
        path: PathBuf,
        #[source]
        source: HookpointError,
    },

    /// Building the model's tensors failed (device out of memory, etc.).
    #[error("{}: building the model failed: {source}", path.display())]
    Candle {
        path: PathBuf,
        #[source]
        source: candle_core::Error,
    },

    /// A PyTorch checkpoint (`pytorch_model.bin`) that cannot be read.
    #[error(
        "{}: not a readable PyTorch checkpoint: {detail}; download it again, or use a \
         revision with model.safetensors",
        path.display()
    )]
    Pickle { path: PathBuf, detail: String },

    /// A PyTorch checkpoint whose pickle names a function that is not a tensor constructor.
    #[error(
        "{}: refusing to load this PyTorch checkpoint: its pickle calls {global}, which is \
         not a tensor constructor (a state dict saved by torch.save only names \
         torch._utils._rebuild_tensor_v2, torch storages and collections.OrderedDict); \
         saepipe never runs pickled code — get the weights as safetensors from a source you \
         trust",
        path.display()
    )]
    UnsafePickle { path: PathBuf, global: String },
}

/// A `model.safetensors.index.json` that cannot be used: unreadable, not the
/// transformers format, or naming a shard outside the model folder
/// ([`super::weights::index_shard_names`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: bad sharded-weights index: {message}", path.display())]
pub struct IndexError {
    /// The index file.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

impl ModelError {
    /// A [`ModelError::ConfigMalformed`] for `path`, quoting the line of `text` the JSON
    /// error points at.
    pub(crate) fn malformed_config(path: &Path, text: &str, source: serde_json::Error) -> Self {
        let context = text
            .lines()
            .nth(source.line().saturating_sub(1))
            .filter(|_| source.line() > 0)
            .map(|l| format!(" (line {}: {})", source.line(), l.trim()))
            .unwrap_or_default();
        ModelError::ConfigMalformed {
            path: path.to_path_buf(),
            source,
            context,
        }
    }

    /// Wrap a candle error that happened while building the model from `path`.
    pub(crate) fn candle(path: &Path) -> impl FnOnce(candle_core::Error) -> ModelError + '_ {
        move |source| ModelError::Candle {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Wrap an I/O error on `path`.
    pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
        move |source| ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
