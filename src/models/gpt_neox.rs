//! GPT-NeoX (Pythia) with hook sites, in candle.
//!
//! Implements `../shared/specs/pipeline.md` §3 for Hugging Face `model_type = "gpt_neox"`.
//! Reference: transformers `models/gpt_neox/modeling_gpt_neox.py` (`GPTNeoXAttention`,
//! `GPTNeoXLayer`); candle-transformers has no GPT-NeoX, so this follows the house style of
//! its `stable_lm.rs` (partial rotary, LayerNorm) and `phi.rs` (parallel blocks).
//!
//! Key characteristics:
//! - LayerNorm with bias (`layer_norm_eps`), biased linears everywhere (`attention_bias`).
//! - Fused QKV laid out per head: the output of `query_key_value` is viewed as
//!   `(b, l, heads, 3·head_dim)` and split into q, k, v *after* that reshape.
//! - Partial rotary (`rotary_pct`, `rotary_emb_base`): rotate-half RoPE over the first
//!   `rot_dim = int(head_dim · rotary_pct)` dims of each head; the rest pass through.
//! - Parallel residual (`use_parallel_residual = true`, the Pythia default):
//!   `out = x + attn(ln1(x)) + mlp(ln2(x))`; sequential when false.
//! - GELU MLP (`hidden_act`, exact erf for `"gelu"`), untied `embed_out` unless
//!   `tie_word_embeddings`.
//!
//! Decision (pipeline.md §3, parallel residual): `resid_mid := resid_pre + attn_out`. The MLP
//! of a parallel block does not read it; `mlp_in = post_attention_layernorm(resid_pre)`.
//! `resid_post` is computed as `resid_mid + mlp_out`, so a hook that replaces `resid_mid`
//! (or `attn_out`, or `mlp_out`) changes `resid_post` and everything after it. All six
//! sites are therefore exposed. In a sequential block the sites mean what they mean in
//! Llama: `mlp_in = post_attention_layernorm(resid_mid)`.

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
    "gelu".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}

/// `config.json` of a GPT-NeoX checkpoint; field names are Hugging Face's.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct GptNeoXConfig {
    /// Rows of `embed_in` / `embed_out`.
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// Number of blocks.
    pub num_hidden_layers: usize,
    /// Attention heads (`head_dim = hidden_size / num_attention_heads`).
    pub num_attention_heads: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// MLP activation (`gelu` = exact erf GELU).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Fraction of each head's dims that are rotated (default 0.25).
    #[serde(default)]
    pub rotary_pct: Option<f64>,
    /// RoPE base (default 10000).
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    /// transformers ≥ 5 spelling of the two RoPE keys above.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Must be absent/null: scaled RoPE is not implemented.
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// LayerNorm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Parallel (true, Pythia) or sequential residual.
    #[serde(default = "default_true")]
    pub use_parallel_residual: bool,
    /// Whether `embed_out` is `embed_in` (false for Pythia).
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether the attention linears have biases (default true).
    #[serde(default = "default_true")]
    pub attention_bias: bool,
    /// Context length the model was trained for.
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
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

impl GptNeoXConfig {
    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Rotated dims per head: `int(head_dim · rotary_pct)`, as transformers truncates.
    pub fn rot_dim(&self) -> usize {
        let pct = self
            .rotary_pct
            .or(self
                .rope_parameters
                .as_ref()
                .and_then(|p| p.partial_rotary_factor))
            .unwrap_or(0.25);
        (self.head_dim() as f64 * pct) as usize
    }

    /// RoPE base.
    pub fn rope_theta(&self) -> f64 {
        self.rotary_emb_base
            .or(self.rope_parameters.as_ref().and_then(|p| p.rope_theta))
            .unwrap_or(10000.0)
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
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(unsupported(
                "num_attention_heads",
                self.num_attention_heads.to_string(),
                "hidden_size must be a positive multiple of num_attention_heads",
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(unsupported(
                "num_hidden_layers",
                "0".into(),
                "need at least one layer",
            ));
        }
        if !self.rot_dim().is_multiple_of(2) {
            return Err(unsupported(
                "rotary_pct",
                format!("{:?}", self.rotary_pct),
                "head_dim · rotary_pct must be even",
            ));
        }
        nn::check_plain_rope(path, &self.rope_scaling, &self.rope_parameters)?;
        Act::from_hf(&self.hidden_act).ok_or_else(|| {
            unsupported(
                "hidden_act",
                self.hidden_act.clone(),
                "supported activations: gelu, gelu_new, gelu_fast, gelu_pytorch_tanh, silu, relu",
            )
        })
    }
}

/// LayerNorm weights and epsilon. The weights are kept in f32 (the model dtype's values,
/// widened), since the norm itself runs in f32 ([`nn::layer_norm`]).
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn load(w: &Weights, prefix: &str, d: usize, eps: f64) -> Result<Self, ModelError> {
        let f32_of = |name: String| -> Result<Tensor, ModelError> {
            w.get(&name, &[d])?
                .to_dtype(DType::F32)
                .map_err(ModelError::candle(w.origin()))
        };
        Ok(Self {
            weight: f32_of(format!("{prefix}.weight"))?,
            bias: f32_of(format!("{prefix}.bias"))?,
            eps: eps as f32,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        nn::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// One GPT-NeoX block.
#[derive(Debug, Clone)]
struct Block {
    input_layernorm: LayerNorm,
    post_attention_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
}

/// A GPT-NeoX model with hook sites at every block.
pub struct GptNeoX {
    info: ModelInfo,
    device: Device,
    dtype: DType,
    embed_in: Tensor,
    layers: Vec<Block>,
    final_layer_norm: LayerNorm,
    embed_out: Linear,
    rope: Rope,
    act: Act,
    n_heads: usize,
    head_dim: usize,
    parallel: bool,
    max_positions: Option<usize>,
}

impl GptNeoX {
    /// Build the model from `cfg` and the checkpoint's tensors (HF names), checking every
    /// shape against the config.
    pub fn new(cfg: &GptNeoXConfig, w: &Weights) -> Result<Self, ModelError> {
        let act = cfg.checked_act(w.origin())?;
        let (d, ff, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim());
        let eps = cfg.layer_norm_eps;
        let bias = cfg.attention_bias;
        let embed_in = w.get("gpt_neox.embed_in.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("gpt_neox.layers.{i}");
            layers.push(Block {
                input_layernorm: LayerNorm::load(w, &format!("{p}.input_layernorm"), d, eps)?,
                post_attention_layernorm: LayerNorm::load(
                    w,
                    &format!("{p}.post_attention_layernorm"),
                    d,
                    eps,
                )?,
                query_key_value: nn::linear(
                    w,
                    &format!("{p}.attention.query_key_value"),
                    d,
                    3 * d,
                    bias,
                )?,
                dense: nn::linear(w, &format!("{p}.attention.dense"), d, d, bias)?,
                dense_h_to_4h: nn::linear(w, &format!("{p}.mlp.dense_h_to_4h"), d, ff, true)?,
                dense_4h_to_h: nn::linear(w, &format!("{p}.mlp.dense_4h_to_h"), ff, d, true)?,
            });
        }
        let final_layer_norm = LayerNorm::load(w, "gpt_neox.final_layer_norm", d, eps)?;
        let embed_out = if cfg.tie_word_embeddings {
            Linear::new(embed_in.clone(), None)
        } else {
            Linear::new(w.get("embed_out.weight", &[cfg.vocab_size, d])?, None)
        };
        Ok(Self {
            info: ModelInfo {
                model_type: "gpt_neox".into(),
                n_layers: cfg.num_hidden_layers,
                d_model: d,
                vocab_size: cfg.vocab_size,
                bos_token_id: cfg.bos_token_id,
                eos_token_ids: OneOrMany::to_vec(&cfg.eos_token_id),
                pad_token_id: cfg.pad_token_id,
            },
            device: w.device().clone(),
            dtype: w.dtype(),
            embed_in,
            layers,
            final_layer_norm,
            embed_out,
            rope: Rope::new(cfg.rot_dim(), cfg.rope_theta()),
            act,
            n_heads: cfg.num_attention_heads,
            head_dim: hd,
            parallel: cfg.use_parallel_residual,
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
        let (nh, hd) = (self.n_heads, self.head_dim);
        // 1. Fused projection, viewed per head: (b, l, 3d) -> (b, nh, l, 3·hd).
        let qkv = blk
            .query_key_value
            .forward(h)?
            .reshape((b, l, nh, 3 * hd))?
            .transpose(1, 2)?;
        // 2. Split after the head reshape: each (b, nh, l, hd).
        let q = qkv.narrow(3, 0, hd)?;
        let k = qkv.narrow(3, hd, hd)?;
        let v = qkv.narrow(3, 2 * hd, hd)?.contiguous()?;
        // 3. Rotate the first rot_dim dims of q and k; pass the rest through.
        let q = self.partial_rope(&q, rope)?;
        let k = self.partial_rope(&k, rope)?;
        // 4. Causal attention, scale 1/sqrt(head_dim): (b, l, d).
        let ctx = nn::attention(&q, &k, &v, mask, 1.0 / (hd as f64).sqrt())?;
        // 5. Output projection.
        blk.dense.forward(&ctx)
    }

    /// Rotate-half RoPE over the first `rot_dim` dims of `x: (b, nh, l, hd)`; contiguous out.
    fn partial_rope(
        &self,
        x: &Tensor,
        (cos, sin): &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let rot = self.rope.rot_dim;
        let hd = self.head_dim;
        if rot == 0 {
            return x.contiguous();
        }
        if rot == hd {
            return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
        }
        let x_rot = candle_nn::rotary_emb::rope(&x.narrow(3, 0, rot)?.contiguous()?, cos, sin)?;
        let x_pass = x.narrow(3, rot, hd - rot)?;
        // candle's cat along a non-leading dim may return a strided view; the matmuls need
        // contiguous operands.
        Tensor::cat(&[&x_rot, &x_pass], 3)?.contiguous()
    }

    /// MLP: `dense_4h_to_h(act(dense_h_to_4h(x)))`.
    fn mlp(&self, blk: &Block, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.act.apply(&blk.dense_h_to_4h.forward(x)?)?;
        blk.dense_4h_to_h.forward(&h)
    }
}

impl HookedModel for GptNeoX {
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
            MlpKind::Plain,
            self.act.into(),
            &[&blk.dense_h_to_4h],
            &blk.dense_4h_to_h,
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
        let mut x = nn::embed(&self.embed_in, ids)?;
        // 2. Position tables and causal mask, shared by all blocks.
        let rope = self.rope.tables(l, &self.device, self.dtype)?;
        let mask = nn::causal_mask(l, &self.device)?;
        // 3. Blocks 0..=last.
        for (i, blk) in self.layers.iter().enumerate().take(last + 1) {
            let hp = |site| Hookpoint::new(i, site);
            let resid_pre = nn::visit(hooks, hp(Site::ResidPre), x)?;
            let h = blk.input_layernorm.forward(&resid_pre)?;
            let attn_out = nn::visit(
                hooks,
                hp(Site::AttnOut),
                self.attention(blk, &h, &rope, &mask)?,
            )?;
            let resid_mid = nn::visit(hooks, hp(Site::ResidMid), (&resid_pre + &attn_out)?)?;
            // Parallel: the MLP reads resid_pre, not resid_mid (see the module docs).
            let mlp_src = if self.parallel {
                &resid_pre
            } else {
                &resid_mid
            };
            let mlp_in = nn::visit(
                hooks,
                hp(Site::MlpIn),
                blk.post_attention_layernorm.forward(mlp_src)?,
            )?;
            let mlp_out = nn::visit(hooks, hp(Site::MlpOut), self.mlp(blk, &mlp_in)?)?;
            x = nn::visit(hooks, hp(Site::ResidPost), (&resid_mid + &mlp_out)?)?;
        }
        if stop_after.is_some() {
            return Ok(None);
        }
        // 4. Final norm and unembedding: (b, l, vocab).
        let x = self.final_layer_norm.forward(&x)?;
        Ok(Some(self.embed_out.forward(&x)?.to_dtype(DType::F32)?))
    }
}
