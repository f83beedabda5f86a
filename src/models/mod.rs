//! Hookable transformer forward passes, written in candle.
//!
//! Implements `../shared/specs/pipeline.md` §3 and §5. One file per Hugging Face
//! `model_type` family: [`gpt_neox`] (Pythia) and [`llama`] (llama, smollm3; SmolLM2 GGUF).
//! Every model exposes the six sites of [`hooks::Site`] at every layer through
//! [`HookedModel::forward_hooked`], can replace any of them, and stops after the deepest
//! block a caller needs.

pub mod device;
pub mod error;
pub mod gguf;
pub mod gpt_neox;
pub mod hooks;
pub mod llama;
pub mod load;
pub mod mlp;
pub(crate) mod nn;
pub mod pickle;
pub mod shape;
pub mod st_file;
pub mod weights;

use candle_core::{DType, Device, Tensor};

pub use device::{parse_model_dtype, DeviceError, DeviceSpec};
pub use error::{IndexError, ModelError, SUPPORTED_MODEL_TYPES};
pub use hooks::{Hookpoint, HookpointError, Hooks, NoHooks, Recorder, Replace, Site};
pub use load::{
    load_dir, load_dir_with, load_gguf, load_gguf_with, load_source, load_source_with, LoadedModel,
    ModelSource,
};
pub use mlp::{MlpAct, MlpError, MlpKind, MlpWeights};
pub use nn::{OneOrMany, RopeParameters};
pub use weights::index_shard_names;

/// The device forward passes run on: the first CUDA GPU when built with the `cuda`
/// feature and one is present, else the CPU.
pub fn default_device() -> Device {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::cuda_if_available(0) {
            return d;
        }
    }
    Device::Cpu
}

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelInfo {
    /// The Hugging Face `model_type` (`gpt_neox`, `llama`, `smollm3`).
    pub model_type: String,
    /// Number of transformer blocks.
    pub n_layers: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Vocabulary size (rows of the unembedding).
    pub vocab_size: usize,
    /// BOS token id, when the config or tokenizer names one.
    pub bos_token_id: Option<u32>,
    /// EOS token id(s), when the config or tokenizer names them.
    pub eos_token_ids: Vec<u32>,
    /// PAD token id, when known.
    pub pad_token_id: Option<u32>,
}

/// A transformer whose forward pass reports its hook sites.
///
/// `&self` and no KV cache: capture and CE-loss evaluation only need full-context
/// forwards, so one model can be shared between threads.
pub trait HookedModel: Send + Sync {
    /// Shape and special tokens of the model.
    fn info(&self) -> &ModelInfo;

    /// The sites this architecture exposes (every model here exposes all six; the
    /// doc comment of each model file says what each means there).
    fn sites(&self) -> &'static [Site] {
        &Site::ALL
    }

    /// The device the weights live on.
    fn device(&self) -> &Device;

    /// The dtype of the weights and of the activations the hooks see (f32, bf16 or f16).
    /// Norms and attention softmax are computed in f32 whatever this is, as transformers
    /// does; logits are returned in f32.
    fn dtype(&self) -> DType {
        DType::F32
    }

    /// The context length the model was trained for (`max_position_embeddings`), when
    /// known; longer inputs still run but are out of distribution.
    fn max_positions(&self) -> Option<usize> {
        None
    }

    /// Run the model on `ids` of shape `(batch, seq)` (u32), visiting every hookpoint
    /// `hooks` wants. With `stop_after = Some(l)` the pass ends after block `l` and returns
    /// `None`; otherwise it runs to the end and returns the logits `(batch, seq, vocab)`
    /// in f32.
    fn forward_hooked(
        &self,
        ids: &Tensor,
        hooks: &mut dyn Hooks,
        stop_after: Option<usize>,
    ) -> candle_core::Result<Option<Tensor>>;

    /// Block `layer`'s MLP as plain f32 matrices (`mlp_in` → `mlp_out`), for the Jacobian
    /// SAEs of `crate::jsae`: host copies of the weights, widened from the model dtype (a
    /// bf16 model's rounded values), whatever the device.
    fn mlp_weights(&self, layer: usize) -> Result<MlpWeights, MlpError> {
        let _ = layer;
        Err(MlpError::Unsupported {
            model_type: self.info().model_type.clone(),
        })
    }

    /// Check that `hp` exists in this model, with an error that names the fix.
    fn check_hookpoint(&self, hp: Hookpoint) -> Result<(), HookpointError> {
        let info = self.info();
        if hp.layer >= info.n_layers {
            return Err(HookpointError::LayerOutOfRange {
                hookpoint: hp.to_string(),
                layer: hp.layer,
                n_layers: info.n_layers,
            });
        }
        if !self.sites().contains(&hp.site) {
            return Err(HookpointError::SiteUnavailable {
                hookpoint: hp.to_string(),
                site: hp.site.to_string(),
                model_type: info.model_type.clone(),
                available: self
                    .sites()
                    .iter()
                    .map(|s| s.name())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(())
    }
}
