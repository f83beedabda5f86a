//! A model's shape without its weights: the parameter count the model constructors ask
//! for, from a `config.json` text or a GGUF's metadata (`saepipe plan`).
//!
//! Decision: the count is what [`GptNeoX::new`] / [`Llama::new`] request from a
//! [`Weights::synthetic`] store that answers with zero-stride broadcasts (no memory), so
//! it follows the model files exactly (tied embeddings counted once) instead of a second
//! copy of each architecture's formula.

use std::path::Path;

use candle_core::Device;

use super::error::ModelError;
use super::gpt_neox::{GptNeoX, GptNeoXConfig};
use super::llama::{Llama, LlamaConfig};
use super::weights::Weights;
use super::ModelInfo;

/// What a model is, without its weights.
#[derive(Debug, Clone)]
pub struct ModelShape {
    /// The model's info (layers, width, vocabulary).
    pub info: ModelInfo,
    /// Parameters (values of every weight tensor the forward pass holds).
    pub params: u64,
    /// MLP width.
    pub intermediate_size: usize,
    /// Attention heads.
    pub n_heads: usize,
}

/// The shape of the model a `config.json` text describes (`path` names it in errors).
pub fn shape_of_config(path: &Path, text: &str) -> Result<ModelShape, ModelError> {
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|source| ModelError::malformed_config(path, text, source))?;
    let model_type = json
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("(missing)")
        .to_string();
    let malformed = |source| ModelError::malformed_config(path, text, source);
    let w = Weights::synthetic(path, &model_type, &Device::Cpu, None);
    match model_type.as_str() {
        "gpt_neox" => {
            let cfg: GptNeoXConfig = serde_json::from_str(text).map_err(malformed)?;
            cfg.validate(path)?;
            let m = GptNeoX::new(&cfg, &w)?;
            Ok(ModelShape {
                info: super::HookedModel::info(&m).clone(),
                params: w.requested_values(),
                intermediate_size: cfg.intermediate_size,
                n_heads: cfg.num_attention_heads,
            })
        }
        "llama" | "smollm3" => {
            let cfg: LlamaConfig = serde_json::from_str(text).map_err(malformed)?;
            cfg.validate(path)?;
            shape_of_llama(&cfg, &w)
        }
        _ => Err(ModelError::UnknownModelType {
            path: path.to_path_buf(),
            model_type,
        }),
    }
}

/// The shape of a llama-family GGUF, from its metadata (no tensor is read).
pub fn shape_of_gguf(path: &Path) -> Result<ModelShape, ModelError> {
    let content = super::gguf::read_content(path)?;
    super::gguf::check_architecture(path, &content)?;
    let cfg = super::gguf::llama_config(path, &content)?;
    shape_of_llama(
        &cfg,
        &Weights::synthetic(path, "llama (GGUF)", &Device::Cpu, None),
    )
}

fn shape_of_llama(cfg: &LlamaConfig, w: &Weights) -> Result<ModelShape, ModelError> {
    let m = Llama::new(cfg, w)?;
    Ok(ModelShape {
        info: super::HookedModel::info(&m).clone(),
        params: w.requested_values(),
        intermediate_size: cfg.intermediate_size,
        n_heads: cfg.num_attention_heads,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn pythia_1b_has_its_published_parameter_count() {
        let text = r#"{"model_type":"gpt_neox","vocab_size":50304,"hidden_size":2048,
            "num_hidden_layers":16,"num_attention_heads":8,"intermediate_size":8192,
            "hidden_act":"gelu","rotary_pct":0.25,"layer_norm_eps":1e-5,
            "use_parallel_residual":true,"tie_word_embeddings":false}"#;
        let s = super::shape_of_config(std::path::Path::new("config.json"), text).unwrap();
        assert_eq!(s.params, 1_011_781_632);
        assert_eq!((s.info.n_layers, s.info.d_model), (16, 2048));
    }
}
