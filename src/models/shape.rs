//! A model's shape without its weights: the parameter count the model constructors ask
//! for, from a `config.json` text or a GGUF's metadata (`saepipe plan`).
//!
//! Decision: the count is what [`GptNeoX::new`] / [`Llama::new`] request from a
//! [`Weights::synthetic`] store that answers with zero-stride broadcasts (no memory), so
//! it follows the model files exactly (tied embeddings counted once) instead of a second
//! copy of each architecture's formula.

use std::path::Path;

use candle_core::{DType, Device};

use super::error::ModelError;
use super::gpt_neox::{GptNeoX, GptNeoXConfig};
use super::llama::{Llama, LlamaConfig};
use super::weights::Weights;
use super::{HookedModel, ModelInfo};

/// The architecture config a shape was read from (what [`ModelShape::random_model`] builds).
#[derive(Debug, Clone)]
pub enum ArchShape {
    /// GPT-NeoX (Pythia).
    GptNeoX(GptNeoXConfig),
    /// Llama family (Llama, SmolLM3, GGUF llama).
    Llama(LlamaConfig),
}

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
    /// The config it was read from.
    pub arch: ArchShape,
}

impl ModelShape {
    /// A model of this shape with only `blocks` blocks and a vocabulary of `vocab` (both
    /// clamped to at least 1), random weights (seeded; σ 0.02) in `dtype` on `device`
    /// (module doc). Special-token ids outside the smaller vocabulary are dropped.
    pub fn random_model(
        &self,
        blocks: usize,
        vocab: usize,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Box<dyn HookedModel>, ModelError> {
        let (blocks, vocab) = (blocks.max(1), vocab.max(1) as u32);
        let keep = |id: Option<u32>| id.filter(|&i| i < vocab);
        let origin = Path::new("(calibration model)");
        match &self.arch {
            ArchShape::GptNeoX(c) => {
                let mut c = c.clone();
                c.num_hidden_layers = blocks;
                c.vocab_size = vocab as usize;
                c.bos_token_id = keep(c.bos_token_id);
                c.pad_token_id = keep(c.pad_token_id);
                c.eos_token_id = None;
                let w = Weights::synthetic(origin, "gpt_neox", device, Some((seed, 0.02)))
                    .with_dtype(dtype);
                Ok(Box::new(GptNeoX::new(&c, &w)?))
            }
            ArchShape::Llama(c) => {
                let mut c = c.clone();
                c.num_hidden_layers = blocks;
                c.vocab_size = vocab as usize;
                if let Some(v) = &mut c.no_rope_layers {
                    v.truncate(blocks);
                }
                c.bos_token_id = keep(c.bos_token_id);
                c.pad_token_id = keep(c.pad_token_id);
                c.eos_token_id = None;
                let w = Weights::synthetic(origin, &c.model_type, device, Some((seed, 0.02)))
                    .with_dtype(dtype);
                Ok(Box::new(Llama::new(&c, &w)?))
            }
        }
    }
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
                arch: ArchShape::GptNeoX(cfg),
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
        arch: ArchShape::Llama(cfg.clone()),
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

    #[test]
    fn the_calibration_model_has_the_real_block_and_fewer_of_them() {
        let text = r#"{"model_type":"smollm3","vocab_size":128256,"hidden_size":64,
            "intermediate_size":96,"num_hidden_layers":36,"num_attention_heads":4,
            "num_key_value_heads":2,"tie_word_embeddings":true,"bos_token_id":128000,
            "no_rope_layers":[1,1,1,0,1,1,1,0,1,1,1,0,1,1,1,0,1,1,1,0,1,1,1,0,1,1,1,0,1,1,1,0,1,1,1,0]}"#;
        let s = super::shape_of_config(std::path::Path::new("config.json"), text).unwrap();
        let dev = candle_core::Device::Cpu;
        let m = s
            .random_model(1, 100, candle_core::DType::F32, &dev, 0)
            .unwrap();
        assert_eq!(
            (m.info().n_layers, m.info().d_model, m.info().vocab_size),
            (1, 64, 100)
        );
        assert_eq!(
            m.info().bos_token_id,
            None,
            "an id beyond the cut vocabulary is dropped"
        );
        let ids = candle_core::Tensor::zeros((1, 5), candle_core::DType::U32, &dev).unwrap();
        let logits = m
            .forward_hooked(&ids, &mut crate::models::NoHooks, None)
            .unwrap()
            .unwrap();
        assert_eq!(logits.dims(), &[1, 5, 100]);
    }
}
