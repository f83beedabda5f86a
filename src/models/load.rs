//! Opening a model: `local:<dir>` (Hugging Face layout) and `gguf:<file>` sources.
//!
//! Implements `../shared/specs/pipeline.md` §5. `config.json`'s `model_type` picks the model
//! file ([`super::gpt_neox`] or [`super::llama`]); the weights come through
//! [`super::weights::Weights`], converted to the model dtype (f32 unless a `_with` loader is
//! given bf16/f16) tensor by tensor as they are loaded onto the device.
//!
//! Decision: hub sources (`org/name[@rev]`) are not opened here; the download stage resolves
//! them to a snapshot directory, which is then opened with [`load_dir`]. [`load_source`]
//! answers a hub source with [`ModelError::HubSource`] so callers say what to do.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device};
use tokenizers::Tokenizer;

use super::error::ModelError;
use super::gpt_neox::{GptNeoX, GptNeoXConfig};
use super::hooks::Hookpoint;
use super::llama::{Llama, LlamaConfig};
use super::HookedModel;

/// Where a model comes from (pipeline.md §2, `model.repo`).
#[derive(Debug, Clone, PartialEq, Eq)]
///
/// Parsed from `model.source` (+ `model.revision`) by the config, or from `--model` by the
/// tools; the hub stage turns a `Hub` source into a local snapshot folder.
pub enum ModelSource {
    /// A Hugging Face layout directory.
    Local {
        /// The folder.
        dir: PathBuf,
    },
    /// A llama-family GGUF file.
    Gguf {
        /// The file.
        file: PathBuf,
    },
    /// A hub repository, optionally pinned: `org/name[@revision]`. Pipelines always pin it
    /// (the config refuses moving branches).
    Hub {
        /// `org/name`.
        repo: String,
        /// Commit sha or tag.
        revision: Option<String>,
    },
}

impl FromStr for ModelSource {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(dir) = s.strip_prefix("local:") {
            if dir.is_empty() {
                return Err(ModelError::BadSource(s.to_string()));
            }
            return Ok(ModelSource::Local {
                dir: PathBuf::from(dir),
            });
        }
        if let Some(file) = s.strip_prefix("gguf:") {
            if file.is_empty() {
                return Err(ModelError::BadSource(s.to_string()));
            }
            return Ok(ModelSource::Gguf {
                file: PathBuf::from(file),
            });
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) if !rev.is_empty() => (r, Some(rev.to_string())),
            Some(_) => return Err(ModelError::BadSource(s.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        if parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.contains(':')) {
            Ok(ModelSource::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(ModelError::BadSource(s.to_string()))
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Local { dir } => write!(f, "local:{}", dir.display()),
            ModelSource::Gguf { file } => write!(f, "gguf:{}", file.display()),
            ModelSource::Hub {
                repo,
                revision: Some(r),
            } => write!(f, "{repo}@{r}"),
            ModelSource::Hub {
                repo,
                revision: None,
            } => f.write_str(repo),
        }
    }
}

/// A model ready to run, with its tokenizer when one was found.
pub struct LoadedModel {
    /// The forward pass.
    pub model: Box<dyn HookedModel>,
    /// `tokenizer.json` of a local directory, or the tokenizer rebuilt from a GGUF.
    pub tokenizer: Option<Tokenizer>,
    /// The directory or file the model was loaded from.
    pub origin: PathBuf,
    /// The file the tokenizer came from (`tokenizer.json`, or the GGUF itself).
    pub tokenizer_path: Option<PathBuf>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("info", self.model.info())
            .field("origin", &self.origin)
            .field("tokenizer_path", &self.tokenizer_path)
            .finish()
    }
}

impl LoadedModel {
    /// Check that every hookpoint exists in this model; the error names the model's origin
    /// and the fix.
    pub fn check_hookpoints(&self, hps: &[Hookpoint]) -> Result<(), ModelError> {
        for &hp in hps {
            self.model
                .check_hookpoint(hp)
                .map_err(|source| ModelError::Hookpoint {
                    path: self.origin.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// Open any local source; hub sources are answered with [`ModelError::HubSource`] (they
/// must be resolved to a snapshot directory by the download stage first).
pub fn load_source(source: &ModelSource, device: &Device) -> Result<LoadedModel, ModelError> {
    load_source_with(source, device, DType::F32, None)
}

/// [`load_source`] in `dtype` (f32, bf16 or f16: weights and activations; see
/// [`HookedModel::dtype`]), with every weight randomly re-initialised when `random_init` is
/// `Some(seed)` (see [`super::weights::Weights::randomize`]; σ = `initializer_range`).
pub fn load_source_with(
    source: &ModelSource,
    device: &Device,
    dtype: DType,
    random_init: Option<u64>,
) -> Result<LoadedModel, ModelError> {
    match source {
        ModelSource::Local { dir } => load_dir_with(dir, device, dtype, random_init),
        ModelSource::Gguf { file } => load_gguf_with(file, device, dtype, random_init),
        ModelSource::Hub { .. } => Err(ModelError::HubSource {
            repo: source.to_string(),
        }),
    }
}

/// The model dtypes the forwards implement: f32, bf16 and f16.
fn check_model_dtype(path: &Path, dtype: DType) -> Result<(), ModelError> {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 => Ok(()),
        other => Err(ModelError::UnsupportedConfig {
            path: path.to_path_buf(),
            key: "dtype".into(),
            value: format!("{other:?}"),
            fix: "the model dtype must be f32, bf16 or f16".into(),
        }),
    }
}

/// Read `dir/config.json`: its path, text and `model_type` (`"(missing)"` when absent).
pub fn read_config(dir: &Path) -> Result<(PathBuf, String, String), ModelError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ModelError::ConfigMissing { path });
    }
    let text = std::fs::read_to_string(&path).map_err(ModelError::io(&path))?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|source| ModelError::malformed_config(&path, &text, source))?;
    let model_type = match json.get("model_type") {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
        None => "(missing)".to_string(),
    };
    Ok((path, text, model_type))
}

/// Open a Hugging Face layout directory: `config.json`, `model.safetensors` (or a sharded
/// index) in f32/f16/bf16, and `tokenizer.json` when present.
pub fn load_dir(dir: &Path, device: &Device) -> Result<LoadedModel, ModelError> {
    load_dir_with(dir, device, DType::F32, None)
}

/// `initializer_range` of a config.json text (0.02, the Hugging Face default, when absent).
fn initializer_range(text: &str) -> f32 {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("initializer_range").and_then(|r| r.as_f64()))
        .unwrap_or(0.02) as f32
}

/// [`load_dir`] in `dtype`, optionally randomly re-initialised (see [`load_source_with`]).
pub fn load_dir_with(
    dir: &Path,
    device: &Device,
    dtype: DType,
    random_init: Option<u64>,
) -> Result<LoadedModel, ModelError> {
    check_model_dtype(dir, dtype)?;
    let (config_path, text, model_type) = read_config(dir)?;
    let weights = |dir: &Path, model_type: &str| -> Result<super::weights::Weights, ModelError> {
        let mut w = super::weights::Weights::from_dir(dir, model_type, device)?.with_dtype(dtype);
        if let Some(seed) = random_init {
            w.randomize(seed, initializer_range(&text));
        }
        Ok(w)
    };
    let malformed = |source| ModelError::malformed_config(&config_path, &text, source);
    let model: Box<dyn HookedModel> = match model_type.as_str() {
        "gpt_neox" => {
            let cfg: GptNeoXConfig = serde_json::from_str(&text).map_err(malformed)?;
            cfg.validate(&config_path)?;
            let w = weights(dir, &model_type)?;
            Box::new(GptNeoX::new(&cfg, &w)?)
        }
        "llama" | "smollm3" => {
            let cfg: LlamaConfig = serde_json::from_str(&text).map_err(malformed)?;
            cfg.validate(&config_path)?;
            let w = weights(dir, &model_type)?;
            Box::new(Llama::new(&cfg, &w)?)
        }
        _ => {
            return Err(ModelError::UnknownModelType {
                path: config_path,
                model_type,
            })
        }
    };
    let tok_path = dir.join("tokenizer.json");
    let (tokenizer, tokenizer_path) = if tok_path.is_file() {
        let t = Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer {
            path: tok_path.clone(),
            detail: e.to_string(),
        })?;
        (Some(t), Some(tok_path))
    } else {
        tracing::debug!("{}: no tokenizer.json", dir.display());
        (None, None)
    };
    Ok(LoadedModel {
        model,
        tokenizer,
        origin: dir.to_path_buf(),
        tokenizer_path,
    })
}

/// Open a llama-family GGUF: weights dequantised to f32, q/k un-permuted, tokenizer
/// rebuilt from the metadata.
pub fn load_gguf(path: &Path, device: &Device) -> Result<LoadedModel, ModelError> {
    load_gguf_with(path, device, DType::F32, None)
}

/// [`load_gguf`] with the weights dequantised into `dtype`, optionally randomly
/// re-initialised (σ = 0.02; see [`load_source_with`]).
pub fn load_gguf_with(
    path: &Path,
    device: &Device,
    dtype: DType,
    random_init: Option<u64>,
) -> Result<LoadedModel, ModelError> {
    check_model_dtype(path, dtype)?;
    if !path.is_file() {
        return Err(ModelError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "GGUF file not found"),
        });
    }
    let (model, tokenizer) = super::gguf::load_llama_with(path, device, dtype, random_init)?;
    Ok(LoadedModel {
        model: Box::new(model),
        tokenizer: Some(tokenizer),
        origin: path.to_path_buf(),
        tokenizer_path: Some(path.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            "local:/m".parse::<ModelSource>().unwrap(),
            ModelSource::Local { dir: "/m".into() }
        );
        assert_eq!(
            "gguf:a.gguf".parse::<ModelSource>().unwrap(),
            ModelSource::Gguf {
                file: "a.gguf".into()
            }
        );
        assert_eq!(
            "EleutherAI/pythia-70m@abc".parse::<ModelSource>().unwrap(),
            ModelSource::Hub {
                repo: "EleutherAI/pythia-70m".into(),
                revision: Some("abc".into())
            }
        );
        for bad in ["local:", "pythia", "a/b/c", "a/b@", "http://x/y"] {
            assert!(bad.parse::<ModelSource>().is_err(), "{bad}");
        }
    }
}
