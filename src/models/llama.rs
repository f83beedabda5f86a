//! Llama-family decoders with hook sites, in candle: Hugging Face `model_type = "llama"`
//! (SmolLM2, also from a GGUF) and `"smollm3"` (SmolLM3, with NoPE layers).
//!
//! Implements `../shared/specs/pipeline.md` §3 and §5. References: transformers
//! `models/llama/modeling_llama.py`, `models/smollm3/{configuration,modeling}_smollm3.py`,
//! and candle-transformers `models/smol/smollm3.rs` (whose `should_skip_rope` this follows).
//!
//! Key characteristics:
//! - RMSNorm (`rms_norm_eps`), pre-norm blocks, SwiGLU MLP (`down(act(gate(x)) · up(x))`).
//! - Grouped-query attention (`num_key_value_heads`), rotate-half RoPE with `rope_theta`
//!   (no `rope_scaling`), optional `head_dim`, optional biases (`attention_bias`, `mlp_bias`).
//! - Tied embeddings when `tie_word_embeddings` (SmolLM2/3).
//! - SmolLM3 NoPE: layer `i` uses RoPE iff `no_rope_layers[i] == 1`; when the config has no
//!   `no_rope_layers`, transformers' `SmolLM3Config` derives it as
//!   `int((i + 1) % no_rope_layer_interval != 0)` with `no_rope_layer_interval` defaulting to 4.
//!
//! Sites: `resid_mid = resid_pre + attn_out`, `mlp_in = post_attention_layernorm(resid_mid)`;
//! replacements flow onward (`resid_post = resid_mid + mlp_out`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, Module};

use super::error::ModelError;
use super::hooks::{Hookpoint, Hooks, Site};
use super::mlp::{MlpError, MlpKind, MlpWeights};
use super::nn::{self, Act, OneOrMany, Rope, RopeParameters};
use super::weights::Weights;
use super::{HookedModel, ModelInfo};

fn default_hidden_act() -> String {
    "silu".into()
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}

/// `config.json` of a Llama or SmolLM3 checkpoint; field names are Hugging Face's.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct LlamaConfig {
    /// `llama` or `smollm3`.
    pub model_type: String,
    /// Rows of `embed_tokens`.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation (`silu`).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// RMSNorm epsilon.
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (llama default 10000, smollm3 default 2e6).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers ≥ 5 spelling of `rope_theta` / `rope_scaling`.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Must be absent/null: scaled RoPE is not implemented.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Whether `lm_head` is `embed_tokens` (llama default false, smollm3 default true).
    #[serde(default)]
    pub tie_word_embeddings: Option<bool>,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on gate/up/down.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Context length the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    /// SmolLM3: per layer, 1 = RoPE, 0 = NoPE.
    #[serde(default)]
    pub no_rope_layers: Option<Vec<u8>>,
    /// SmolLM3: every `interval`-th layer is NoPE when `no_rope_layers` is absent (default 4).
    #[serde(default)]
    pub no_rope_layer_interval: Option<usize>,
    /// Must be false: sliding-window attention is not implemented.
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
    /// BOS id.
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    /// EOS id(s).
    #[serde(default)]
    pub eos_token_id: Option<OneOrMany>,
    /// PAD id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl LlamaConfig {
    fn is_smollm3(&self) -> bool {
        self.model_type == "smollm3"
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RoPE base.
    pub fn rope_theta(&self) -> f64 {
        self.rope_theta
            .or(self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(if self.is_smollm3() {
                2_000_000.0
            } else {
                10_000.0
            })
    }

    /// Whether `lm_head` shares `embed_tokens`.
    pub fn tied(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(self.is_smollm3())
    }

    /// Whether layer `i` applies RoPE (false only for SmolLM3's NoPE layers), following
    /// transformers' `SmolLM3Config.no_rope_layers`.
    pub fn uses_rope(&self, i: usize) -> bool {
        if !self.is_smollm3() {
            return true;
        }
        match &self.no_rope_layers {
            Some(v) => v.get(i).is_none_or(|&x| x != 0),
            None => !(i + 1).is_multiple_of(self.no_rope_layer_interval.unwrap_or(4).max(1)),
        }
    }

    /// Reject settings this forward pass does not implement, naming the key and the fix.
    pub fn validate(&self, path: &Path) -> Result<(), ModelError> {
        self.checked_act(path).map(|_| ())
    }

    /// [`Self::validate`], returning the MLP activation.
    pub(crate) fn checked_act(&self, path: &Path) -> Result<Act, ModelError> {
        let unsupported = |key: &str, value: String, fix: &str| ModelError::UnsupportedConfig {
            path: path.to_path_buf(),
            key: key.into(),
            value,
            fix: fix.into(),
        };
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(unsupported(
                "num_key_value_heads",
                kv.to_string(),
                "num_attention_heads must be a positive multiple of num_key_value_heads",
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(unsupported(
                "num_hidden_layers",
                "0".into(),
                "need at least one layer",
            ));
        }
        if self.head_dim() == 0 || !self.head_dim().is_multiple_of(2) {
            return Err(unsupported(
                "head_dim",
                self.head_dim().to_string(),
                "RoPE needs an even, positive head_dim",
            ));
        }
        if let Some(v) = &self.no_rope_layers {
            if v.len() != self.num_hidden_layers {
                return Err(unsupported(
                    "no_rope_layers",
                    format!("a list of {} entries", v.len()),
                    "it needs one 0/1 entry per layer (num_hidden_layers)",
                ));
            }
        }
        if self.use_sliding_window == Some(true) {
            return Err(unsupported(
                "use_sliding_window",
                "true".into(),
                "sliding-window attention is not implemented; set it to false",
            ));
        }
        nn::check_plain_rope(path, &self.rope_scaling, &self.rope_parameters)?;
        Act::from_hf(&self.hidden_act).ok_or_else(|| {
            unsupported(
                "hidden_act",
                self.hidden_act.clone(),
                "supported activations: silu, gelu, gelu_new, gelu_pytorch_tanh, relu",
            )
        })
    }
}

/// One decoder block.
#[derive(Debug, Clone)]
struct Block {
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    rope: bool,
}

/// A Llama-family model with hook sites at every block.
pub struct Llama {
    info: ModelInfo,
    device: Device,
    dtype: DType,
    embed_tokens: Tensor,
    layers: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    rope: Rope,
    act: Act,
    eps: f32,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    max_positions: Option<usize>,
}

impl Llama {
    /// Build the model from `cfg` and the checkpoint's tensors (HF names), checking every
    /// shape against the config.
    pub fn new(cfg: &LlamaConfig, w: &Weights) -> Result<Self, ModelError> {
        let act = cfg.checked_act(w.origin())?;
        let (d, ff, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let (ab, mb) = (cfg.attention_bias, cfg.mlp_bias);
        let embed_tokens = w.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Block {
                input_layernorm: w.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                post_attention_layernorm: w
                    .get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                q_proj: nn::linear(w, &format!("{p}.self_attn.q_proj"), d, nh * hd, ab)?,
                k_proj: nn::linear(w, &format!("{p}.self_attn.k_proj"), d, nkv * hd, ab)?,
                v_proj: nn::linear(w, &format!("{p}.self_attn.v_proj"), d, nkv * hd, ab)?,
                o_proj: nn::linear(w, &format!("{p}.self_attn.o_proj"), nh * hd, d, ab)?,
                gate_proj: nn::linear(w, &format!("{p}.mlp.gate_proj"), d, ff, mb)?,
                up_proj: nn::linear(w, &format!("{p}.mlp.up_proj"), d, ff, mb)?,
                down_proj: nn::linear(w, &format!("{p}.mlp.down_proj"), ff, d, mb)?,
                rope: cfg.uses_rope(i),
            });
        }
        let norm = w.get("model.norm.weight", &[d])?;
        let lm_head = if cfg.tied() {
            Linear::new(embed_tokens.clone(), None)
        } else {
            Linear::new(w.get("lm_head.weight", &[cfg.vocab_size, d])?, None)
        };
        Ok(Self {
            info: ModelInfo {
                model_type: cfg.model_type.clone(),
                n_layers: cfg.num_hidden_layers,
                d_model: d,
                vocab_size: cfg.vocab_size,
                bos_token_id: cfg.bos_token_id,
                eos_token_ids: OneOrMany::to_vec(&cfg.eos_token_id),
                pad_token_id: cfg.pad_token_id,
            },
            device: w.device().clone(),
            dtype: w.dtype(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            rope: Rope::new(hd, cfg.rope_theta()),
            act,
            eps: cfg.rms_norm_eps as f32,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            max_positions: cfg.max_position_embeddings,
        })
    }

    /// Self-attention of one block on the normed input `h: (b, l, d)` -> `(b, l, d)`.
    fn attention(
        &self,
        blk: &Block,
        h: &Tensor,
        rope: &(Tensor, Tensor),
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = h.dims3()?;
        let hd = self.head_dim;
        // 1. Projections, viewed per head: (b, l, heads, hd).
        let q = blk.q_proj.forward(h)?.reshape((b, l, self.n_heads, hd))?;
        let k = blk
            .k_proj
            .forward(h)?
            .reshape((b, l, self.n_kv_heads, hd))?;
        let v = blk
            .v_proj
            .forward(h)?
            .reshape((b, l, self.n_kv_heads, hd))?;
        // 2. RoPE in the (b, l, heads, hd) layout (skipped on SmolLM3 NoPE layers).
        let (q, k) = if blk.rope {
            let (cos, sin) = rope;
            (
                candle_nn::rotary_emb::rope_thd(&q, cos, sin)?,
                candle_nn::rotary_emb::rope_thd(&k, cos, sin)?,
            )
        } else {
            (q, k)
        };
        // 3. Heads first: (b, heads, l, hd), contiguous for the batched matmuls.
        let q = q.transpose(1, 2)?.contiguous()?;
        let k = k.transpose(1, 2)?.contiguous()?;
        let v = v.transpose(1, 2)?.contiguous()?;
        // 4. Causal GQA attention, scale 1/sqrt(head_dim): (b, l, heads·hd).
        let ctx = nn::attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?;
        // 5. Output projection.
        blk.o_proj.forward(&ctx)
    }

    /// SwiGLU MLP: `down(act(gate(x)) · up(x))`.
    fn mlp(&self, blk: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = self.act.apply(&blk.gate_proj.forward(x)?)?;
        let up = blk.up_proj.forward(x)?;
        blk.down_proj.forward(&(gate * up)?)
    }
}

impl HookedModel for Llama {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn max_positions(&self) -> Option<usize> {
        self.max_positions
    }

    fn mlp_weights(&self, layer: usize) -> Result<MlpWeights, MlpError> {
        let blk = self.layers.get(layer).ok_or(MlpError::Layer {
            layer,
            n_layers: self.layers.len(),
        })?;
        MlpWeights::from_linears(
            MlpKind::Gated,
            self.act.into(),
            &[&blk.gate_proj, &blk.up_proj],
            &blk.down_proj,
        )
        .map_err(|source| MlpError::Candle { layer, source })
    }

    /// # Shapes
    /// `ids: (b, l)` u32 -> logits `(b, l, vocab)` f32 (or `None` when stopped early);
    /// the hooks see `(b, l, d)` activations in the model dtype.
    fn forward_hooked(
        &self,
        ids: &Tensor,
        hooks: &mut dyn Hooks,
        stop_after: Option<usize>,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_b, l, last) = nn::check_inputs(ids, stop_after, self.layers.len())?;
        // 1. Embeddings: (b, l, d).
        let mut x = nn::embed(&self.embed_tokens, ids)?;
        // 2. Position tables and causal mask, shared by all blocks.
        let rope = self.rope.tables(l, &self.device, self.dtype)?;
        let mask = nn::causal_mask(l, &self.device)?;
        // 3. Blocks 0..=last.
        for (i, blk) in self.layers.iter().enumerate().take(last + 1) {
            let hp = |site| Hookpoint::new(i, site);
            let resid_pre = nn::visit(hooks, hp(Site::ResidPre), x)?;
            let h = nn::rms_norm(&resid_pre, &blk.input_layernorm, self.eps)?;
            let attn_out = nn::visit(
                hooks,
                hp(Site::AttnOut),
                self.attention(blk, &h, &rope, &mask)?,
            )?;
            let resid_mid = nn::visit(hooks, hp(Site::ResidMid), (&resid_pre + &attn_out)?)?;
            let mlp_in = nn::visit(
                hooks,
                hp(Site::MlpIn),
                nn::rms_norm(&resid_mid, &blk.post_attention_layernorm, self.eps)?,
            )?;
            let mlp_out = nn::visit(hooks, hp(Site::MlpOut), self.mlp(blk, &mlp_in)?)?;
            x = nn::visit(hooks, hp(Site::ResidPost), (&resid_mid + &mlp_out)?)?;
        }
        if stop_after.is_some() {
            return Ok(None);
        }
        // 4. Final norm and unembedding: (b, l, vocab).
        let x = nn::rms_norm(&x, &self.norm, self.eps)?;
        Ok(Some(self.lm_head.forward(&x)?.to_dtype(DType::F32)?))
    }
}
